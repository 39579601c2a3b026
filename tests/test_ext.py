"""Native extension packdit._C: layout_positions against the PyTorch fallback, input checks,
torch.compile, and the CUDA kernel (on machines with a GPU)."""

import importlib
import os
import random
import shutil
import sys
import types
import warnings

import pytest
import torch

from packdit import _ext
from packdit.layout_positions import _layout_positions_torch, layout_positions
from packdit.reference import layout_positions_reference as expected_positions

lp = importlib.import_module("packdit.layout_positions")  # the module, even if re-exported as a name


def random_layout(rng: random.Random, device="cpu", drop: bool = False):
    """Random packed layout with empty, length-1 and larger samples; with ``drop``, each sample keeps
    a sorted random subset of its raster indices."""
    grids, lengths, index = [], [], []
    for _ in range(rng.randint(1, 12)):
        kind = rng.random()
        if kind < 0.15:
            g = (rng.randint(0, 2), 0, rng.randint(0, 3))  # empty grid
        elif kind < 0.3:
            g = (1, 1, 1)
        else:
            g = (rng.randint(1, 4), rng.randint(1, 7), rng.randint(1, 9))
        full = g[0] * g[1] * g[2]
        if drop:
            kept = sorted(rng.sample(range(full), rng.randint(0, full)))
        else:
            kept = list(range(full))
        grids.append(g)
        lengths.append(len(kept))
        index.extend(kept)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    cu_seqlens = torch.tensor(cu, dtype=torch.int32, device=device)
    grid = torch.tensor(grids, dtype=torch.int32, device=device)
    token_index = torch.tensor(index, dtype=torch.int32, device=device) if drop else None
    return cu_seqlens, grid, token_index, cu[-1]


@pytest.fixture
def ext():
    mod = _ext.load()
    if mod is None:
        if os.environ.get("PACKDIT_REQUIRE_EXT") == "1":  # set by `make test`: the build must have produced it
            pytest.fail("packdit._C failed to load but PACKDIT_REQUIRE_EXT=1")
        pytest.skip("packdit._C not available (build it with `pip install -e .`)")
    return mod


@pytest.fixture
def no_ext(monkeypatch):
    monkeypatch.setattr(_ext, "load", lambda: None)


@pytest.mark.parametrize("drop", [False, True], ids=["raster", "token_index"])
def test_cpu_ext_matches_torch(ext, drop):
    rng = random.Random(1234 + drop)
    for _ in range(50):
        cu_seqlens, grid, token_index, n = random_layout(rng, drop=drop)
        seg, pos = layout_positions(cu_seqlens, grid, token_index, n)
        ref_seg, ref_pos = _layout_positions_torch(cu_seqlens, grid, token_index, n)
        assert seg.dtype == pos.dtype == torch.int32
        assert seg.shape == (n,) and pos.shape == (n, 3)
        torch.testing.assert_close(seg, ref_seg, rtol=0, atol=0)
        torch.testing.assert_close(pos, ref_pos, rtol=0, atol=0)


def test_torch_matches_python_loop():
    rng = random.Random(7)
    for drop in (False, True):
        for _ in range(20):
            args = random_layout(rng, drop=drop)
            for got, want in zip(_layout_positions_torch(*args), expected_positions(*args)):
                torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("drop", [False, True], ids=["raster", "token_index"])
