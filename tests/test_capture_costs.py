"""What an attachment adds to each eager decode step, counted in aten ops (issue 10).

Eager decoding of a real model on a GPU is launch-bound: every kernel and every host read the hooks add
per layer per step shows in wall time. A CPU cannot time that, but it can count it: a dispatch mode sees
every aten op, and ``aten._local_scalar_dense`` is every host read of a tensor (``int()``, ``bool()``,
``.item()``). The per-step cost is measured as the difference between generating 16 and 8 tokens, so
what happens once per call (the prefill, the window's encode, the end-of-call check) cancels out, and
compared with the same difference without the attachment.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import transformers
from conftest import random_transcoder
from test_attach import TOP_K, prompts
from tiny_models import tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from sparse_clt_hf import attach_clt

SYNC = "aten._local_scalar_dense.default"


class _CountOps(TorchDispatchMode):
    """Counts aten ops by name; views (no kernel, no memory traffic) apart."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _ops(model, clt, new: int, **extra) -> Counter[str]:
    ids, mask = prompts()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, **extra)
    run = clt.generate if clt is not None else model.generate
    run(**kw)  # warm: buffers, caches, lazy inits
    with _CountOps() as counter:
        run(**kw)
    return counter.ops


def _per_8_steps(model, clt, **extra) -> Counter[str]:
    a, b = _ops(model, clt, 8, **extra), _ops(model, clt, 16, **extra)
    return Counter({k: b[k] - a[k] for k in set(a) | set(b) if b[k] != a[k]})


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_an_eager_decode_step_adds_no_host_read_and_one_write_per_layer(cache):
    """Per decode step the attachment adds one copy into the decode buffer per layer, one counter add and
    (static cache: its length lives on the device) one device-side check of the cache length; no host read.
    The encode runs once per window, so it does not grow with the steps."""
    model = tiny_model("llama")
    layers = model.config.num_hidden_layers
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    plain = _per_8_steps(model, None, **extra)
    with attach_clt(model, random_transcoder(), top_k=TOP_K, window=32) as clt:  # one window per call
        attached = _per_8_steps(model, clt, **extra)
    added = Counter({k: attached[k] - plain[k] for k in set(attached) | set(plain) if attached[k] != plain[k]})
    assert added[SYNC] == 0, f"decode steps read the device from the host: {added}"
    assert added["aten.copy_.default"] == 8 * layers, added
    budget = 8 * (layers + 1 + (2 if cache == "static" else 0))  # copies, the counter, the cache-length check
    assert sum(added.values()) <= budget, f"{sum(added.values())} ops over 8 steps, budget {budget}: {added}"


def test_a_generate_call_reads_the_device_a_fixed_number_of_times():
    """Host reads per call do not depend on its length: the flags of the window checks are read at the end."""
    model = tiny_model("llama")
    with attach_clt(model, random_transcoder(), top_k=TOP_K) as clt:
        short, long = _ops(model, clt, 2)[SYNC], _ops(model, clt, 16)[SYNC]
    plain_short, plain_long = _ops(model, None, 2)[SYNC], _ops(model, None, 16)[SYNC]
    assert long - short == plain_long - plain_short
    assert short - plain_short <= 2, "more than the two checks of a call (start, end) read the device"


def test_the_cache_length_a_static_generate_never_read_is_still_checked():
    """Inside generate a static cache's device-held length is assumed, not read; if it disagrees with what
    the attachment accounted for (here: a cache that claims an extra position), the call raises."""
    from transformers import StaticCache

    from sparse_clt_hf import AlignmentError

    model = tiny_model("llama")
    ids, mask = prompts()
    cls = StaticCache
    with attach_clt(model, random_transcoder(), top_k=TOP_K) as clt:
        clt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                     cache_implementation="static")
        original = cls.get_seq_length

        def off_by_one(self, *a, **k):
            n = original(self, *a, **k)
            return n + 1 if torch.is_tensor(n) and int(n) > 0 else n

        cls.get_seq_length = off_by_one
        try:
            if not torch.is_tensor(original(_a_static_cache(model, ids))) or transformers.__version__ < "5":
                # 4.57 gives the length as generate's cache_position, which this fault does not reach
                pytest.skip("this transformers does not hand the stack a device-held static cache length")
            with pytest.raises(AlignmentError, match="could not follow"):
                clt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                             cache_implementation="static")
        finally:
            cls.get_seq_length = original
        out, feats = clt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                  cache_implementation="static")
        assert feats.num_positions == out.shape[1] - 1


def _a_static_cache(model, ids):
    """A static cache after one forward pass (its length is then initialised)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 4)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    return cache
