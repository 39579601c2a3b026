"""A training step of the packed DiT reads nothing back from the device (no device->host sync) once the batch
is packed, with ``packdit.checks(False)``.

On a GPU ``torch.cuda.set_sync_debug_mode("error")`` makes every synchronizing CUDA call raise. Without a GPU,
:class:`HostReadGuard` stands in for it: a ``TorchFunctionMode`` that fails on every Python-level read of tensor
values (``.item()``, ``.tolist()``, ``.numpy()``, ``.cpu()``, ``bool(t)``, ``int(t)``, ``nonzero``, boolean-mask
indexing, ``repeat_interleave`` without ``output_size``...), which on a GPU would each wait for the device.
Tensor reads inside the Triton interpreter are allowed: there they stand for the kernels running on the device.
The guard is itself tested below (it must catch each kind of read it claims to).
"""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

import packdit
from packdit.models.dit import DiT

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.__bool__,
          torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.__array__,
          torch.Tensor.nonzero, torch.nonzero, torch.Tensor.argwhere, torch.argwhere, torch.masked_select,
          torch.Tensor.masked_select, torch.unique, torch.Tensor.unique, torch.unique_consecutive,
          torch.Tensor.unique_consecutive}
_INTERPRETER = "triton/runtime/interpreter.py"


def _bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class HostReadGuard(TorchFunctionMode):
    """Raise ``AssertionError`` on a host read of tensor values made outside the Triton interpreter."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reads = (func in _READS
                 or (func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and _bool_index(args[1]))
                 or (func in (torch.repeat_interleave, torch.Tensor.repeat_interleave) and len(args) > 1
                     and isinstance(args[1], torch.Tensor) and kwargs.get("output_size") is None))
        if reads and not self._on_device():
            caller = sys._getframe(1)
            raise AssertionError(f"host read of a tensor: {getattr(func, '__qualname__', func)} at "
                                 f"{caller.f_code.co_filename}:{caller.f_lineno}")
        return func(*args, **kwargs)

    @staticmethod
    def _on_device() -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_code.co_filename.endswith(_INTERPRETER):
                return True
            frame = frame.f_back
        return False


@pytest.mark.parametrize("read", [
    lambda t: t.sum().item(), lambda t: t.tolist(), lambda t: bool(t.any()), lambda t: int(t[0]),
    lambda t: t.nonzero(), lambda t: t[t > 0], lambda t: torch.repeat_interleave(t, t), lambda t: range(t[1]),
    lambda t: t.cpu(), lambda t: float(t[0]),
])
def test_the_guard_catches_host_reads(read):
    t = torch.arange(4, device=DEVICE)
    with pytest.raises(AssertionError, match="host read"), HostReadGuard():
        read(t)


def test_the_guard_lets_device_work_pass():
    t = torch.arange(4, device=DEVICE)
    with HostReadGuard():
        torch.repeat_interleave(t, t, output_size=6)
        (t * 2).sum().add_(1)


def _model(**options) -> DiT:
    torch.manual_seed(0)
    depth = 2 if options.get("attention") == "spatial_temporal" else 1  # one spatial and one temporal block
    model = DiT(input_size=8, patch_size=(1, 2, 2), in_channels=4, hidden_size=48, depth=depth, num_heads=2,
                learn_sigma=False, backend="triton", **options).to(DEVICE)
    for p in model.parameters():  # adaLN-Zero starts as the identity: make every layer do work
        torch.nn.init.normal_(p, std=0.05)
    return model


@contextlib.contextmanager
def _no_device_reads():
    """On a GPU: every synchronizing CUDA call raises; on the CPU: :class:`HostReadGuard`."""
    if DEVICE.type != "cuda":
        with HostReadGuard():
            yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _step(model: DiT, latents: list[torch.Tensor], guarded: bool) -> None:
    tokens, seqs = packdit.pack(latents, (1, 2, 2))  # packing reads host shapes: it is not part of the step
    t = torch.rand(len(latents), device=DEVICE) * 1000
    y = torch.arange(len(latents), device=DEVICE) % 10
    with packdit.checks(False), _no_device_reads() if guarded else contextlib.nullcontext():
        out = model.forward_packed(tokens, seqs, t, y)
        out.square().mean().backward()


def _latents(shapes) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(len(shapes))
    return [torch.randn(*shape, generator=g).to(DEVICE) for shape in shapes]


# Each layout below is new to the model (a new PackedSeqs): its attention schedule is built inside the step.
WARMUP = [(4, 3, 6, 8), (4, 8, 6), (4, 1, 2, 2)]
STEP = [(4, 2, 4, 6), (4, 6, 8), (4, 4, 8), (4, 5, 2, 4), (4, 2, 2)]


@pytest.mark.parametrize("options", [
    dict(),
    dict(pos_embed="rope3d", qk_norm=True, attention="spatial_temporal"),
], ids=["full", "rope-qknorm-spatial-temporal"])
def test_dit_training_step_reads_nothing_back(options):
    model = _model(**options)
    _step(model, _latents(WARMUP), guarded=False)  # warm-up (on a GPU: autotuning, which synchronizes)
    _step(model, _latents(STEP if DEVICE.type == "cpu" else WARMUP), guarded=True)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_plain_cu_seqlens_attention_reads_nothing_back_without_checks():
    """varlen_attention with plain cu_seqlens (no layout) takes the device-built schedule inside checks(False)."""
    cu = torch.tensor([0, 5, 5, 17, 18], dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(18, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    with packdit.checks(False), _no_device_reads():
        out = packdit.varlen_attention(q, k, v, cu, 12, backend="triton")
        out.sum().backward()
