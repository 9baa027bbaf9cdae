"""``sparse-clt-hf train``: fit a CLT or PLT on a model's own activations, save it, print the metrics."""

from __future__ import annotations

import argparse
import json

from ..training_config import TRAINABLE_ACTIVATIONS, TRANSFORMS, TrainingConfig, format_metrics, parse_layers
from ._options import add_model_options, load_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``sparse-clt-hf train``."""
    d = TrainingConfig(layers=[0])
    parser.add_argument("--model", default=None, help="HF model id or folder (default: SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--text", default="python",
                        help="a .txt/.jsonl file or a folder of them; 'python' = text shipped with Python")
    parser.add_argument("--layers", required=True, help="layers to train: '3,4,5' or '2-7'")
    parser.add_argument("--width", type=int, default=d.n_features, help="features per layer")
    parser.add_argument("--k", type=int, default=d.k, help="TopK: active features per token")
    parser.add_argument("--span", type=int, default=d.span, help="layers each source writes to (1 = PLT, 0 = all later)")
    parser.add_argument("--activation", choices=list(TRAINABLE_ACTIVATIONS), default=d.activation,
                        help="topk: exactly k active features per token; jumprelu: trained as TopK, then a "
                             "per-layer threshold (L0 varies per token, about k on average)")
    parser.add_argument("--input-site", default=d.input_site, help="resid_mid, mlp_in, ... or module:input")
    parser.add_argument("--output-site", default=d.output_site, help="site the transcoder reconstructs (mlp_out, ...)")
    parser.add_argument("--input-transform", choices=list(TRANSFORMS), default=d.input_transform,
                        help="normalisation applied to the input before encoding")
    parser.add_argument("--tokens", type=int, default=d.tokens, help="training tokens")
    parser.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="held-out tokens")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="passes over each buffer fill")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="tokens per optimiser step")
    parser.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per training sequence")
    parser.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (after warm-up)")
    parser.add_argument("--aux-k", type=int, default=d.aux_k, help="dead latents in the AuxK loss")
    parser.add_argument("--buffer-mb", type=float, default=d.buffer_mb, help="activation buffer bound")
    parser.add_argument("--seed", type=int, default=d.seed, help="random seed (initialisation, shuffling)")
    parser.add_argument("--out", required=True, help="folder to write the transcoder to (native format)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_options(parser)


def run(args: argparse.Namespace) -> int:
    """``sparse-clt-hf train``: fit, save to ``--out``, print the metrics (the model runs where the model
    options say; the transcoder is fitted on the cpu, on float32 activations)."""
    from ..training import text_source, train_transcoder

    model, tokenizer, name = load_model(args, args.model)
    cfg = TrainingConfig(
        layers=parse_layers(args.layers), n_features=args.width, k=args.k, span=args.span,
        activation=args.activation, input_site=args.input_site, output_site=args.output_site,
        input_transform=args.input_transform, tokens=args.tokens, eval_tokens=args.eval_tokens,
        epochs=args.epochs, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, aux_k=args.aux_k,
        buffer_mb=args.buffer_mb, seed=args.seed, progress=not (args.no_progress or args.json), model_name=name,
    )
    tc, metrics = train_transcoder(model, tokenizer, text_source(args.text), cfg)
    out = tc.save_pretrained(args.out)
    if args.json:
        print(json.dumps({"out": str(out), "metrics": metrics}, default=str))
    else:
        print(format_metrics(metrics))
        print(f"saved to {out}")
    return 0
