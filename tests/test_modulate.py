"""modulated_norm and gated_residual (Triton; CPU interpreter here) against the PyTorch oracles: forward,
all gradients (incl. per-segment dshift/dscale/dgate), random packed layouts with empty and length-1
segments and per-token rows, NaN rows of absent samples, determinism, errors, torch.compile."""

import functools
import random

import pytest
import torch
from fused_helpers import INDEX_MODES, check_2x, grads_of, poisoned_table, random_index

from packdit.nn import AdaLNModulation, GatedResidual, ModulatedNorm
from packdit.nn import functional as PF
from packdit.ops import _triton_utils as tu
from packdit.ops.gated_residual import gated_residual
from packdit.ops.modulate import modulated_norm
from packdit.reference.modulate import gated_residual_reference, modulated_norm_reference

WIDTH = 40  # not a power of two: exercises the column masks


def _norm_inputs(seed: int, mode: str, affine: bool, device="cpu", width=WIDTH):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    index, num_rows, absent = random_index(rng, mode, device)
    n = index.shape[0]
    return {
        "x": torch.randn(n, width, device=device) * 3 + 1,
        "shift": poisoned_table(num_rows, width, absent, device=device),
        "scale": poisoned_table(num_rows, width, absent, scale=0.5, device=device),
        "index": index,
        "weight": torch.randn(width, device=device) if affine else None,
        "bias": torch.randn(width, device=device) if affine else None,
    }


def _norm_fns(norm_type):
    def kernel(**kw):
        return modulated_norm(**kw, norm_type=norm_type)

    def reference(**kw):
        return modulated_norm_reference(**kw, norm_type=norm_type)

    return kernel, reference


@pytest.mark.parametrize("mode", INDEX_MODES)
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("norm_type", ["layer", "rms"])
def test_modulated_norm_matches_oracle(norm_type, affine, mode):
    inputs = _norm_inputs(10 * len(norm_type) + 3 * affine + INDEX_MODES.index(mode), mode, affine)
    diff = ["x", "shift", "scale"] + (["weight", "bias"] if affine else [])
    check_2x(*_norm_fns(norm_type), inputs, diff)


@pytest.mark.parametrize("norm_type", ["layer", "rms"])
def test_modulated_norm_rows_in_exact_chunks(norm_type):
    """Width 48 splits into three 16-column chunks with no masked column (WIDTH = 40 masks the last chunk)."""
    blocks = tu.row_blocks(48)
    assert (blocks.chunk_d, blocks.num_chunks) == (16, 3)
    inputs = _norm_inputs(8, "frame", True, width=48)
    check_2x(*_norm_fns(norm_type), inputs, ["x", "shift", "scale", "weight", "bias"])


@pytest.mark.parametrize("width, chunk_d", [(768, 256), (1152, 128), (2048, 512), (3072, 512), (4096, 512)])
def test_row_blocks_leave_no_idle_lanes_at_model_widths(width, chunk_d, monkeypatch):
    monkeypatch.setattr(tu, "interpreting", lambda: False)  # the GPU's shapes
    for backward in (False, True):
        blocks = tu.row_blocks(width, backward)
        assert (blocks.chunk_d, blocks.chunk_d * blocks.num_chunks) == (chunk_d, width)
        assert blocks.block_m * width // (32 * blocks.num_warps) <= 48  # elements of a row block per thread


