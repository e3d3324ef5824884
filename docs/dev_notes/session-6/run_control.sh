#!/bin/bash
# control: the same benchmark with the pre-sketch package (commit 140aac2) first on PYTHONPATH
cd /work/main
export PYTHONPATH=/work/wt/ctl/src
exec .venv/bin/python benchmarks/bench_user_path.py "$@"
