"""Stream features while generating: ``on_step`` is called after every forward pass.

    python examples/streaming_callback.py

The prefill pass reports every prompt position at once; each decode step reports one position: the
token just fed in, i.e. the previous step's output. So the text streams token by token, each with the
strongest feature the model computed while reading it. The last generated token is never fed back
(generate stops after sampling it), so it is printed after the loop.
"""

from __future__ import annotations

import json

from _common import load, prompt_inputs, transcoder_for

from sparse_clt_hf import Features, attach_clt


def main(prompt: str = "Name three uses of the Python 'with' statement.") -> list[int]:
    model, tokenizer = load()
    transcoder = transcoder_for(model, tokenizer)
    sizes: list[int] = []

    def on_step(features: Features) -> None:
        sizes.append(features.num_positions)
        top = features.positions(features.num_positions - 1).top(1)
        strongest = f"L{top[0].layer}/{top[0].feature}={top[0].activation:.2f}" if top else "-"
        if len(sizes) == 1:
            print(f"prompt: {features.num_positions} positions, strongest at the last one {strongest}", flush=True)
            return
        token = tokenizer.decode([int(features.token_ids[0, -1])])
        print(f"step {len(sizes) - 1:>3}: {json.dumps(token):<16} strongest {strongest}", flush=True)

    inputs = prompt_inputs(tokenizer, prompt)
    with attach_clt(model, transcoder, top_k=4, on_step=on_step) as clt:
        out, _ = clt.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    sequence = out if not hasattr(out, "sequences") else out.sequences
    generated = sequence[0, inputs["input_ids"].shape[1]:]
    print(f"last token (not fed back): {json.dumps(tokenizer.decode([int(generated[-1])]))}")
    print(f"text: {tokenizer.decode(generated)}")
    return sizes


if __name__ == "__main__":
    main()