@pytest.mark.parametrize("mode", INDEX_MODES)
@pytest.mark.parametrize("num_chunks", [1, 3, 7, 500])
def test_segment_schedule_partitions_tokens_into_balanced_one_row_tiles(mode, num_chunks):
    index, num_rows, _ = random_index(random.Random(num_chunks), mode)
    n = index.shape[0]
    tiles = tu.segment_tiles(index, num_rows, num_chunks)
    order, (row, start, end) = tiles.order.long(), tiles.tiles.long()
    chunk_tiles, tile_offsets = tiles.chunk_tiles.long(), tiles.tile_offsets
    chunk_tokens = -(-n // num_chunks)
    assert tiles.num_chunks == -(-n // chunk_tokens) and tiles.num_tiles == tiles.num_chunks + num_rows
    assert torch.equal(order.sort().values, torch.arange(n))  # a permutation of the tokens
    covered = []
    for c in range(tiles.num_chunks):
        owned = range(int(chunk_tiles[c]), int(chunk_tiles[c + 1]))
        positions = [p for t in owned for p in range(int(start[t]), int(end[t]))]
        # chunk c is exactly its share of the sorted positions, cut into non-empty tiles of one row each
        assert positions == list(range(c * chunk_tokens, min((c + 1) * chunk_tokens, n)))
        for t in owned:
            assert start[t] < end[t] and (index[order[start[t]:end[t]]] == row[t]).all()
        covered += positions
    assert covered == list(range(n))
    live = int(chunk_tiles[-1])
    for r in range(num_rows):  # a row's tiles are consecutive: the fixed order segment_sum adds them in
        mine = [t for t in range(live) if row[t] == r]
        assert mine == list(range(int(tile_offsets[r]), int(tile_offsets[r + 1])))


def test_modulated_norm_absent_rows_get_zero_grad():
    inputs = _norm_inputs(3, "segment", False)
    _, _, dshift, dscale = grads_of(_norm_fns("layer")[0], inputs, ["x", "shift", "scale"])
    absent = torch.isnan(inputs["shift"][:, 0])
    assert absent.any() and (dshift[absent] == 0).all() and (dscale[absent] == 0).all()


def test_modulated_norm_strided_chunks_of_adaln_output():
    """shift/scale as column chunks of one (R, 6D) tensor (row stride 6D), as the DiT block passes them."""
    torch.manual_seed(0)
    index = torch.tensor([0, 0, 0, 1, 2, 2], dtype=torch.int32)
    x = torch.randn(6, 16)
    mod = torch.randn(3, 6 * 16, requires_grad=True)
    shift, scale = mod.chunk(6, dim=1)[:2]
    out = modulated_norm(x, shift, scale, index)
    torch.testing.assert_close(out, modulated_norm_reference(x, shift, scale, index))
    (g,) = torch.autograd.grad(out.square().sum(), mod)
    (g_ref,) = torch.autograd.grad(modulated_norm_reference(x, shift, scale, index).square().sum(), mod)
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("mode", INDEX_MODES)
def test_gated_residual_matches_oracle(mode):
    rng = random.Random(7)
    torch.manual_seed(7)
    index, num_rows, absent = random_index(rng, mode)
    n = index.shape[0]
    inputs = {"x": torch.randn(n, 72), "f": torch.randn(n, 72), "gate": poisoned_table(num_rows, 72, absent),
              "index": index}
    check_2x(gated_residual, gated_residual_reference, inputs, ["x", "f", "gate"])


@pytest.mark.parametrize("mode", ["segment", "random"])
def test_backward_is_deterministic(mode):
    inputs = _norm_inputs(11, mode, True)
    kernel = _norm_fns("layer")[0]
    diff = ["x", "shift", "scale", "weight", "bias"]
    first, second = grads_of(kernel, inputs, diff), grads_of(kernel, inputs, diff)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    gated = {"x": inputs["x"], "f": inputs["x"].flip(0), "gate": inputs["scale"], "index": inputs["index"]}
    first, second = grads_of(gated_residual, gated, ["f", "gate"]), grads_of(gated_residual, gated, ["f", "gate"])
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_torch_fallback_matches_kernels(monkeypatch):
    """Without Triton (CPU, no interpreter) the dispatcher runs the oracle with autograd: same results; an
    explicit request for the kernels says why it cannot run."""
    inputs = _norm_inputs(4, "frame", True)
    diff = ["x", "shift", "scale", "weight", "bias"]
    gated = {"x": inputs["x"], "f": inputs["x"].flip(0), "gate": inputs["scale"], "index": inputs["index"]}

    def both(backend):
        norm = functools.partial(PF.modulated_norm, norm_type="rms", backend=backend)
        residual = functools.partial(PF.gated_residual, backend=backend)
        return grads_of(norm, inputs, diff) + grads_of(residual, gated, ["x", "f", "gate"])

    kernel = both("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for a, b in zip(kernel, both(None)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(PF.BackendUnavailableError, match="not supported because the tensors are on the CPU"):
        both("triton")


def test_adaln_modulation_loads_dit_block_weights():
    from packdit.reference.dit import DiTBlock

    block = DiTBlock(16, 2)
    torch.nn.init.normal_(block.adaLN_modulation[1].weight)
    ada = AdaLNModulation(16, 6)
    ada.load_state_dict(block.adaLN_modulation.state_dict())
    c = torch.randn(3, 16)
    chunks = ada(c)
    assert len(chunks) == 6 and chunks[0].shape == (3, 16)
    torch.testing.assert_close(torch.cat(chunks, dim=1), block.adaLN_modulation(c))


def test_empty_batch():
    x = torch.randn(0, 8, requires_grad=True)
    table = torch.randn(2, 8, requires_grad=True)
    index = torch.zeros(0, dtype=torch.int32)
    out = modulated_norm(x, table, table, index) + gated_residual(x, x, table, index)
    (g,) = torch.autograd.grad(out.sum(), table)
    assert out.shape == (0, 8) and torch.equal(g, torch.zeros_like(table))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda kw: kw.update(x=kw["x"].long()), "x: expected float16"),
        (lambda kw: kw.update(x=kw["x"][:, :5]), "shift: expected shape"),
        (lambda kw: kw.update(scale=kw["scale"][:-1]), "shift, scale"),
        (lambda kw: kw.update(index=kw["index"].long()), "index: expected an int32"),
        (lambda kw: kw.update(index=kw["index"][:-1]), "index: expected shape"),
        (lambda kw: kw.update(index=kw["index"] + 100), r"index: values must be in \[0, "),
        (lambda kw: kw.update(weight=torch.ones(3)), "weight: expected shape"),
        (lambda kw: kw.update(eps=0.0), "eps: expected a positive"),
        (lambda kw: kw.update(norm_type="batch"), "norm_type"),
    ],
)
def test_modulated_norm_errors_name_the_argument(change, match):
    torch.manual_seed(0)
    kw = {"x": torch.randn(5, 8), "shift": torch.randn(2, 8), "scale": torch.randn(2, 8),
          "index": torch.tensor([0, 0, 1, 1, 1], dtype=torch.int32)}
    change(kw)
    with pytest.raises(ValueError, match=match):
        modulated_norm(**kw)


