"""Stream features while generating: ``on_step`` is called after every forward pass.

    python examples/streaming_callback.py

The prefill pass reports every prompt position at once; each decode step reports one position
(the token just fed in), so features arrive token by token as text is produced.
"""

from __future__ import annotations

from _common import load, prompt_inputs, transcoder_for

from sparse_clt_hf import Features, attach_clt


def main(prompt: str = "Name three uses of the Python 'with' statement.") -> list[int]:
    model, tokenizer = load()
    transcoder = transcoder_for(model, tokenizer)
    sizes: list[int] = []

    def on_step(features: Features) -> None:
        sizes.append(features.num_positions)
        top = features.positions(features.num_positions - 1).top(1)
        if top:
            hit = top[0]
            print(f"step {len(sizes):>3}: {features.num_positions:>3} new position(s), strongest "
                  f"L{hit.layer}/{hit.feature}={hit.activation:.2f}", flush=True)

    with attach_clt(model, transcoder, top_k=4, on_step=on_step) as clt:
        clt.generate(**prompt_inputs(tokenizer, prompt), max_new_tokens=8, do_sample=False,
                     pad_token_id=tokenizer.pad_token_id)
    return sizes


if __name__ == "__main__":
    main()
