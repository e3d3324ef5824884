"""Start-up cost of ``import spatia_hf`` and of the ``spatia`` CLI, against the eager import as baseline.

Imports are process-wide, so each measurement is a fresh interpreter (wall time of the whole
process, median of ``--repeats``), all run by this script back to back on the same machine:

- ``eager``: ``import spatia_hf`` then every public name plus the Auto-class registration, i.e.
  what ``import spatia_hf`` cost before it became lazy (the baseline);
- ``lazy``: a plain ``import spatia_hf``;
- ``spatia --help`` and ``spatia demo --help`` (``python -m spatia_hf.cli``).

    python benchmarks/bench_import.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

CASES = {
    "eager (baseline)": ["-c", "import spatia_hf\nfor n in spatia_hf.__all__: getattr(spatia_hf, n)\n"
                               "spatia_hf.register_auto_classes()"],
    "lazy import spatia_hf": ["-c", "import spatia_hf"],
    "spatia --help": ["-m", "spatia_hf.cli", "--help"],
    "spatia demo --help": ["-m", "spatia_hf.cli", "demo", "--help"],
    "python (empty)": ["-c", "pass"],
}


def wall(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    times = {name: [] for name in CASES}
    for _ in range(args.repeats):  # interleaved, so a load spike hits every case alike
        for name, case in CASES.items():
            times[name].append(wall(case))
    base = statistics.median(times["eager (baseline)"])
    print(f"{'case':<24}{'median s':>10}{'x eager':>10}   all runs (s)")
    for name, runs in times.items():
        med = statistics.median(runs)
        print(f"{name:<24}{med:>10.2f}{med / base:>10.3f}   " + " ".join(f"{t:.2f}" for t in runs))


if __name__ == "__main__":
    main()
