"""Validation layer: bad layouts are named precisely; checks can be turned off; they run once per layout."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import packdit
from packdit import _validate, checkpoint
from packdit._validate import validate_cu_seqlens, validate_seqs


def _seqs():
    _, seqs = packdit.pack([torch.zeros(2, 2, 4, 4), torch.zeros(2, 2, 2), torch.zeros(2, 1, 2, 6)], (1, 2, 2))
    return dataclasses.replace(seqs)  # a copy with an empty cache: not "valid by construction"


def _broken(**fields):
    return dataclasses.replace(_seqs(), **fields)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(cu_seqlens=torch.tensor([0, 8, 7, 12], dtype=torch.int32)), r"segment 1 has negative length"),
        (dict(cu_seqlens=torch.tensor([0, 8, 9, 13], dtype=torch.int32)), r"cu_seqlens\[-1\] = 12"),
        (dict(cu_seqlens=torch.tensor([1, 8, 9, 12], dtype=torch.int32)), r"cu_seqlens\[0\] = 0"),
        (dict(cu_seqlens=torch.tensor([0, 8, 9, 12])), r"seqs.cu_seqlens: expected dtype int32"),
        (dict(cu_seqlens=torch.tensor([0, 7, 9, 12], dtype=torch.int32), max_seqlen=7),
         r"segment 0 has 7 tokens but its grid"),
        (dict(max_seqlen=5), r"max_seqlen: expected the int 8"),
        (dict(max_seqlen=8.0), r"max_seqlen: expected the int 8 \(the longest segment\), got 8.0"),
        (dict(sample_ndims=(4, 3)), r"sample_ndims: expected \(\) or 3 entries"),
        (dict(grid=torch.tensor([[2, 2, 2], [1, 1, 1]], dtype=torch.int32)), r"grid: expected shape \(3, 3\)"),
        (dict(segment_ids=torch.tensor([0] * 9 + [2] * 3, dtype=torch.int32)), r"token 8 says segment 0"),
    ],
)
def test_bad_layouts_are_named(fields, match):
    with pytest.raises(ValueError, match=match):
        validate_seqs(_broken(**fields))


def test_a_layout_field_that_is_not_a_tensor():
    with pytest.raises(TypeError, match=r"seqs.segment_ids: expected an int32 tensor, got list"):
        validate_seqs(_broken(segment_ids=[0] * 12))


def test_positions_outside_grid():
    seqs = _seqs()
    positions = seqs.positions.clone()
    positions[11, 2] = 3  # sample 2 (tokens 9..11) has a 1x1x3 grid: w must be < 3
    want = r"token 11 of segment 2 is at \(t, h, w\) = \(0, 0, 3\), outside its grid \(1, 1, 3\)"
    with pytest.raises(ValueError, match=want):
        validate_seqs(_broken(positions=positions))


def test_unpack_refuses_a_layout_that_would_mix_samples():
    tokens, seqs = packdit.pack([torch.randn(2, 4, 4), torch.randn(2, 2, 2)], 2)
    shifted = dataclasses.replace(seqs, cu_seqlens=torch.tensor([0, 3, 5], dtype=torch.int32), max_seqlen=3)
    with pytest.raises(ValueError, match="segment"):
        packdit.unpack(tokens, shifted, 2)


def test_checks_can_be_turned_off_and_run_once_per_layout(monkeypatch):
    bad = _broken(max_seqlen=5)
    with packdit.checks(False):
        validate_seqs(bad)  # no error
        with packdit.checks(True):
            with pytest.raises(ValueError):
                validate_seqs(bad)
    monkeypatch.setenv("PACKDIT_CHECKS", "0")
    validate_seqs(bad)
    monkeypatch.delenv("PACKDIT_CHECKS")

    calls = []
    real = _validate.validate_cu_seqlens
    monkeypatch.setattr(_validate, "validate_cu_seqlens", lambda *a, **k: calls.append(1) or real(*a, **k))
    seqs = _seqs()
    for _ in range(3):
        validate_seqs(seqs)
    assert len(calls) == 1
    _, fresh = packdit.pack([torch.zeros(1, 2, 2)], 1)
    validate_seqs(fresh)  # valid by construction: no device->host check at all
    assert len(calls) == 1


def test_validate_cu_seqlens_raw():
    assert validate_cu_seqlens(torch.tensor([0, 0, 3], dtype=torch.int32), 3) == [0, 0, 3]
    with pytest.raises(TypeError, match="cu_seqlens_k"):
        validate_cu_seqlens([0, 3], 3, "cu_seqlens_k")


def test_import_without_extension_falls_back_with_one_warning():
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    import packdit\n"
        "    print(packdit.__version__)\n"
        "    for _ in range(3):\n"
        "        packdit.pack([torch.zeros(1, 4, 4)], 2)\n"
        "print(sum('native extension' in str(x.message) for x in w))\n"
    )
    env = dict(os.environ, PACKDIT_DISABLE_EXT="0")
    # an import hook that hides packdit._C, as on a machine where it was not built
    code = ("import sys\nclass Block:\n    def find_spec(self, name, path, target=None):\n"
            "        if name == 'packdit._C': raise ImportError('hidden for the test')\n"
            "sys.meta_path.insert(0, Block())\n") + code
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    version, warnings_seen = out.stdout.split()
    assert version == packdit.__version__ and warnings_seen == "1"


def test_checkpoint_atomic_save_and_truncated_load(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save({"w": torch.arange(1000.0), "step": 3}, path)
    assert checkpoint.load(path)["step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match=r"ckpt.pt \(\d+ bytes\) is truncated or corrupt"):
        checkpoint.load(path)
    with pytest.raises(checkpoint.CheckpointError, match="no such file"):
        checkpoint.load(tmp_path / "missing.pt")


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        checkpoint.save({"step": 2, "bad": Unpicklable()}, path)
    assert checkpoint.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_use_deterministic_flag():
    from packdit.determinism import deterministic_enabled

    assert not deterministic_enabled()
    packdit.use_deterministic(True)
    try:
        assert deterministic_enabled()
    finally:
        packdit.use_deterministic(False)
    torch.use_deterministic_algorithms(True)
    try:
        assert deterministic_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_a_grid_whose_raster_index_overflows_int32_is_refused():
    """Two kept tokens of a (2, 2^15, 2^15) grid: 2^31 cells, so raster indices overflow int32."""
    seqs = packdit.PackedSeqs(
        cu_seqlens=torch.tensor([0, 2], dtype=torch.int32), max_seqlen=2,
        grid=torch.tensor([[2, 2**15, 2**15]], dtype=torch.int32),
        positions=torch.tensor([[0, 0, 0], [1, 2**15 - 1, 2**15 - 1]], dtype=torch.int32),
        segment_ids=torch.zeros(2, dtype=torch.int32), dropped=True)
    with pytest.raises(ValueError, match=r"seqs.grid\[0\]: .* 2147483648 cells"):
        validate_seqs(seqs)


@pytest.mark.parametrize("theta", [float("inf"), float("nan"), 1.0, 0.5, -2.0, "10000", True])
def test_rope_refuses_a_base_whose_frequencies_are_not_finite_and_decreasing(theta):
    """theta = inf passed and made the kernel's angles NaN (log(inf) * 0) while the reference stayed finite."""
    with pytest.raises(ValueError, match=r"theta: expected a finite base > 1"):
        packdit.RoPE3D(theta=theta)


@pytest.mark.parametrize("axes_dims, match", [
    ((16, 24.5, 24), r"axes_dims: expected three non-negative even ints"),  # was truncated to 24
    ((16, 24), r"axes_dims: expected three"),
    (24, r"axes_dims: expected three"),
    ((2, 3, 4), r"axes_dims: expected three non-negative even ints"),
])
def test_rope_refuses_axes_it_would_truncate_or_cannot_rotate(axes_dims, match):
    with pytest.raises(ValueError, match=match):
        packdit.RoPE3D(axes_dims=axes_dims)
    assert packdit.RoPE3D(theta=500, axes_dims=(2, 4, 4)).axes_dims == (2, 4, 4)
