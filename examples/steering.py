"""Steer a transcoder feature while generating: clamp it high at every token and compare the text.

    python examples/steering.py ["your prompt"] [LAYER FEATURE VALUE]

Uses SmolLM2-135M-Instruct and the demo transcoder (trained and cached on first use). Without a
feature, it picks the strongest feature of the transcoder's last layer over the unsteered text and
clamps it to 8 times its largest activation there. The steer applies at every forward pass: the
prompt and every decoded token; ``h.remove()`` restores the plain model bit for bit.
"""

from __future__ import annotations

import sys

from _common import load, prompt_inputs, transcoder_for

from sparse_clt_hf import attach_clt


def strongest_feature(features, layer: int) -> tuple[int, float]:
    """(feature, largest activation) of the feature with the largest summed activation at ``layer``."""
    hits = features.top(100_000, layer=layer)
    totals: dict[int, float] = {}
    for h in hits:
        totals[h.feature] = totals.get(h.feature, 0.0) + h.activation
    feature = max(totals, key=totals.__getitem__)
    return feature, max(h.activation for h in hits if h.feature == feature)


def main(prompt: str = "Write one sentence about the sea.", layer: int | None = None, feature: int | None = None,
         value: float | None = None, max_new_tokens: int = 24) -> dict:
    model, tokenizer = load()
    transcoder = transcoder_for(model, tokenizer)
    inputs = prompt_inputs(tokenizer, prompt)
    n_prompt = inputs["input_ids"].shape[1]
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with attach_clt(model, transcoder, top_k=8) as clt:
        plain, plain_feats = clt.generate(**inputs, **kw)
        if layer is None:
            layer = clt.layers[-1]
        if feature is None:
            feature, top = strongest_feature(plain_feats, layer)
            value = 8 * top if value is None else value
        value = 10.0 if value is None else value
        h = clt.steer(layer, feature, value, mode="clamp", positions="all")
        print("steering:", clt.steering)
        steered, feats = clt.generate(**inputs, **kw)
        h.remove()
    texts = {name: tokenizer.decode(out[0, n_prompt:], skip_special_tokens=True)
             for name, out in (("plain", plain), ("steered", steered))}
    print(f"plain:   {texts['plain']!r}")
    print(f"steered: {texts['steered']!r}  (L{layer}/{feature} clamped to {value:.2f})")
    # the record shows the steered run: the feature reads the clamped value at every position
    reads = sorted({round(x.activation, 4) for x in feats.top(100_000, layer=layer) if x.feature == feature})
    print(f"recorded activations of L{layer}/{feature}: {reads}")
    return {"layer": layer, "feature": feature, "value": value, **texts,
            "plain_ids": plain[0].tolist(), "steered_ids": steered[0].tolist(), "reads": reads}


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) >= 4:
        main(args[0], int(args[1]), int(args[2]), float(args[3]))
    else:
        main(*args[:1])
