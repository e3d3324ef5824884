"""The linear expression sketch in the cell embedding (``SpatiaCellConfig.expression_sketch``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spatia_hf import SpatiaConfig
from spatia_hf.models.modeling_cell import SpatiaCellModel

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cell(n_genes: int = 8, **kwargs) -> SpatiaCellModel:
    torch.manual_seed(0)
    cfg = SpatiaConfig.from_preset("tiny", gene_vocab=[f"G{i}" for i in range(n_genes)], cell_config=kwargs).cell_config
    return SpatiaCellModel(cfg).eval()


def _genes(b: int = 3, n: int = 8):
    ids = torch.arange(4, 4 + n).expand(b, -1).clone()
    values = torch.rand(b, n, generator=torch.Generator().manual_seed(1)) * 3
    return ids, values


def test_sketch_is_linear_in_the_values_and_skips_padding_and_hidden_values():
    encoder = tiny_cell().expression_encoder
    ids, values = _genes()
    sketch = encoder.sketch(ids, values)
    torch.testing.assert_close(encoder.sketch(ids, 2.5 * values), 2.5 * sketch)
    torch.testing.assert_close(encoder.sketch(ids, values) + encoder.sketch(ids, values.flip(0)),
                               encoder.sketch(ids, values + values.flip(0)))
    hidden = torch.zeros_like(ids, dtype=torch.bool)
    hidden[:, 2] = True
    changed = values.clone()
    changed[:, 2] += 10.0
    torch.testing.assert_close(encoder.sketch(ids, changed, gene_value_mask=hidden), encoder.sketch(ids, values, gene_value_mask=hidden))
    attention = torch.ones_like(ids, dtype=torch.bool)
    attention[:, -1] = False
    changed[:, -1] += 10.0
    torch.testing.assert_close(encoder.sketch(ids, changed, attention, hidden), encoder.sketch(ids, values, attention, hidden))


def test_a_hidden_value_does_not_reach_the_cell_embedding():
    """Masked gene modelling and the whole-token reconstruction read the embedding: a hidden value in it would
    be a leak."""
    cell = tiny_cell()
    ids, values = _genes()
    hidden = torch.zeros_like(ids, dtype=torch.bool)
    hidden[:, 5] = True
    changed = values.clone()
    changed[:, 5] = 0.0
    with torch.no_grad():
        a = cell(gene_ids=ids, gene_values=values, gene_value_mask=hidden).cell_embeds
        b = cell(gene_ids=ids, gene_values=changed, gene_value_mask=hidden).cell_embeds
    torch.testing.assert_close(a, b)


def test_presets_turn_it_on_and_the_field_default_keeps_old_checkpoints():
    assert tiny_cell().config.expression_sketch
    old = tiny_cell(expression_sketch=False)
    assert old.sketch_norm is None and old.pool_proj.in_features == 2 * old.config.hidden_size
    assert tiny_cell().pool_proj.in_features == 3 * old.config.hidden_size
    assert SpatiaConfig().cell_config.expression_sketch is False


def test_a_fresh_embedding_keeps_the_expression_linearly():
    """At initialisation the embedding of 40 genes already predicts held-out cells' genes with a ridge probe about
    as well as the values themselves; without the sketch it does not (the reason for the field)."""
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(0)
    n_cells, n_genes = 400, 40
    programs = rng.gamma(1.0, 1.0, size=(6, n_genes))
    counts = rng.poisson(programs[rng.integers(0, 6, n_cells)] * rng.gamma(2.0, 1.0, size=(n_cells, n_genes)))
    logx = np.log1p(counts).astype(np.float32)
    ids = torch.arange(4, 4 + n_genes).expand(n_cells, -1)

    def recovery(model) -> float:
        with torch.no_grad():
            emb = model(gene_ids=ids, gene_values=torch.from_numpy(logx)).cell_embeds.numpy()
        pred = Ridge(1.0).fit(emb[:300], logx[:300]).predict(emb[300:])
        return float(np.mean([np.corrcoef(pred[:, g], logx[300:, g])[0, 1] for g in range(n_genes)]))

    with_sketch, without = recovery(tiny_cell(n_genes)), recovery(tiny_cell(n_genes, expression_sketch=False))
    assert with_sketch > 0.8 and with_sketch > without + 0.1, (with_sketch, without)