def test_fallback_without_ext(no_ext, drop):
    rng = random.Random(99 + drop)
    for _ in range(20):
        args = random_layout(rng, drop=drop)
        for got, want in zip(layout_positions(*args), expected_positions(*args)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_implementation_name(ext, monkeypatch):
    cpu = torch.zeros(1, dtype=torch.int32)
    assert lp.implementation(cpu) == "cpp"
    monkeypatch.setattr(_ext, "load", lambda: None)
    assert lp.implementation(cpu) == "torch"


def test_empty_batch(ext):
    cu = torch.zeros(1, dtype=torch.int32)
    grid = torch.zeros(0, 3, dtype=torch.int32)
    seg, pos = layout_positions(cu, grid, None, 0)
    assert seg.shape == (0,) and pos.shape == (0, 3)


def test_disable_env_returns_none(monkeypatch):
    monkeypatch.setenv("PACKDIT_DISABLE_EXT", "1")
    assert _ext.load() is None
    assert not _ext.has_cuda_ext()


@pytest.mark.parametrize("broken", ["missing", "abi"])
def test_load_warns_once(monkeypatch, broken):
    import packdit

    monkeypatch.delenv("PACKDIT_DISABLE_EXT", raising=False)
    monkeypatch.setattr(_ext, "_module", _ext._UNSET)
    monkeypatch.delattr(packdit, "_C", raising=False)
    fake = None if broken == "missing" else types.SimpleNamespace(ABI_VERSION=_ext.ABI_VERSION + 1)
    monkeypatch.setitem(sys.modules, "packdit._C", fake)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _ext.load() is None
        assert _ext.load() is None
        assert not _ext.has_cuda_ext()
    assert len(caught) == 1
    assert "packdit: native extension packdit._C not available" in str(caught[0].message)
    assert "using the PyTorch fallback" in str(caught[0].message)


def _good_inputs():
    cu = torch.tensor([0, 4, 6], dtype=torch.int32)
    grid = torch.tensor([[1, 2, 2], [1, 1, 2]], dtype=torch.int32)
    return cu, grid, torch.arange(6, dtype=torch.int32) % 4


@pytest.mark.parametrize(
    "case, name",
    [
        ("cu_int64", "cu_seqlens"),
        ("grid_int64", "grid"),
        ("token_index_int64", "token_index"),
        ("grid_noncontig", "grid"),
        ("token_index_noncontig", "token_index"),
        ("grid_device", "grid"),
        ("token_index_device", "token_index"),
        ("grid_shape", "grid"),
        ("token_index_shape", "token_index"),
    ],
)
def test_bad_inputs_raise(case, name):
    cu, grid, ti = _good_inputs()
    n = 6
    if case == "cu_int64":
        cu = cu.long()
    elif case == "grid_int64":
        grid = grid.long()
    elif case == "token_index_int64":
        ti = ti.long()
    elif case == "grid_noncontig":
        grid = grid.t().contiguous().t()
    elif case == "token_index_noncontig":
        ti = (torch.arange(12, dtype=torch.int32) % 4)[::2]
    elif case == "grid_device":
        grid = grid.to("meta")
    elif case == "token_index_device":
        ti = ti.to("meta")
    elif case == "grid_shape":
        grid = grid[:1].contiguous()
    elif case == "token_index_shape":
        ti = ti[:5]
    with pytest.raises(ValueError, match=name):
        layout_positions(cu, grid, ti, n)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(backend):
    def f(cu_seqlens, grid, token_index, n):
        seg, pos = layout_positions(cu_seqlens, grid, token_index, n)
        return seg * 2, pos.sum(dim=1)

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    rng = random.Random(5)
    for drop in (False, True):
        args = random_layout(rng, drop=drop)
        for got, want in zip(compiled(*args), f(*args)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("drop", [False, True], ids=["raster", "token_index"])
def test_cuda_kernel_matches_torch(drop):
    if not _ext.has_cuda_ext():
        pytest.skip("packdit._C was built without CUDA (or is missing)")
    rng = random.Random(4321 + drop)
    for _ in range(20):
        cu_seqlens, grid, token_index, n = random_layout(rng, device="cuda", drop=drop)
        seg, pos = layout_positions(cu_seqlens, grid, token_index, n)
        ref_seg, ref_pos = _layout_positions_torch(cu_seqlens, grid, token_index, n)
        assert seg.is_cuda and pos.is_cuda
        torch.testing.assert_close(seg, ref_seg, rtol=0, atol=0)
        torch.testing.assert_close(pos, ref_pos, rtol=0, atol=0)
    # Large batch: many blocks, grid-stride loop, non-default stream.
    grid = torch.tensor([[3, 64, 64]] * 300 + [[1, 1, 1]], dtype=torch.int32, device="cuda")
    lengths = (grid.prod(dim=1)).tolist()
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    n = sum(lengths)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        seg, pos = layout_positions(cu, grid, None, n)
        ref_seg, ref_pos = _layout_positions_torch(cu, grid, None, n)
    stream.synchronize()
    assert torch.equal(seg, ref_seg) and torch.equal(pos, ref_pos)


@pytest.mark.skipif(shutil.which("nvcc") is None or os.environ.get("PACKDIT_NO_CUDA") == "1",
                    reason="nvcc not on PATH: the extension is built without CUDA")
def test_cuda_kernels_were_compiled_where_nvcc_exists(ext):
    """Where nvcc exists (CI included) the CUDA sources must have been compiled, so they cannot rot."""
    assert ext.WITH_CUDA, "nvcc is on PATH but packdit._C was built without CUDA"
    assert {"80", "90"} <= set(ext.CUDA_ARCHS.split(";")), ext.CUDA_ARCHS
