"""fused_mlp (Triton GEMMs with bias+GELU, gated-residual and GELU-gradient epilogues; CPU interpreter here)
against the PyTorch oracle: forward and all gradients, gated and plain, on both GEMM kernels (persistent TMA and
pointer), determinism, errors, the DiT state_dict, torch.compile."""

import random

import pytest
import torch
import torch.nn.functional as F
from fused_helpers import check_2x, grads_of, poisoned_table, random_index
from helpers import assert_within_2x

from packdit.nn import FusedMLP, ModulatedNorm
from packdit.ops import _triton_utils as tu
from packdit.ops import mlp as mlp_ops
from packdit.ops.mlp import fused_mlp, gelu_tanh_backward
from packdit.reference.dit import Mlp
from packdit.reference.mlp import mlp_reference


def _mlp_inputs(seed, mode, *, d_in=72, hidden=100, d_out=40, bias=True, gated=True, device="cpu"):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    index, num_rows, absent = random_index(rng, mode, device)
    n = index.shape[0]
    return {
        "h": torch.randn(n, d_in, device=device),
        "fc1_weight": torch.randn(hidden, d_in, device=device) / d_in**0.5,
        "fc1_bias": torch.randn(hidden, device=device) if bias else None,
        "fc2_weight": torch.randn(d_out, hidden, device=device) / hidden**0.5,
        "fc2_bias": torch.randn(d_out, device=device) if bias else None,
        "x": torch.randn(n, d_out, device=device) if gated else None,
        "gate": poisoned_table(num_rows, d_out, absent, device=device) if gated else None,
        "index": index if gated else None,
    }


def _diff(inputs):
    return [k for k in ("h", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "x", "gate") if inputs[k] is not None]


class _LaunchSpy:
    """Stands in for a launched kernel (``kernel[grid](...)``) and records the EPILOGUE of every launch."""

    def __init__(self, kernel):
        self.kernel, self.epilogues = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.epilogues.append(kwargs["EPILOGUE"])
            return launch(*args, **kwargs)

        return run


@pytest.fixture
def gemm_launches(monkeypatch):
    """``{"tma": spy, "pointer": spy}`` of the two GEMM kernels."""
    spies = {"tma": _LaunchSpy(mlp_ops._linear_tma_kernel), "pointer": _LaunchSpy(mlp_ops._linear_kernel)}
    monkeypatch.setattr(mlp_ops, "_linear_tma_kernel", spies["tma"])
    monkeypatch.setattr(mlp_ops, "_linear_kernel", spies["pointer"])
    return spies


GELU, BIAS, GATED, GELU_GRAD = (mlp_ops._EPILOGUE_GELU, mlp_ops._EPILOGUE_BIAS, mlp_ops._EPILOGUE_GATED,
                                mlp_ops._EPILOGUE_GELU_GRAD)


# hidden 100 (fp32 rows of 400 bytes) lets TMA describe every operand; hidden 102 (408 bytes, not a multiple of
# 16) sends all three GEMMs to the pointer kernel.
@pytest.mark.parametrize("hidden, kernel", [(100, "tma"), (102, "pointer")])
@pytest.mark.parametrize("gated, bias, mode",
                         [(True, True, "segment"), (True, False, "frame"), (False, True, "segment")])
def test_fused_mlp_matches_oracle(gated, bias, mode, hidden, kernel, gemm_launches):
    inputs = _mlp_inputs(21, mode, bias=bias, gated=gated, hidden=hidden)
    check_2x(fused_mlp, mlp_reference, inputs, _diff(inputs))
    other = "pointer" if kernel == "tma" else "tma"
    # Each of the three GEMMs runs once per pass (check_2x runs the kernel forward and backward once).
    assert gemm_launches[kernel].epilogues == [GELU, GATED if gated else BIAS, GELU_GRAD]
    assert gemm_launches[other].epilogues == []


