"""Generate text with a transcoder attached and look at the features of every generated token.

    python examples/generate_features.py ["your prompt"]

Uses SmolLM2-135M-Instruct and the demo transcoder (trained and cached on first use).
"""

from __future__ import annotations

import sys

from _common import load, prompt_inputs, transcoder_for

from sparse_clt_hf import attach_clt


def main(prompt: str = "What is a Python dictionary?") -> None:
    model, tokenizer = load()
    transcoder = transcoder_for(model, tokenizer)
    inputs = prompt_inputs(tokenizer, prompt)
    n_prompt = inputs["input_ids"].shape[1]
    with attach_clt(model, transcoder, top_k=8) as clt:
        out, features = clt.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    print(tokenizer.decode(out[0, n_prompt:], skip_special_tokens=True))
    print(features)  # Features(batch=1, positions=..., layers=[...], k=8)
    # Position t holds the features of input token t; generated token s was predicted at position s - 1.
    for s in range(n_prompt, out.shape[1]):
        hits = features.positions(s - 1, s).top(3)
        shown = ", ".join(f"L{h.layer}/{h.feature}={h.activation:.2f}" for h in hits)
        print(f"{tokenizer.decode([int(out[0, s])])!r:>14}  {shown}")
    print("records:", len(features.to_records()), "active (token, layer, feature) entries")


if __name__ == "__main__":
    main(*sys.argv[1:2])
