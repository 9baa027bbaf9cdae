"""``sparse-clt-hf bench``: capture overhead, memory and encode speed (see :mod:`sparse_clt_hf.bench`)."""

from __future__ import annotations

import argparse

from ..bench_options import add_bench_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_bench_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from .. import bench

    return bench.run_bench(args)
