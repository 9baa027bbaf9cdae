"""Tiny random models of every supported architecture, built from configs (no downloads)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as tf

D = 32  # hidden size of every tiny model
N_LAYERS = 3
VOCAB = 128


def _llama_kwargs() -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )


def _text(config_cls: str, model_cls: str, **extra) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        cfg = getattr(tf, config_cls)(**{**_llama_kwargs(), **extra})
        return getattr(tf, model_cls)(cfg)

    return build


def _gpt2() -> torch.nn.Module:
    cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=N_LAYERS, n_head=4, n_positions=128, pad_token_id=0, bos_token_id=2, eos_token_id=1
    )
    return tf.GPT2LMHeadModel(cfg)


def _gpt_neox(parallel: bool = True) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        cfg = tf.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=D,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=128,
            use_parallel_residual=parallel,
            pad_token_id=0,
        )
        return tf.GPTNeoXForCausalLM(cfg)

    return build


def _opt() -> torch.nn.Module:
    cfg = tf.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        ffn_dim=64,
        max_position_embeddings=128,
        word_embed_proj_dim=D,
        pad_token_id=0,
    )
    return tf.OPTForCausalLM(cfg)


def _gemma3_cg() -> torch.nn.Module:
    text = tf.Gemma3TextConfig(**{**_llama_kwargs(), "head_dim": 8, "sliding_window": 16})
    vision = tf.SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4
    )
    cfg = tf.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4)
    return tf.Gemma3ForConditionalGeneration(cfg)


def _llava() -> torch.nn.Module:
    vision = tf.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4
    )
    cfg = tf.LlavaConfig(text_config=tf.LlamaConfig(**_llama_kwargs()).to_dict(), vision_config=vision.to_dict())
    return tf.LlavaForConditionalGeneration(cfg)


def _qwen2_vl() -> torch.nn.Module:
    text = {**_llama_kwargs(), "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}}
    vision = dict(depth=1, embed_dim=16, hidden_size=D, num_heads=2, patch_size=2, spatial_merge_size=1)
    cfg = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **text)
    return tf.Qwen2VLForConditionalGeneration(cfg)


TINY_MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "llama": _text("LlamaConfig", "LlamaForCausalLM"),
    "mistral": _text("MistralConfig", "MistralForCausalLM"),
    "qwen2": _text("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": _text("Qwen3Config", "Qwen3ForCausalLM", head_dim=8),
    "gemma": _text("GemmaConfig", "GemmaForCausalLM", head_dim=8),
    "gemma2": _text("Gemma2Config", "Gemma2ForCausalLM", head_dim=8, sliding_window=16),
    "gemma3_text": _text("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=8, sliding_window=16),
    "gemma3": _gemma3_cg,
    "phi3": _text("Phi3Config", "Phi3ForCausalLM"),
    "olmo2": _text("Olmo2Config", "Olmo2ForCausalLM"),
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox(True),
    "gpt_neox_sequential": _gpt_neox(False),
    "opt": _opt,
    "llava": _llava,
    "qwen2_vl": _qwen2_vl,
}


def tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model in eval mode, fp32, deterministic for a seed."""
    torch.manual_seed(seed)
    model = TINY_MODELS[name]().eval()
    if model.generation_config is not None:
        model.generation_config.pad_token_id = 0
    return model


#: the chat template of :func:`char_tokenizer` (``<content>`` per message)
CHAR_CHAT_TEMPLATE = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"


def char_tokenizer(*, full_vocab: bool = False, chat_template: str | None = CHAR_CHAT_TEMPLATE):
    """A saveable fast tokenizer, one token per character: <pad>/<eos>/<bos> = 0/1/2, the printable ASCII
    characters 3..97 and, with ``full_vocab``, 30 more (up to the tiny models' vocabulary of 128). No special
    tokens are added when encoding."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(32 + i) for i in range(95)] + ([chr(0xC0 + i) for i in range(30)] if full_vocab else [])
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{c: 3 + i for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>")
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast
