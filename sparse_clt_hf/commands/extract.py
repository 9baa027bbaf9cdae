"""``sparse-clt-hf extract``: features of a transcoder over a corpus, into resumable shards.

Under ``accelerate launch --multi_gpu --num_processes N -m sparse_clt_hf extract ...`` the shards are
split across the N processes (on a machine without GPUs: N CPU processes with the gloo backend).
"""

from __future__ import annotations

import argparse
import json

from ._options import add_model_options, model_load_kwargs, resolve_device


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model id, folder or .gguf file (default: SmolLM2)")
    p.add_argument("--clt", required=True, help="transcoder folder, Hub reference or registry name")
    p.add_argument("--data", required=True,
                   help="a text file (one document per line), a .jsonl file, a folder of .txt files, "
                        "or a `datasets` name or save_to_disk folder")
    p.add_argument("--out", required=True, help="output folder (an existing extraction there is resumed)")
    p.add_argument("--layers", default=None, help="layers to record, e.g. '6,7' or '6-9' (default: all)")
    p.add_argument("--top-k", type=int, default=32, help="features recorded per token and layer")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per window; longer documents are split")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--max-docs", type=int, default=None, help="use only the first N documents")
    p.add_argument("--shard-size", type=int, default=None,
                   help="windows per shard (default: as many as fit 256 MiB of features, a multiple of the batch size)")
    p.add_argument("--text-field", default="text", help="field of a .jsonl record / dataset column holding the text")
    p.add_argument("--split", default="train", help="split of a `datasets` dataset")
    p.add_argument("--follow-links", action="store_true",
                   help="in a --data folder, also read .txt links that point outside it (refused by default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_options(p)  # the device: each accelerate process's own (--device must agree); --device-map: one process


def run(args: argparse.Namespace) -> int:
    import os

    # bitwise-identical CPU results whatever the process count, thread count and memory alignment
    # (read by MKL at its first matmul, which has not run yet in this process)
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    import torch

    from ..extract import _partial_state, extract, open_data
    from ..models import load_model
    from ..training_config import parse_layers

    layers = parse_layers(args.layers) if args.layers else None
    # cheap checks first: a bad --data fails before the model is loaded
    source = open_data(args.data, field=args.text_field, max_docs=args.max_docs, split=args.split,
                       follow_links=args.follow_links)
    state = _partial_state()
    wanted = resolve_device(args)
    if args.device is not None and torch.device(wanted).type != state.device.type:
        raise ValueError(f"--device {args.device}: extract runs on each process's device, here {state.device} "
                         "(hide the GPUs with CUDA_VISIBLE_DEVICES= to extract on the cpu)")
    kwargs = model_load_kwargs(args)
    if args.device_map is None:
        kwargs.pop("device_map", None)  # loaded on the cpu; extract() moves it to this process's device
    with state.main_process_first():  # one download per machine
        model, tokenizer, name = load_model(args.model, **kwargs)
    manifest = extract(model, tokenizer, args.clt, source, args.out, layers=layers, top_k=args.top_k,
                       seq_len=args.seq_len, batch_size=args.batch_size, max_docs=args.max_docs,
                       shard_size=args.shard_size, text_field=args.text_field, split=args.split,
                       model_name=name, transcoder_name=args.clt, progress=not (args.no_progress or args.json))
    if state.is_main_process and args.json:
        summary = {k: manifest[k] for k in ("n_documents", "n_windows", "n_tokens", "n_shards", "bytes", "layers")}
        print(json.dumps({"out": str(args.out), **summary}))
    return 0
