"""``spatia push``: publish a model checkpoint, a generation pipeline or a dataset folder on the Hub."""

from __future__ import annotations

import argparse

KINDS = ("model", "pipeline", "dataset")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "push", help="publish a model, generation pipeline or dataset folder on the Hugging Face Hub",
        description="Uploads the folder as it is (safetensors weights / Parquet shards, configs, gene panel) in one "
                    "commit, with a card rendered for the repo (license, tags, evaluation results as model-index, "
                    "intended use, limitations, loading code, citation). Local files are only read. The token comes "
                    "from --token, HF_TOKEN or `hf auth login`; HF_ENDPOINT selects another Hub.",
    )
    parser.add_argument("kind", choices=KINDS, help="what PATH holds")
    parser.add_argument("path", metavar="PATH", help="folder written by save_pretrained or by the dataset builder")
    parser.add_argument("--repo-id", required=True, metavar="ORG/NAME", help="Hub repository to push to")
    parser.add_argument("--private", action="store_true", help="create the repo private (ignored if it exists)")
    parser.add_argument("--revision", default=None, metavar="BRANCH",
                        help="branch to commit to (created from main if missing; default main)")
    parser.add_argument("--token", default=None, help="Hub token with write access (default: HF_TOKEN or saved login)")
    parser.add_argument("--commit-message", default=None, help="commit summary")
    parser.add_argument("--eval-results", default=None, metavar="JSON",
                        help="results.json of `spatia evaluate`, shown in the card and its model-index")
    parser.add_argument("--dataset-id", default=None, metavar="ORG/NAME",
                        help="Hub id of the training dataset (model/pipeline cards)")
    parser.add_argument("--license", default="apache-2.0", help="license id for the card (default apache-2.0)")
    parser.add_argument("--keep-card", action="store_true",
                        help="upload the folder's own README.md instead of rendering a new card")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    from .. import hub

    card_kwargs: dict = {"license": args.license}
    if args.kind != "dataset":
        card_kwargs.update(eval_results=args.eval_results, dataset_id=args.dataset_id)
    elif args.eval_results or args.dataset_id:
        raise ValueError("--eval-results and --dataset-id describe models. Fix: drop them when pushing a dataset")
    push = {"model": hub.push_model, "pipeline": hub.push_pipeline, "dataset": hub.push_dataset}[args.kind]
    try:
        info = push(args.path, args.repo_id, token=args.token, private=args.private or None,
                    revision=args.revision, commit_message=args.commit_message, keep_card=args.keep_card,
                    **card_kwargs)
    except (HfHubHTTPError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"push of {args.path} to {args.repo_id} failed: {first} (local files are unchanged; "
                         f"run the same command again to retry)") from None
    print(f"pushed {args.kind} {args.path} -> {args.repo_id} ({args.revision or 'main'}): {info.commit_url}")
    return 0
