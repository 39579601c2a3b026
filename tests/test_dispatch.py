"""The dispatcher's contract (packdit.nn.functional), the same for every op: the automatic choice is made per call
from the tensors' device (the reference on CPU tensors, silently; the kernel on CUDA tensors, or one warning per
reason when it cannot run there); an explicit kernel backend runs or raises saying why; modules and models follow
the choice call by call."""

import warnings

import pytest
import torch
from helpers import assert_close, randomize_

import packdit
from packdit import _backends, _ext, reference
from packdit.nn import AttentionPool, FusedMLP, GatedResidual, ModulatedNorm, PackedAttention
from packdit.nn import functional as PF
from packdit.ops import attention, gated_residual, mlp, modulate, patchify

KERNELS = [(attention, "varlen_attention"), (modulate, "modulated_norm"), (gated_residual, "gated_residual"),
           (mlp, "fused_mlp"), (patchify, "patchify"), (patchify, "unpatchify")]
TINY = dict(input_size=8, patch_size=(1, 2, 2), in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10,
            learn_sigma=False, class_dropout_prob=0.0, qk_norm=True, attention="spatial_temporal")


def _no_kernels(monkeypatch):
    """Every kernel entry point raises if called."""
    for module, name in KERNELS:
        def boom(*args, _name=name, **kwargs):
            raise AssertionError(f"the {_name} kernel ran")
        monkeypatch.setattr(module, name, boom)


def _norm_inputs():
    torch.manual_seed(0)
    x, table = torch.randn(6, 8), torch.randn(2, 8)
    return x, table, torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.int32)


def test_automatic_choice_on_cpu_is_the_reference_without_a_warning(monkeypatch):
    _no_kernels(monkeypatch)
    x, table, index = _norm_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(PF.modulated_norm(x, table, table, index),
                           reference.modulated_norm_reference(x, table, table, index))
        assert torch.equal(PF.gated_residual(x, x, table, index),
                           reference.gated_residual_reference(x, x, table, index))
        q = torch.randn(6, 2, 8)
        cu = torch.tensor([0, 3, 6], dtype=torch.int32)
        assert torch.equal(packdit.varlen_attention(q, q, q, cu, 3), reference.varlen_attention(q, q, q, cu))
        latent = torch.randn(2, 4, 4)
        tokens, seqs = packdit.pack([latent], 2)
        assert torch.equal(packdit.unpack(tokens, seqs, 2)[0], latent)


def test_explicit_kernels_raise_saying_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, table, index = _norm_inputs()
    why = "not supported because the tensors are on the CPU and TRITON_INTERPRET=1 is not set"
    with pytest.raises(PF.BackendUnavailableError, match=f"modulated_norm: backend='triton' is {why}"):
        PF.modulated_norm(x, table, table, index, backend="triton")
    with pytest.raises(PF.BackendUnavailableError, match=f"gated_residual: backend='triton' is {why}"):
        PF.gated_residual(x, x, table, index, backend="triton")
    with pytest.raises(PF.BackendUnavailableError, match=f"fused_mlp: backend='triton' is {why}"):
        PF.fused_mlp(x, torch.randn(4, 8), None, torch.randn(8, 4), None, backend="triton")
    q = torch.randn(6, 2, 8)
    with pytest.raises(PF.BackendUnavailableError, match=f"varlen_attention: backend='triton' is {why}"):
        PF.varlen_attention(q, q, q, torch.tensor([0, 6], dtype=torch.int32), 6, backend="triton")
    _, seqs = packdit.pack([torch.randn(2, 4, 4)], 2)
    with pytest.raises(PF.BackendUnavailableError, match="patchify: backend='cuda' is not supported because the "
                                                         "tensors are on cpu"):
        PF.patchify([torch.randn(2, 4, 4)], seqs.cu_seqlens, seqs.segment_ids, None, (1, 2, 2), backend="cuda")
    with pytest.raises(ValueError, match="modulated_norm runs on 'triton' or 'torch'"):
        PF.modulated_norm(x, table, table, index, backend="cuda")
    with pytest.raises(ValueError, match="backend: modulated_norm runs on 'triton' or 'torch'"):
        ModulatedNorm(8, backend="cuda")