def test_gated_residual_errors_name_the_argument():
    x, gate = torch.randn(4, 8), torch.randn(2, 8)
    index = torch.tensor([0, 1, 1, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="f: expected shape"):
        gated_residual(x, x[:, :4], gate, index)
    with pytest.raises(ValueError, match="gate: expected float16"):
        gated_residual(x, x, gate.double(), index)
    with pytest.raises(ValueError, match=r"index: values must be in \[0, 2\)"):
        gated_residual(x, x, gate, index - 1)


class _AdaLNBlock(torch.nn.Module):
    """norm -> linear -> gated residual, with the modulation from AdaLNModulation."""

    def __init__(self, width: int):
        super().__init__()
        self.ada = AdaLNModulation(width, 3)
        torch.nn.init.normal_(self.ada[1].weight, std=0.1)
        self.norm = ModulatedNorm(width, "rms", elementwise_affine=True, backend="triton")
        self.linear = torch.nn.Linear(width, width)
        self.residual = GatedResidual(backend="triton")

    def forward(self, x, c, index):
        shift, scale, gate = self.ada(c)
        return self.residual(x, self.linear(self.norm(x, shift, scale, index)), gate, index)


def test_modules_compile_fullgraph():
    torch.manual_seed(0)
    block = _AdaLNBlock(16)
    x, c = torch.randn(9, 16, requires_grad=True), torch.randn(3, 16)
    index = torch.tensor([0, 0, 0, 0, 1, 2, 2, 2, 2], dtype=torch.int32)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    eager_out, out = block(x, c, index), compiled(x, c, index)
    torch.testing.assert_close(out, eager_out)
    g_eager = torch.autograd.grad(eager_out.sum(), [x, *block.parameters()])
    g = torch.autograd.grad(compiled(x, c, index).sum(), [x, *block.parameters()])
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm_type", ["layer", "rms"])
def test_modulated_norm_low_precision_gpu(dtype, norm_type):
    inputs = _norm_inputs(5, "frame", True, device="cuda", width=1152)
    check_2x(*_norm_fns(norm_type), inputs, ["x", "shift", "scale", "weight", "bias"], dtype=dtype, floor=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gated_residual_low_precision_gpu(dtype):
    index, num_rows, absent = random_index(random.Random(2), "segment", "cuda")
    n = index.shape[0]
    inputs = {"x": torch.randn(n, 1152, device="cuda"), "f": torch.randn(n, 1152, device="cuda"),
              "gate": poisoned_table(num_rows, 1152, absent, device="cuda"), "index": index}
    check_2x(gated_residual, gated_residual_reference, inputs, ["x", "f", "gate"], dtype=dtype, floor=1e-2)
