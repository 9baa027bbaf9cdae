"""Shared by the examples: load SmolLM2 (default) or, with ``SPARSE_CLT_HF_EXAMPLE_TINY=1``, a tiny
random Llama with a one-character-per-token tokenizer (used by the tests, runs in seconds)."""

from __future__ import annotations

import os

TINY_ENV = "SPARSE_CLT_HF_EXAMPLE_TINY"


class CharTokenizer:
    """Minimal tokenizer for the tiny random model: one id per character."""

    eos_token_id = 1
    pad_token_id = 0
    bos_token_id = 2
    all_special_ids = [0, 1, 2]
    chat_template = None

    def __call__(self, text, add_special_tokens=False, verbose=False, return_tensors=None):
        import torch

        ids = [3 + ord(c) % 120 for c in text]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + (int(i) - 3) % 26) for i in ids)


def tiny() -> bool:
    return os.environ.get(TINY_ENV, "") not in ("", "0")


def load():
    """(model, tokenizer): SmolLM2-135M-Instruct, or the tiny random model when TINY_ENV is set."""
    if tiny():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          pad_token_id=0, eos_token_id=1, bos_token_id=2)
        return LlamaForCausalLM(cfg).eval(), CharTokenizer()
    from sparse_clt_hf.demo import load_model

    model, tokenizer, _ = load_model(None)
    return model, tokenizer


def prompt_inputs(tokenizer, prompt: str):
    from sparse_clt_hf.demo import chat_input

    return chat_input(tokenizer, prompt)


def transcoder_for(model, tokenizer):
    """The demo transcoder for SmolLM2 (trained on first use), or a freshly trained tiny one."""
    if tiny():
        from sparse_clt_hf.training import TrainingConfig, python_texts, train_transcoder

        cfg = TrainingConfig(layers=[0, 1], n_features=64, k=4, span=2, tokens=1500, eval_tokens=300,
                             seq_len=64, batch_size=256, epochs=1, aux_k=4, progress=False)
        return train_transcoder(model, tokenizer, python_texts(), cfg)[0]
    from sparse_clt_hf.demo import ensure_demo_transcoder

    return str(ensure_demo_transcoder(model, tokenizer)[0])