def test_modules_refuse_an_unavailable_kernel_alike(monkeypatch):
    """A module asked for the Triton kernels fails the same way in every op, attention included."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _, seqs = packdit.pack([torch.randn(2, 2, 4, 4)], (1, 2, 2))
    x, index = torch.randn(seqs.num_tokens, 16), seqs.segment_ids
    table = torch.randn(1, 16)
    calls = [lambda: PackedAttention(16, 2, backend="triton")(x, seqs),
             lambda: FusedMLP(16, 32, backend="triton")(x),
             lambda: ModulatedNorm(16, backend="triton")(x, table, table, index),
             lambda: GatedResidual(backend="triton")(x, x, table, index),
             lambda: AttentionPool(16, 2, backend="triton")(x, seqs)]
    for call in calls:
        with pytest.raises(PF.BackendUnavailableError, match="not supported because"):
            call()


def test_fallback_on_cuda_tensors_warns_once_per_reason(monkeypatch):
    monkeypatch.setattr(PF, "_warned", set())
    monkeypatch.setattr(_backends, "_TRITON_INSTALLED", False)
    monkeypatch.setattr(_ext, "load", lambda: object())  # an extension built without CUDA kernels
    monkeypatch.setattr(_ext, "has_cuda_ext", lambda: False)
    cuda = torch.device("cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for op in ("modulated_norm", "fused_mlp", "varlen_attention", "modulated_norm", "patchify", "unpatchify"):
            assert not PF.use_kernel(op, cuda, None)
        assert not PF.use_kernel("modulated_norm", torch.device("cpu"), None)
        monkeypatch.setattr(_ext, "load", lambda: None)  # no extension: packdit._ext has warned once itself
        assert not PF.use_kernel("patchify", cuda, None)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2, messages
    assert "triton kernels are not supported because the triton package is not installed" in messages[0]
    assert "cuda kernels are not supported because packdit._C was built without CUDA kernels" in messages[1]
    with pytest.raises(PF.BackendUnavailableError, match="the triton package is not installed"):
        PF.use_kernel("fused_mlp", cuda, "triton")
    with pytest.raises(PF.BackendUnavailableError, match="packdit._C is not available"):
        PF.use_kernel("patchify", cuda, "cuda")


def test_a_model_built_for_a_gpu_runs_cpu_tensors_on_the_reference(monkeypatch):
    """The choice is not frozen at construction: a model built where CUDA is available, called with CPU
    tensors, runs every op on the reference, like a model built with backend='torch'."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    torch.manual_seed(0)
    model = randomize_(packdit.DiT(**TINY), std=0.2).eval()
    monkeypatch.undo()
    reference_model = packdit.DiT(**TINY, backend="torch").eval()
    reference_model.load_state_dict(model.state_dict())
    latents = [torch.randn(4, 2, 4, 6), torch.randn(4, 6, 2)]
    t, y = torch.tensor([10.0, 500.0]), torch.tensor([1, 2])
    want = reference_model(latents, t, y)
    _no_kernels(monkeypatch)
    for a, b in zip(model(latents, t, y), want):
        assert_close(a, b, atol=0, rtol=0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(PF.BackendUnavailableError, match="not supported because"):
        packdit.DiT(**TINY, backend="triton")(latents, t, y)


def _mlp_inputs(d: int = 16, hidden: int = 32, rows: int = 6):
    """fp32 h, fc1/fc2 weights and biases, x, gate (2 rows), index: what a model under autocast hands the MLP."""
    torch.manual_seed(0)
    h, x = torch.randn(rows, d), torch.randn(rows, d)
    weights = [torch.randn(hidden, d) * d**-0.5, torch.randn(hidden) * 0.1, torch.randn(d, hidden) * hidden**-0.5,
               torch.randn(d) * 0.1]
    return h, weights, x, torch.randn(2, d), torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.int32)


def test_fused_mlp_under_autocast_gets_the_gemm_operands_in_the_autocast_dtype(monkeypatch):
    """Mixed precision keeps fp32 parameters beside bf16 activations; the fused GEMM takes one dtype, so under
    autocast the dispatcher casts its operands (h, weights, biases, the residual x) as F.linear would, on both
    backends; the gate table, read row by row in fp32, is left as it is."""
    h, weights, x, gate, index = _mlp_inputs()
    seen = {}

    def kernel(*args):
        seen.update(zip(["h", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "x", "gate"], args))
        return args[0]

    monkeypatch.setattr(mlp, "fused_mlp", kernel)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        PF.fused_mlp(h, *weights, x, gate, index, backend="triton")
        got = PF.fused_mlp(h, *weights, x, gate, index, backend="torch")
    assert {name: t.dtype for name, t in seen.items()} == {
        **{name: torch.bfloat16 for name in ["h", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "x"]},
        "gate": torch.float32}
    bf16 = [t.to(torch.bfloat16) for t in (h, *weights, x)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = reference.mlp_reference(*bf16, gate, index)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want.to(torch.bfloat16))
    PF.fused_mlp(h, *weights, x, gate, index, backend="triton")  # autocast off: no cast
    assert all(t.dtype == torch.float32 for t in seen.values())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_kernel_model_trains_under_autocast_with_fp32_parameters(device):
    """A DiT on its kernels (on the CPU: the Triton interpreter) in a bf16 autocast region with fp32 parameters,
    as AMP training runs it: the forward and backward run and every gradient is finite (the fused MLP used to
    refuse fp32 weights beside bf16 activations)."""
    model = randomize_(packdit.DiT(**{**TINY, "depth": 1}, backend="triton"), std=0.2).eval().to(device)
    latents = [torch.randn(4, 2, 4, 6, device=device), torch.randn(4, 6, 2, device=device)]
    tokens, seqs = packdit.pack(latents, TINY["patch_size"])
    with torch.autocast(device, dtype=torch.bfloat16):
        out = model.forward_packed(tokens, seqs, torch.tensor([10.0, 500.0], device=device),
                                   torch.tensor([1, 2], device=device))
        loss = out.float().square().mean()
    loss.backward()
    assert out.dtype == torch.bfloat16
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
