"""Train a small cross-layer transcoder on SmolLM2's own activations and save it.

    python examples/train_and_save.py [OUT_DIR] [--long]

About a minute on a laptop CPU (15,000 training tokens); ``--long`` trains on 100,000 (several minutes).

Text: what ships with Python (help topics and standard-library docstrings). The result is in the
native (circuit-tracer) layout with the metrics in config.yaml, ready for ``tc.push_to_hub(repo)``.
"""

from __future__ import annotations

import sys

from _common import load, tiny

from sparse_clt_hf import CrossLayerTranscoder
from sparse_clt_hf.training import TrainingConfig, format_metrics, python_texts, train_transcoder

#: what is fitted: by default about a minute on a laptop CPU (progress bars show each phase); ``--long``
#: fits on more tokens for a better transcoder (several minutes)
SHORT = dict(layers=[3, 4], n_features=1024, k=32, span=2, tokens=15_000, epochs=2, batch_size=512)
LONG = dict(SHORT, tokens=100_000)


def main(out: str = "smollm2-clt", long: bool = False) -> dict:
    model, tokenizer = load()
    if tiny():
        config = TrainingConfig(layers=[0, 1], n_features=64, k=4, span=2, tokens=1500, eval_tokens=300,
                                seq_len=64, batch_size=256, epochs=1, aux_k=4, progress=False)
    else:
        config = TrainingConfig(**(LONG if long else SHORT))
    transcoder, metrics = train_transcoder(model, tokenizer, python_texts(), config)
    print(format_metrics(metrics))
    transcoder.save_pretrained(out)
    back = CrossLayerTranscoder.from_pretrained(out, decoders=True)
    print(f"saved to {out}: layers {back.layers}, held-out FVU {back.config.metrics['fvu']}")
    return metrics


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--long"]
    main(*args[:1], long="--long" in sys.argv[1:])
