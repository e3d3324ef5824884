"""Speed and memory of the SPATIA models, as ratios against baselines run in the same process.

(a) ``encoder``: the expression encoder (cells/s) against a transformers ``BertModel`` of the same
    width and depth (Geneformer-sized by default: d=256, 6 layers, 4 heads, MLP 512), on the same
    cells of a ``--panel``-gene panel:
      - ``same cells``: BERT reads every panel gene of each cell (a dense encoder), the SPATIA
        encoder reads the expressed genes plus ``--zero-ratio`` x as many sampled zeros (what
        SpatiaProcessor feeds it);
      - ``same tokens``: both read exactly the same number of tokens (isolates the
        implementation: SDPA, fused QKV projection, no token-type/position embeddings).
(b) ``flops``: achieved GFLOP/s of the full cell model (image + expression + fusion) at batch 64
    (FLOPs counted by ``torch.utils.flop_counter``: projections, MLPs, patch embedding and, with
    a formula registered here for the CPU kernel, attention), against a plain fp32 matmul in this process;
    the ``small`` preset (d=128) and its geometry at wider ``--widths``.
(c) ``tissue``: the tissue model at 1k/4k/16k niche tokens with and without token merging (same
    weights, same config apart from merging): time (ratio, in this process) and peak tensor memory
    (CPU: the profiler's allocator events; CUDA: ``max_memory_allocated``) of an inference forward,
    or with ``--mode train`` of forward + backward. ``--merge-input`` adds the merged model's
    pre-projection merge, ``--ff-chunk`` chunks both models' MLPs; the relative change of the
    outputs caused by merging is reported next to the ratios.

Every variant runs round-robin on the same inputs; each is timed by its fastest repeat (the one
least disturbed by other work on a shared machine).

    python benchmarks/bench_models.py                      # all parts
    python benchmarks/bench_models.py --part tissue --sizes 1000 4000 16000
    python benchmarks/bench_models.py --part tissue --merge-input 0.5 --ff-chunk 1024 --mode train
    python benchmarks/bench_models.py --json results.json --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

import torch


# ------------------------------------------------------------------------------------ timing
def race(fns: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None]) -> dict[str, float]:
    """Fastest wall time (s) of each function, run round-robin after one warm-up each."""
    for fn in fns.values():
        fn()
    sync()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


# ------------------------------------------------------------------------------------ (a) encoder
def sparse_cells(n: int, panel: int, expressed: int, zero_ratio: float, seed: int):
    """Gene ids (vocab ids) and log1p values of ``n`` cells expressing ``expressed`` genes each."""
    from spatia_hf.models.configuration_spatia import NUM_SPECIAL_TOKENS

    g = torch.Generator().manual_seed(seed)
    n_tok = expressed + int(round(zero_ratio * expressed))
    ids = torch.stack([torch.randperm(panel, generator=g)[:n_tok] for _ in range(n)]) + NUM_SPECIAL_TOKENS
    values = torch.log1p(torch.rand(n, n_tok, generator=g) * 20)
    values[:, expressed:] = 0.0
    return ids, values


def bench_encoder(args, device) -> dict:
    from transformers import BertConfig, BertModel

    from spatia_hf.models.configuration_spatia import NUM_SPECIAL_TOKENS, SpatiaCellConfig
    from spatia_hf.models.modeling_cell import SpatiaExpressionEncoder

    d, layers, heads, inter = args.width, args.depth, args.heads, args.intermediate
    genes = [f"G{i}" for i in range(args.panel)]
    cfg = SpatiaCellConfig(gene_vocab=genes, hidden_size=d, num_attention_heads=heads, intermediate_size=inter,
                           num_expression_layers=layers)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    ours = SpatiaExpressionEncoder(cfg).to(device).eval()
    bert = BertModel(BertConfig(vocab_size=cfg.vocab_size, hidden_size=d, num_hidden_layers=layers,
                                num_attention_heads=heads, intermediate_size=inter,
                                max_position_embeddings=max(args.panel, 512) + 8),
                     add_pooling_layer=False).to(device).eval()
    b = args.batch
    ids, values = sparse_cells(b, args.panel, args.expressed, args.zero_ratio, args.seed)
    ids, values = ids.to(device), values.to(device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    dense_ids = (torch.arange(args.panel, device=device) + NUM_SPECIAL_TOKENS).expand(b, -1).contiguous()
    dense_mask = torch.ones_like(dense_ids)
    same_ids = dense_ids[:, : ids.shape[1]].contiguous()
    sync = _sync(device)
    with torch.inference_mode():
        t = race({
            "spatia_sparse": lambda: ours(ids, values, mask),
            "bert_full_panel": lambda: bert(input_ids=dense_ids, attention_mask=dense_mask),
            "bert_same_tokens": lambda: bert(input_ids=same_ids, attention_mask=torch.ones_like(same_ids)),
        }, args.repeats, sync)
    cps = {k: b / v for k, v in t.items()}
    return {
        "model": f"d={d}, layers={layers}, heads={heads}, mlp={inter}, batch={b}",
        "panel_genes": args.panel,
        "spatia_tokens_per_cell": int(ids.shape[1]),
        "cells_per_s": {k: round(v, 1) for k, v in cps.items()},
        "speedup_same_cells": round(cps["spatia_sparse"] / cps["bert_full_panel"], 2),
        "speedup_same_tokens": round(cps["spatia_sparse"] / cps["bert_same_tokens"], 2),
    }


# ------------------------------------------------------------------------------------ (b) flops
def matmul_gflops(n: int, device, repeats: int) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    t = race({"mm": lambda: a @ b}, repeats, _sync(device))["mm"]
    return 2 * n**3 / t / 1e9


def _count_cpu_sdpa_flops() -> None:
    """Make ``FlopCounterMode`` count CPU attention: torch registers SDPA formulas for the CUDA
    kernels only, so on CPU ``aten._scaled_dot_product_flash_attention_for_cpu`` (the kernel SDPA
    runs there) counted 0 FLOPs and every attention was left out of the achieved GFLOP/s."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_flop_count

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None and op not in flop_registry:

        @register_flop_formula(op)
        def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query_shape, key_shape, value_shape)  # QK^T and AV, 2 FLOPs per MAC


