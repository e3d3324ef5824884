"""Peak tensor memory of a call on the CPU, for memory benchmarks and bounds in tests."""

from __future__ import annotations

from typing import Callable


def cpu_peak_mib(fn: Callable[[], object]) -> float:
    """Peak of live CPU tensor memory (MiB) allocated during ``fn()``, above what was live before.

    Sums the allocation/free events of torch's CPU allocator in time order (torch.profiler with
    ``profile_memory``); process RSS cannot show this, as freed pages are reused.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20
