"""The decode buffer: a static ``[batch, window, d]`` tensor per layer, encoded one window at a time.

Decode steps add one position per pass; encoding each alone would read every encoder matrix once
per token. Site hooks instead copy the activation into this buffer and :meth:`DecodeBuffer.flush`
encodes a whole window in one batched call per layer.

Two ways in, one buffer:

- eager passes write at a Python slot (``buf[:, slot:slot + n].copy_(h)``);
- compiled passes (``torch.compile``, CUDA graphs) run no Python per pass, so they write at the
  column held by a device counter (``index_copy_`` at ``pos % window``) and advance it in place.
  The tensors are made once per batch shape and marked as static addresses, so a compiled decode
  step neither recompiles nor copies them; Python accounts for those steps between passes.

Every pass advances the device counter; a flush compares it with the positions Python accounted
for and raises a device-side flag on a mismatch (a pass the hooks never saw, a window overrun),
read once when the call ends: no host read per pass.
"""

from __future__ import annotations

import math

import torch

from ..errors import AlignmentError

#: Decode window per device type: (rows per batched encode, byte cap of the buffer, all layers together).
#: CPU (2 cores): an encode of 256 rows costs 1.12x per row what one of 1024 rows costs, 512 rows 1.0x
#: (d 576, m 4096-8192), so 512 keeps windowed decoding at the floor. CUDA: a flush is a burst of launches
#: (a few per layer) in a launch-bound decode loop, so fewer, larger windows; memory is plentiful.
WINDOW_TUNING: dict[str, tuple[int, int]] = {"cpu": (512, 64 << 20), "cuda": (8192, 512 << 20)}
DEFAULT_WINDOW_TUNING = (512, 64 << 20)
MAX_WINDOW = 256  # decode steps per window at most (batch 1 on CPU: one batched encode per 256 steps)


