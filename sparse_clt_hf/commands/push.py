"""``sparse-clt-hf push``: upload a native transcoder folder to the Hub with a model card."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="native transcoder folder (see `convert`)")
    parser.add_argument("repo", help="Hub repo id, org/name")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    parser.add_argument("--commit-message", default=None, help="commit message (default: \"Upload CLT|PLT transcoder with sparse-clt-hf\")")
    parser.add_argument("--license", default=None, help="license for the model card metadata")


def run(args: argparse.Namespace) -> int:
    from ..io.push import push_folder

    url = push_folder(
        args.dir,
        args.repo,
        private=args.private or None,
        revision=args.revision,
        commit_message=args.commit_message,
        license=args.license,
    )
    print(json.dumps({"repo": args.repo, "commit_url": url}) if args.json else f"pushed to {url}")
    return 0
