"""The GPU check's dry run on the CPU: every step of .ci/gpu_check starts, in order, and leaves in $OUT the few
files the GPU machine can return, so a shell or import error never costs GPU time."""

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "gpu_check"
OUT_FILES = {"gpu_check.log", "build.log", "benchmarks.log", "pytest_gpu.log", "sanitizer.log", "results.tar.gz"}
SECTIONS = ("attention", "e2e", "mlp", "norm", "rope", "patchify", "layout")  # most valuable first


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    log = (tmp_path / "gpu_check.log").read_text() if (tmp_path / "gpu_check.log").exists() else ""
    assert done.returncode == 0, log[-4000:] + done.stderr[-2000:]
    assert {p.name for p in tmp_path.iterdir()} == OUT_FILES  # the device tool returns at most 8 files
    steps = re.findall(r"^=== \S+ \+\d+s (.*?) ===$", log, flags=re.M)
    benchmarks = [s.split()[1] for s in steps if s.startswith("benchmark ")]
    assert benchmarks == ["attention", "e2e", "mlp,norm,rope", "patchify,layout"]
    # the kernels of attention, mlp, norm, rope and e2e are recorded (compiled on a GPU machine) before attention
    precompiles = [k for k, s in enumerate(steps) if s.startswith("precompile attention,mlp,norm,rope,e2e ")]
    assert precompiles and precompiles[0] < steps.index(next(s for s in steps if s.startswith("benchmark attention")))
    assert re.search(r"^precompile: [1-9]\d* kernel specialisations of attention, mlp, norm, rope, e2e for sm_90",
                     log, flags=re.M)
    # the GPU tests after mlp, norm and rope (not yet measured on a GPU), before patchify and layout (measured once)
    gpu_tests = steps.index("GPU tests (gpu and cuda_ext markers)")
    assert steps.index(next(s for s in steps if s.startswith("benchmark mlp,norm,rope"))) < gpu_tests
    assert gpu_tests < steps.index(next(s for s in steps if s.startswith("benchmark patchify,layout")))
    assert "done (status 0, 6 files in $OUT)" in steps[-1]
    with tarfile.open(tmp_path / "results.tar.gz") as tar:
        names = {name.partition("/")[2] for name in tar.getnames() if name.partition("/")[0].endswith("-quick")}
    for section in SECTIONS:
        assert {f"{section}.{ext}" for ext in ("json", "csv", "png")} <= names, section
    assert "memcheck exit 0" in log and "racecheck exit 0" in log
    assert "pytest workers: -n 2" in log  # the GPU machine's xdist path, on 2 workers here


def test_gpu_check_runs_every_gpu_test_file():
    """The GPU test step names its files (quickest first); a new file with GPU tests must be among them."""
    listed = re.search(r"^GPU_TESTS=\((.*?)\)", SCRIPT.read_text(), flags=re.M | re.S).group(1).split()
    marked = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_gpu_check.py"
              and re.search(r"mark\.gpu\b|mark\.cuda_ext\b", p.read_text())}
    assert set(listed) == marked

