"""``sparse-clt-hf bench``: capture overhead, memory and encode speed (see :mod:`sparse_clt_hf.bench`)."""

from __future__ import annotations

import argparse

from .. import bench


def add_arguments(parser: argparse.ArgumentParser) -> None:
    bench.add_bench_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return bench.run_bench(args)
