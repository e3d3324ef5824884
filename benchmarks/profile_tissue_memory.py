"""Where the tissue model's peak tensor memory comes from: the live blocks at the peak, by the code
that allocated them (torch.profiler's allocation events, the same events ``bench_models.py`` sums).

    python benchmarks/profile_tissue_memory.py --niches 16000                     # merged, defaults
    python benchmarks/profile_tissue_memory.py --niches 16000 --merge-total 0     # unmerged
    python benchmarks/profile_tissue_memory.py --niches 16000 --merge-input 0.75 --mode train
"""

from __future__ import annotations

import argparse
import collections
import sys

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile


def _frames(stack: list[str]) -> str:
    names = [s.split(": ")[-1] if "py(" in s else s for s in stack if "torch/nn" not in s and "<built-in" not in s]
    return " > ".join(names[-4:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--niches", type=int, default=16000)
    p.add_argument("--preset", default="small")
    p.add_argument("--merge-total", type=float, default=0.9, help="0 = the unmerged model")
    p.add_argument("--merge-input", type=float, default=0.0)
    p.add_argument("--ff-chunk", type=int, default=0)
    p.add_argument("--mode", choices=("inference", "train"), default="inference")
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from spatia_hf import SpatiaTissueConfig, SpatiaTissueModel

    cfg = SpatiaTissueConfig.from_preset(args.preset, merge_ratio=0.0, merge_input_ratio=args.merge_input,
                                         merge_total_ratio=args.merge_total if args.merge_total > 0 else None,
                                         chunk_size_feed_forward=args.ff_chunk)
    torch.manual_seed(0)
    model = SpatiaTissueModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    m = args.niches
    emb = torch.randn(1, m, cfg.niche_embed_dim, generator=g)
    pos = torch.rand(1, m, 2, generator=g) * (m**0.5) * 50.0  # niches ~50 µm apart, as in bench_models
    train = args.mode == "train"

    def step():
        out = model(emb, pos)
        if train:
            torch.autograd.grad(out.niche_embeds.square().mean(), list(model.parameters()))

    with torch.inference_mode(not train), torch.set_grad_enabled(train):
        step()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=True) as prof:
            step()
    allocs = []

    def walk(node, stack):
        if node.typed[0] == _EventType.Allocation:
            allocs.append((node.start_time_ns, node.typed[1].ptr, node.typed[1].alloc_size, _frames(stack)))
        for child in node.children:
            walk(child, stack + [node.name])

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root, [])
    allocs.sort(key=lambda a: a[0])
    live, cur, peak, snap, where = {}, 0, 0, {}, ""
    for _, ptr, size, who in allocs:
        if size > 0:
            live[ptr] = (size, who)
        else:
            live.pop(ptr, None)
        cur += size
        if cur > peak:
            peak, snap, where = cur, dict(live), who
    print(f"peak {peak / 2**20:.1f} MiB while {where}")
    by, count = collections.Counter(), collections.Counter()
    for size, who in snap.values():
        by[who] += size
        count[who] += 1
    for who, size in by.most_common(args.top):
        print(f"  {size / 2**20:7.2f} MiB ({count[who]} blocks)  {who}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