def bench_flops(args, device) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    _count_cpu_sdpa_flops()

    from spatia_hf import SpatiaConfig, SpatiaModel

    out = {"matmul_gflops": None, "presets": {}}
    rows = {}
    variants = [(p, {}) for p in args.presets]
    variants += [(f"small_d{w}", {"hidden_size": w, "num_attention_heads": max(1, w // 32), "intermediate_size": 4 * w})
                 for w in args.widths]
    for preset, overrides in variants:
        base = preset.split("_d")[0]
        cfg = SpatiaConfig.from_preset(base, gene_vocab=[f"G{i}" for i in range(1000)], cell_config=overrides,
                                       niche_config={"cell_embed_dim": overrides.get("hidden_size", 128)}
                                       if overrides else None)
        cell_cfg = cfg.cell_config
        torch.manual_seed(args.seed)
        model = SpatiaModel(cfg).cell.to(device).eval()
        b = args.flops_batch
        n_tok = cell_cfg.max_genes
        ids, values = sparse_cells(b, 1000, int(round(n_tok / (1 + args.zero_ratio))), args.zero_ratio, args.seed)
        px = torch.randn(b, cell_cfg.num_channels, cell_cfg.image_size, cell_cfg.image_size, device=device)
        inputs = dict(pixel_values=px, gene_ids=ids.to(device), gene_values=values.to(device))
        with torch.inference_mode():
            counter = FlopCounterMode(display=False)
            with counter:
                model(**inputs)
            flops = counter.get_total_flops()
            by_op = {str(k).split(".")[-1]: v for k, v in counter.get_flop_counts()["Global"].items()}
        rows[preset] = (model, inputs, flops, cell_cfg, by_op)
    mm = {}
    fns = {}
    for preset, (model, inputs, _, _, _) in rows.items():
        fns[preset] = (lambda m=model, x=inputs: m(**x))
    a = torch.randn(args.matmul_size, args.matmul_size, device=device)
    bm = torch.randn(args.matmul_size, args.matmul_size, device=device)
    fns["matmul"] = lambda: a @ bm
    with torch.inference_mode():
        t = race(fns, args.repeats, _sync(device))
    mm = 2 * args.matmul_size**3 / t["matmul"] / 1e9
    out["matmul_gflops"] = round(mm, 1)
    for preset, (_, _, flops, cell_cfg, by_op) in rows.items():
        g = flops / t[preset] / 1e9
        out["presets"][preset] = {
            "cell_model": f"d={cell_cfg.hidden_size}, {cell_cfg.image_size}px, {cell_cfg.max_genes} gene tokens, "
                          f"batch {args.flops_batch}",
            "gflop_per_forward": round(flops / 1e9, 2),
            "gflop_by_op": {k: round(v / 1e9, 2) for k, v in by_op.items()},
            "seconds": round(t[preset], 4),
            "gflops": round(g, 1),
            "fraction_of_matmul": round(g / mm, 3),
        }
    return out


# ------------------------------------------------------------------------------------ (c) tissue
def _tissue_model(args, ratio_total: float, merge_input: float = 0.0):
    from spatia_hf import SpatiaTissueConfig, SpatiaTissueModel

    cfg = SpatiaTissueConfig.from_preset(args.tissue_preset, merge_total_ratio=ratio_total if ratio_total > 0 else None,
                                         merge_ratio=0.0, merge_input_ratio=merge_input,
                                         chunk_size_feed_forward=args.ff_chunk)
    torch.manual_seed(args.seed)
    return SpatiaTissueModel(cfg).eval()


def _tissue_inputs(m: int, dim: int, seed: int, device):
    g = torch.Generator().manual_seed(seed)
    side = (m ** 0.5) * 50.0  # niches ~50 µm apart
    return (torch.randn(1, m, dim, generator=g).to(device), (torch.rand(1, m, 2, generator=g) * side).to(device))


def peak_mib(fn: Callable[[], object], device) -> float:
    """Peak of live tensor memory (MiB) allocated during ``fn()`` above what was live before.

    CUDA: ``max_memory_allocated``. CPU: the profiler's allocation/free events of torch's CPU
    allocator, summed in time order (RSS cannot show it: freed pages are reused).
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from spatia_hf.utils.memory import cpu_peak_mib

    return cpu_peak_mib(fn)


def _tissue_step(model, emb, pos, train: bool) -> Callable[[], object]:
    """One inference forward, or (``train``) forward + backward of a loss on every niche output."""
    if not train:
        return lambda: model(emb, pos)

    params = [p for p in model.parameters() if p.requires_grad]

    def step():  # gradients are returned and dropped: nothing persists between calls
        return torch.autograd.grad(model(emb, pos).niche_embeds.square().mean(), params)

    return step


def bench_tissue(args, device) -> dict:
    results = {}
    train = args.mode == "train"
    merged = _tissue_model(args, args.merge_total, args.merge_input).to(device)
    plain = _tissue_model(args, 0.0).to(device)
    plain.load_state_dict(merged.state_dict())
    for m in args.sizes:
        emb, pos = _tissue_inputs(m, merged.config.niche_embed_dim, args.seed, device)
        with torch.inference_mode():
            out_m, out_p = merged(emb, pos), plain(emb, pos)
            # how far merging moves the outputs (same weights; random weights, so only indicative)
            rel = ((out_m.niche_embeds - out_p.niche_embeds).norm() / out_p.niche_embeds.norm()).item()
            cos = torch.nn.functional.cosine_similarity(out_m.tissue_embeds, out_p.tissue_embeds).mean().item()
            tokens = out_m.num_tokens
            del out_m, out_p
        with torch.inference_mode(not train), torch.set_grad_enabled(train):
            fns = {"unmerged": _tissue_step(plain, emb, pos, train), "merged": _tissue_step(merged, emb, pos, train)}
            t = race(fns, args.tissue_repeats, _sync(device))
            mem_plain = peak_mib(fns["unmerged"], device)
            mem_merged = peak_mib(fns["merged"], device)
        results[str(m)] = {
            "tokens_per_layer_merged": list(tokens),
            "seconds": {"unmerged": round(t["unmerged"], 4), "merged": round(t["merged"], 4)},
            "speedup": round(t["unmerged"] / t["merged"], 2),
            "peak_mib": {"unmerged": round(mem_plain, 1), "merged": round(mem_merged, 1)},
            "memory_ratio": round(mem_plain / max(mem_merged, 1e-3), 2),
            "niche_embeds_rel_l2_vs_unmerged": round(rel, 4),
            "tissue_embeds_cosine_vs_unmerged": round(cos, 4),
        }
    cfg = merged.config
    return {"model": f"{args.tissue_preset} tissue: d={cfg.hidden_size}, layers={cfg.num_hidden_layers}, "
                     f"merge_total_ratio={args.merge_total}, merge_k={cfg.merge_k}, "
                     f"merge_input_ratio={args.merge_input} (merged model only), "
                     f"chunk_size_feed_forward={args.ff_chunk} (both models)",
            "mode": "forward+backward" if train else "inference forward",
            "sizes": results}


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("all", "encoder", "flops", "tissue"), default="all")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5)
    # (a)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--panel", type=int, default=1000, help="genes of the panel (BERT reads all of them)")
    p.add_argument("--expressed", type=int, default=150, help="expressed genes per cell")
    p.add_argument("--zero-ratio", type=float, default=0.5, help="sampled zeros per expressed gene")
    p.add_argument("--batch", type=int, default=16)
    # (b)
    p.add_argument("--presets", nargs="+", default=["small"])
    p.add_argument("--widths", type=int, nargs="*", default=[256, 512],
                   help="also the small preset's geometry at these widths (heads = width / 32, MLP 4x)")
    p.add_argument("--flops-batch", type=int, default=64)
    p.add_argument("--matmul-size", type=int, default=2048)
    # (c)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    p.add_argument("--tissue-preset", default="small")
    p.add_argument("--merge-total", type=float, default=0.9, help="fraction of tokens merged away by the last layer")
    p.add_argument("--tissue-repeats", type=int, default=2)
    p.add_argument("--merge-input", type=float, default=0.0,
                   help="merged model only: merge_input_ratio, niches merged before the input projection")
    p.add_argument("--ff-chunk", type=int, default=0,
                   help="both models: chunk_size_feed_forward (MLP over this many tokens at a time; 0 = off)")
    p.add_argument("--mode", choices=("inference", "train"), default="inference",
                   help="tissue: time/peak of an inference forward, or of forward + backward")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = {"device": str(device), "threads": args.threads, "torch": torch.__version__}
    parts = ("encoder", "flops", "tissue") if args.part == "all" else (args.part,)
    for part in parts:
        fn = {"encoder": bench_encoder, "flops": bench_flops, "tissue": bench_tissue}[part]
        results[part] = fn(args, device)
        print(json.dumps({part: results[part]}, indent=2), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
