"""glibc tuning of utils/allocator.py, each case in a fresh process (the settings are process-wide)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")

FRAGMENT_AND_TRIM = r"""
import json, sys
from spatia_hf.utils.allocator import bound_heap_growth, release_free_heap

def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

print(json.dumps({"bound": bound_heap_growth()}), flush=True)
blocks = [bytearray(16 << 10) for _ in range(20000)]  # 320 MB of 16 KiB heap blocks
keep = blocks[::50]  # a few stay alive between the freed ones: the arena cannot shrink from its top
del blocks
before = anon_kb()
trimmed = release_free_heap()
print(json.dumps({"trimmed": trimmed, "before_kb": before, "after_kb": anon_kb(), "kept": len(keep)}))
"""


def _run(env_extra: dict) -> list[dict]:
    import json

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **env_extra}
    out = subprocess.run([sys.executable, "-c", FRAGMENT_AND_TRIM], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_freed_heap_in_the_middle_of_the_arena_goes_back_to_the_os():
    bound, trim = _run({})
    if not trim["trimmed"]:
        pytest.skip("not glibc")
    assert bound["bound"]
    # ~98% of 320 MB was freed but stayed mapped behind the live blocks; the trim returns most of it
    assert trim["before_kb"] - trim["after_kb"] > 150_000, trim


def test_opting_out_leaves_the_allocator_alone():
    bound, trim = _run({"SPATIA_KEEP_MALLOC": "1"})
    assert bound == {"bound": False} and trim["trimmed"] is False