def test_persistent_gemm_runs_several_tiles_per_program(gemm_launches):
    """More output tiles than programs (4 under the interpreter) and several column blocks: every program walks
    the grouped tile order of the persistent loop, and partial edge tiles meet full ones."""
    rng = random.Random(4)
    lengths = [rng.randint(100, 200) for _ in range(4)] + [1, 0]
    index = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(torch.int32)
    torch.manual_seed(4)
    n, d_in, hidden, d_out = index.shape[0], 64, 300, 136
    inputs = {"h": torch.randn(n, d_in), "fc1_weight": torch.randn(hidden, d_in) / d_in**0.5,
              "fc1_bias": torch.randn(hidden), "fc2_weight": torch.randn(d_out, hidden) / hidden**0.5,
              "fc2_bias": torch.randn(d_out), "x": torch.randn(n, d_out),
              "gate": poisoned_table(len(lengths), d_out, [len(lengths) - 1]), "index": index}
    block_m, block_n = (mlp_ops._TMA_TILE_CONFIGS[0].kwargs[k] for k in ("BLOCK_M", "BLOCK_N"))
    assert -(-n // block_m) * -(-hidden // block_n) > 2 * tu.num_sms(inputs["h"].device)
    check_2x(fused_mlp, mlp_reference, inputs, _diff(inputs))
    assert gemm_launches["tma"].epilogues == [GELU, GATED, GELU_GRAD]


def test_gelu_tanh_backward_matches_torch():
    pre = torch.linspace(-12, 12, 3000).reshape(3, 1000)
    dact = torch.randn_like(pre)
    dpre, act = gelu_tanh_backward(pre, dact)
    act_ref = F.gelu(pre.double(), approximate="tanh")
    dpre_ref = torch.ops.aten.gelu_backward(dact.double(), pre.double(), approximate="tanh")
    assert_within_2x(act, F.gelu(pre, approximate="tanh"), act_ref, floor=1e-7, name="act")
    assert_within_2x(dpre, torch.ops.aten.gelu_backward(dact, pre, approximate="tanh"), dpre_ref, floor=1e-7,
                     name="dpre")


def test_backward_is_deterministic():
    inputs = _mlp_inputs(5, "random")
    first, second = grads_of(fused_mlp, inputs, _diff(inputs)), grads_of(fused_mlp, inputs, _diff(inputs))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_fused_mlp_module_loads_dit_mlp_state_dict():
    torch.manual_seed(0)
    dit_mlp = Mlp(32, 128)
    mlp = FusedMLP(32, 128, backend="triton")
    mlp.load_state_dict(dit_mlp.state_dict())
    h = torch.randn(50, 32)
    torch.testing.assert_close(mlp(h), dit_mlp(h), atol=1e-5, rtol=1e-5)


def test_empty_batch():
    inputs = _mlp_inputs(0, "segment", gated=False)
    h = inputs["h"][:0].requires_grad_()
    out = fused_mlp(h, inputs["fc1_weight"], inputs["fc1_bias"], inputs["fc2_weight"], inputs["fc2_bias"])
    out.sum().backward()
    assert out.shape == (0, 40) and h.grad.shape == (0, 72)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda kw: kw.update(h=kw["h"][:, :10]), "h: expected shape"),
        (lambda kw: kw.update(fc2_weight=kw["fc2_weight"][:, :10]), "fc2_weight: expected shape"),
        (lambda kw: kw.update(fc1_weight=kw["fc1_weight"].double()), "fc1_weight: expected float16"),
        (lambda kw: kw.update(fc1_weight=kw["fc1_weight"].half()), "fc1_weight: expected dtype torch.float32"),
        (lambda kw: kw.update(fc1_bias=kw["fc1_bias"][:3]), "fc1_bias: expected shape"),
        (lambda kw: kw.update(gate=None), "x, gate, index: pass all three"),
        (lambda kw: kw.update(x=kw["x"][:, :3]), "x: expected shape"),
        (lambda kw: kw.update(index=kw["index"] - 1), r"index: values must be in \[0, "),
    ],
)
def test_errors_name_the_argument(change, match):
    kw = _mlp_inputs(1, "segment")
    change(kw)
    with pytest.raises(ValueError, match=match):
        fused_mlp(**kw)


class _MLPBlock(torch.nn.Module):
    """The second half of a DiT block: x + gate * MLP(modulate(norm(x)))."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = ModulatedNorm(width, backend="triton")
        self.mlp = FusedMLP(width, 4 * width, backend="triton")

    def forward(self, x, shift, scale, gate, index):
        return self.mlp(self.norm(x, shift, scale, index), x, gate, index)


def test_module_compiles_fullgraph():
    torch.manual_seed(0)
    block = _MLPBlock(16)
    x = torch.randn(7, 16, requires_grad=True)
    shift, scale, gate = torch.randn(3, 3, 16).unbind(0)
    index = torch.tensor([0, 0, 0, 1, 1, 2, 2], dtype=torch.int32)
    args = (x, shift, scale, gate, index)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    eager_out, out = block(*args), compiled(*args)
    torch.testing.assert_close(out, eager_out)
    g_eager = torch.autograd.grad(eager_out.sum(), [x, *block.parameters()])
    g = torch.autograd.grad(compiled(*args).sum(), [x, *block.parameters()])
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gated", [False, True])
def test_fused_mlp_low_precision_gpu(dtype, gated):
    inputs = _mlp_inputs(3, "segment", d_in=256, hidden=1024, d_out=256, gated=gated, device="cuda")
    check_2x(fused_mlp, mlp_reference, inputs, _diff(inputs), dtype=dtype, floor=2e-2)
