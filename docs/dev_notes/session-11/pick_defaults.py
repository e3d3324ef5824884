#!/usr/bin/env python
"""Apply decision_rule.md to the validation sweeps: the guidance scale from validation_guidance.json (largest w
whose feature FID <= 1.2x the real-vs-real reference, else the smallest FID ratio) and, with
validation_edit_guidance.json, the edit guidance (smallest mean |log ratio - log truth| over the NUCSIZE folds with
the control within +-5%).

    python docs/dev_notes/session-11/pick_defaults.py guidance   # prints w
    python docs/dev_notes/session-11/pick_defaults.py edit       # prints w_p
"""
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).parent


def pick_guidance() -> float:
    rows = json.loads((HERE / "validation_guidance.json").read_text())["rows"]
    ok = [r for r in rows if r["fid"] <= 1.2 * r["fid_reference"]]
    if ok:
        return max(r["guidance_scale"] for r in ok)
    return min(rows, key=lambda r: r["fid"] / r["fid_reference"])["guidance_scale"]


def edit_error(row: dict) -> float:
    errs = [abs(math.log(e["area_ratio"]) - 0.5 * math.log(e["fold"])) for e in row["edits"] if e["gene"] == "NUCSIZE"]
    return sum(errs) / len(errs)


def pick_edit_guidance(w: float) -> float:
    rows = json.loads((HERE / "validation_guidance.json").read_text())["rows"]
    rows = [r for r in rows if r["guidance_scale"] == w]
    path = HERE / "validation_edit_guidance.json"
    if path.exists():
        rows += json.loads(path.read_text())["rows"]
    ok = [r for r in rows if all(abs(e["area_ratio"] - 1) <= 0.05 for e in r["edits"] if e["gene"] != "NUCSIZE")]
    for r in rows:
        print(f"w_p {r['perturbation_guidance']}: mean |log error| {edit_error(r):.3f}", file=sys.stderr)
    return min(ok, key=edit_error)["perturbation_guidance"]


if __name__ == "__main__":
    w = pick_guidance()
    print(w if sys.argv[1] == "guidance" else pick_edit_guidance(w))
