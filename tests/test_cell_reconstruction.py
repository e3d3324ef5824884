"""The pooled cell embedding reconstructs its cell's gene tokens (``SpatiaConfig.cell_reconstruction``)."""

from __future__ import annotations

import pytest
import torch

from spatia_hf import SpatiaConfig, SpatiaForPretraining
from spatia_hf.models.configuration_spatia import NUM_SPECIAL_TOKENS

pytestmark = pytest.mark.usefixtures("one_thread")

GENES = [f"GENE{i}" for i in range(12)]


def expression_only_config(**kwargs) -> SpatiaConfig:
    return SpatiaConfig.from_preset("tiny", gene_vocab=GENES, mim_weight=0.0, contrastive_weight=0.0,
                                    niche_weight=0.0, **kwargs)


def planted_cells(n: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every cell measures all 12 genes; gene 0 carries a planted value that no other gene predicts."""
    g = torch.Generator().manual_seed(seed)
    planted = torch.rand(n, generator=g) * 4.0
    values = torch.log1p(torch.randint(0, 4, (n, len(GENES)), generator=g).float())
    values[:, 0] = planted
    ids = torch.arange(len(GENES)).expand(n, -1) + NUM_SPECIAL_TOKENS
    return {"gene_ids": ids.clone(), "gene_values": values,
            "gene_attention_mask": torch.ones(n, len(GENES), dtype=torch.long)}, planted


def test_config_rejects_unknown_reconstruction_target():
    with pytest.raises(ValueError, match="cell_reconstruction.*all"):
        expression_only_config(cell_reconstruction="everything")
    with pytest.raises(ValueError, match="cell_reconstruction_weight"):
        expression_only_config(cell_reconstruction_weight=-1.0)


def test_all_targets_visible_tokens_too():
    x, _ = planted_cells(4, seed=0)
    nothing_hidden = torch.zeros(4, len(GENES), dtype=torch.bool)
    one_hidden = nothing_hidden.clone()
    one_hidden[:, 3] = True
    losses = {}
    for target in ("all", "masked"):
        torch.manual_seed(0)
        model = SpatiaForPretraining(expression_only_config(cell_reconstruction=target)).eval()
        out = model(**x, gene_value_mask=one_hidden, return_dict=True)
        cell = model._cell_reconstruction_loss(out.cell_embeds, x["gene_ids"], x["gene_values"],
                                               x["gene_attention_mask"], one_hidden)
        none = model._cell_reconstruction_loss(out.cell_embeds, x["gene_ids"], x["gene_values"],
                                               x["gene_attention_mask"], nothing_hidden)
        assert cell.dim() == 0 and torch.isfinite(cell)
        losses[target] = (cell, none)
    assert losses["masked"][1] == 0.0  # nothing hidden: the GEPC term has no target
    assert losses["all"][1] > 0.0  # every real token is a target
    cfg = model.config
    assert cfg.cell_reconstruction_weight == 1.0 and SpatiaConfig().cell_reconstruction == "all"


def _train(target: str, steps: int = 60, lr: float = 3e-3) -> SpatiaForPretraining:
    torch.manual_seed(0)
    model = SpatiaForPretraining(expression_only_config(cell_reconstruction=target, mgm_mask_ratio=0.25))
    x, _ = planted_cells(64, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model(**x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _decoded_pearson(model: SpatiaForPretraining) -> float:
    """Pearson, over new cells, between the planted value and what the cell decoder reads back for it
    from the pooled embedding alone (nothing hidden, as at inference)."""
    x, planted = planted_cells(64, seed=2)
    with torch.no_grad():
        embeds = model.spatia.cell(**x, return_dict=True).cell_embeds
        table = model.spatia.cell.expression_encoder.gene_embeddings
        read = model.cell_decoder(embeds, x["gene_ids"][:, :1], table)[:, 0]
    return float(torch.corrcoef(torch.stack([read, planted]))[0, 1])


def test_reconstruction_loss_decreases_on_a_tiny_batch():
    torch.manual_seed(0)
    model = SpatiaForPretraining(expression_only_config())
    x, _ = planted_cells(16, seed=0)
    mask = torch.zeros(16, len(GENES), dtype=torch.bool)
    mask[:, ::4] = True
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = last = None
    for _ in range(30):
        out = model(**x, gene_value_mask=mask)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = out.mgm_loss.item() if first is None else first
        last = out.mgm_loss.item()
    assert last < 0.5 * first, (first, last)


def test_embedding_keeps_a_planted_gene_only_other_genes_cannot_predict():
    kept = _decoded_pearson(_train("all"))
    assert kept > 0.25, kept  # 0.43 here after 60 steps (random init: about 0)
    # predicting only hidden values never asks the embedding for a gene no other gene predicts
    assert _decoded_pearson(_train("masked")) < kept - 0.3  # -0.40 here
