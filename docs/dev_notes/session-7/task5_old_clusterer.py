"""`spatia evaluate` with task 5's clusterer as it was before this session (Leiden on a 15-neighbour graph, no
centroid refinement), to see how much of a task-5 comparison is the clusterer's.

    python task5_old_clusterer.py evaluate --model ... --tasks 5 --peers novae,scvi ...   (the CLI's arguments)
"""
import sys

from spatia_hf.evaluation import tasks


def old_domain_clustering(features, domains, sample_ids, eval_idx=None, n_clusters=None, method="auto", seed=0,
                          kinds=None):
    return tasks._clustering(5, features, domains, eval_idx, n_clusters, method, seed, kinds, groups=sample_ids)


tasks.run_domain_clustering = old_domain_clustering
from spatia_hf.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