class DecodeBuffer:
    """Per-layer static buffers and the per-device position counters that compiled passes use."""

    @torch.inference_mode(False)  # normal tensors: updated in place later, in or out of inference mode
    def __init__(self, layers: list[int], devices: dict[int, torch.device], dtype: torch.dtype, d: int) -> None:
        self.layers = list(layers)
        self.devices = dict(devices)
        self.dtype = dtype
        self.d = d
        self.bufs: dict[int, torch.Tensor] = {}
        self.batch = 0
        self.window = 0
        self.slots = 0  # positions Python accounted for since the last flush
        dev_set = {str(dev): dev for dev in self.devices.values()}
        self.pos = {k: torch.zeros(1, dtype=torch.long, device=dev) for k, dev in dev_set.items()}
        self.bad = {k: torch.zeros(1, dtype=torch.bool, device=dev) for k, dev in dev_set.items()}
        self._ar: dict[str, torch.Tensor] = {}
        for t in (*self.pos.values(), *self.bad.values()):
            _mark_static(t)

    def default_window(self, batch: int) -> int:
        """Decode steps per window for ``batch`` rows on this buffer's device (:data:`WINDOW_TUNING`)."""
        itemsize = torch.finfo(self.dtype).bits // 8
        device = next(iter(self.devices.values()))
        rows, cap = WINDOW_TUNING.get(device.type, DEFAULT_WINDOW_TUNING)
        by_rows = math.ceil(rows / batch)
        by_bytes = cap // max(1, batch * self.d * itemsize * len(self.layers))
        return max(1, min(MAX_WINDOW, by_rows, by_bytes))

    @torch.inference_mode(False)
    def ensure(self, batch: int, window: int) -> None:
        """Buffers for ``batch`` rows and at least ``window`` positions; the same tensors if they fit
        (a compiled step keeps the addresses it was compiled with)."""
        if self.bufs and self.batch == batch and self.window >= window:
            return
        if self.slots:
            raise AlignmentError("internal: the decode buffer was resized while it held unencoded positions")
        self.batch, self.window = batch, window
        self.bufs = {
            layer: torch.empty((batch, window, self.d), dtype=self.dtype, device=self.devices[layer]) for layer in self.layers
        }
        self._ar = {k: torch.arange(window, device=p.device) for k, p in self.pos.items()}
        for t in (*self.bufs.values(), *self._ar.values()):
            _mark_static(t)
        for p in self.pos.values():
            p.zero_()

    # ------------------------------------------------------------------ writes
    def write(self, layer: int, h: torch.Tensor, slot: int) -> None:
        """Eager pass: ``h`` [batch, n, d] into positions ``slot..slot+n``."""
        self.bufs[layer][:, slot : slot + h.shape[1]].copy_(h)

    def write_graph(self, layer: int, h: torch.Tensor) -> None:
        """Compiled pass: ``h`` into the columns the device counter points at (tensor ops only)."""
        buf = self.bufs.get(layer)
        if buf is None:  # no buffer yet (a compiled call before any pass prepared one): lost, so say so
            for flag in self.bad.values():
                flag.fill_(True)
            return
        if h.ndim == 2:
            h = h.view(buf.shape[0], -1, h.shape[-1])
        key = str(buf.device)
        cols = (self.pos[key] + self._ar[key][: h.shape[1]]) % buf.shape[1]
        buf.index_copy_(1, cols, h.to(buf.dtype))

    def advance(self, n: int) -> None:
        """After a pass wrote ``n`` positions into every layer's buffer (eager or compiled)."""
        for p in self.pos.values():
            p.add_(n)

    # ------------------------------------------------------------------ reads
    def take(self, n: int) -> dict[int, torch.Tensor]:
        """The first ``n`` buffered positions of every layer, and reset for the next window.

        Checks (on the device, no host read) that exactly ``n`` positions were written."""
        self.expect(n)
        return {layer: buf[:, :n] for layer, buf in self.bufs.items()}

    def expect(self, n: int) -> None:
        """Raise the device-side flag unless exactly ``n`` positions were written (no host read)."""
        for key, p in self.pos.items():
            self.bad[key].logical_or_(p != n)

    def expect_value(self, value: torch.Tensor, expected: int) -> None:
        """Raise the device-side flag unless the device scalar ``value`` equals ``expected`` (no host read):
        a static cache's length against the positions Python accounted for."""
        flag = self.bad.get(str(value.device))
        if flag is None:  # the cache lives on a device that holds no transcoder layer
            flag = next(iter(self.bad.values()))
        flag.logical_or_((value != expected).to(flag.device, non_blocking=True))

    def reset_counters(self) -> None:
        """Forget what is buffered (a call that raised, or a flush that consumed it)."""
        for p in self.pos.values():
            p.zero_()
        self.slots = 0

    def clear_flags(self) -> None:
        for b in self.bad.values():
            b.zero_()

    def free(self) -> None:
        """Release the buffers' memory (:meth:`ensure` makes them again)."""
        self.reset_counters()
        self.clear_flags()
        self.bufs = {}
        self._ar = {}
        self.batch = self.window = 0

    def check(self, what: str, idle: str | None = None) -> None:
        """Raise if any flush saw a different number of written positions than accounted for; with
        ``idle`` (its message), also if positions were written while Python accounted for none (a
        compiled pass nothing could follow). One host read either way. ``what`` says where; a message
        with a colon is used as it is."""
        flags = list(self.bad.values())
        home = flags[0].device
        code = torch.stack([f.reshape(()).to(home) for f in flags]).any().long()
        if idle is not None and not self.slots:  # (also with no buffer yet: a compiled pass advanced the counter)
            moved = torch.stack([(p != 0).reshape(()).to(home) for p in self.pos.values()]).any()
            code = code + 2 * moved.long()
        found = int(code)  # the one host read
        if not found:
            return
        self.clear_flags()
        if found & 2:
            raise AlignmentError(f"{what}: {idle}")
        if ":" not in what:
            what += (
                ": a forward pass ran that the attachment could not follow (the site hooks and the "
                "step accounting disagree on the number of positions), so its features cannot be aligned"
            )
        raise AlignmentError(what)

    def written(self) -> int:
        """Positions the hooks wrote since the last flush (a host read; for checks outside the hot path)."""
        return int(next(iter(self.pos.values())).item()) if self.pos else 0


def _mark_static(t: torch.Tensor) -> None:
    """Tell dynamo the tensor keeps its address, so CUDA graphs write into it rather than a copy."""
    try:
        torch._dynamo.mark_static_address(t)
    except Exception:  # older torch or a backend without it: correctness does not depend on it
        pass
