"""Memory during a long generation: plain ``generate`` vs the transcoder attached (README, "Benchmark").

Run in a fresh process with glibc's mmap threshold fixed, so that freed tensors leave RSS at once and the
peak tracks live memory (otherwise it follows the heap's history)::

    MALLOC_MMAP_THRESHOLD_=65536 python examples/decode_memory.py          # 128 new tokens, about a minute
    MALLOC_MMAP_THRESHOLD_=65536 python examples/decode_memory.py --long   # 1024 new tokens, 5-10 minutes

A progress bar counts the tokens of each of the four calls (on a terminal).

The attached peak should exceed the plain one by the features plus the decode buffer, and nothing else.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from sparse_clt_hf import attach_clt, bench

SHORT, LONG = 128, 1024  # new tokens per call: the default (about a minute on a laptop CPU) and --long


class TokenBar:
    """A ``generate`` streamer that only counts the new tokens on a progress bar (none off a terminal)."""

    def __init__(self, total: int, desc: str) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="tok", disable=None, leave=False)
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.bar.update(1)

    def end(self) -> None:
        self.bar.close()


def options(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``--new`` filled in from ``--long``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", type=int, default=None,
                        help=f"new tokens per generate call (default {SHORT}; {LONG} with --long)")
    parser.add_argument("--long", action="store_true", help=f"the long version: {LONG} new tokens per call")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--width", type=int, default=4096, help="transcoder features per layer")
    parser.add_argument("--model", default="smollm2", help="as for `sparse-clt-hf bench --model`")
    parser.add_argument("--quick", action="store_true", help="the bench's tiny random model (a smoke test)")
    args = parser.parse_args(argv)
    if args.new is None:
        args.new = LONG if args.long else SHORT
    return args


def main(argv: list[str] | None = None) -> list[tuple[str, float, float, int]]:
    """Print and return (variant, seconds, peak bytes above start, feature bytes) for plain, attached, twice."""
    args = options(argv)
    model, source = bench.build_model(
        argparse.Namespace(model=args.model, device="cpu", dtype="float32", quick=args.quick, gemma2_2b=False)
    )
    results = []
    d, n_layers = model.config.hidden_size, model.config.num_hidden_layers
    tc = bench.random_transcoder(d, list(range(n_layers)), args.width, device=torch.device("cpu"), dtype=torch.float32)
    inputs = {"input_ids": torch.randint(10, model.config.vocab_size, (args.batch, 32))}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    print(f"{source}: {n_layers} layers, d {d}; transcoder m {args.width}; batch {args.batch}, {args.new} new tokens "
          "per call, 4 calls" + ("" if args.long else " (--long: 1024)"), flush=True)
    for attached in (False, True, False, True):  # the second pair is the one to read (allocator warmed up)
        att = attach_clt(model, tc, top_k=32) if attached else None
        print(f"{'attached' if attached else 'plain'}: generating {args.new} tokens ...", flush=True)
        gc.collect()
        bench.reset_peak_rss()
        before = bench.rss_bytes()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                           pad_token_id=0, eos_token_id=None,
                           streamer=TokenBar(args.new, "attached" if attached else "plain") if args.batch == 1 else None)
        seconds = time.perf_counter() - start
        peak = bench.peak_rss_bytes() - before
        kept = 0
        if att is not None:
            kept = att.features.nbytes
            att.detach()
        name = "attached" if attached else "plain"
        print(f"{name:8s} {seconds:6.1f} s  peak RSS above start {peak / 2**20:6.1f} MiB  features {kept / 2**20:.2f} MiB",
              flush=True)
        results.append((name, seconds, peak, kept))
    return results


if __name__ == "__main__":
    main()
