"""Quick-demo peers comparison with task 5's resolution search as it was before this session (the count closest
to the target wins; on ties the first found, not the lowest resolution). Attributes the change of Novae's task-5
figure between session 7 and session 8. Session 8, issue 17.

    python docs/dev_notes/session-8/peers_old_tie_rule.py /tmp/dq8 /tmp/dq8/report-peers-old-ties
"""
import math
import sys

import numpy as np

import spatia_hf.utils.clustering as C


def first_found_on_ties(run, target, steps=20, bounds=(1e-3, 20.0)):
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    best_res, best = 1.0, np.asarray(run(1.0))
    for _ in range(steps):
        if np.unique(best).size == target:
            break
        mid = 0.5 * (lo + hi)
        labels = np.asarray(run(math.exp(mid)))
        k = np.unique(labels).size
        if abs(k - target) < abs(np.unique(best).size - target):
            best_res, best = math.exp(mid), labels
        lo, hi = (mid, hi) if k < target else (lo, mid)
    return best_res, best


C.search_resolution = first_found_on_ties
from spatia_hf.cli import main  # noqa: E402

demo, out = sys.argv[1], sys.argv[2]
main(["evaluate", "--model", f"{demo}/pretrained", "--finetuned", f"{demo}/finetuned", "--dataset", f"{demo}/dataset",
      "--out", out, "--tasks", "5", "--cnn-epochs", "3", "--peers", "novae", "--novae-epochs", "3"])
