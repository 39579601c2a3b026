#!/usr/bin/env python
"""packdit benchmarks: ``python benchmarks/run.py [--only layout,...] [--quick | --full] [--out DIR]``.

Every section checks packdit's outputs against a reference or peer, then times packdit and its peers in
the same process on the same inputs (medians after warm-up; CUDA events on a GPU), prints a table, and
writes ``<out>/<device-slug>/<section>.json``, ``.csv`` and ``.png``. Without a GPU the run is
``--quick``: small shapes, CPU paths only, no performance claims. Quick runs write to
``<out>/<device-slug>-quick/`` (ignored by git): committed results change only from full runs.

``--budget S`` gives each section a soft time budget (it starts no new case once the budget is spent,
and records the cases it skipped); ``--archive FILE`` rewrites a ``.tar.gz`` of the results after every
section, so a run cut short keeps what finished. Exit status: 1 when a section failed or an
implementation was refused (outputs differ from the reference), else 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import tarfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import DEFAULT_OUT, Context, environment, results_dir, write_results  # noqa: E402

# section name -> module in benchmarks/ with run(ctx) -> rows and plot(rows, path)
SECTIONS = (
    "layout",
    "packing",
    "attention",
    "norm",
    "rope",
    "mlp",
    "patchify",
    "e2e",
    "sass",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run, in this order (default: all of {', '.join(SECTIONS)})")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", default=None, help="small shapes (default without a GPU)")
    size.add_argument("--full", dest="quick", action="store_false", help="full sizes (default on a GPU)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results root (default: {DEFAULT_OUT})")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="soft time budget per section (default: none)")
    p.add_argument("--archive", type=Path, default=None, metavar="FILE",
                   help="rewrite FILE (.tar.gz of the results folder) after every section")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"--only: unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if args.budget is not None and args.budget <= 0:
        p.error(f"--budget: expected a positive number of seconds, got {args.budget}")
    return args


def _archive(folder: Path, archive: Path) -> None:
    """Atomically replace ``archive`` by a .tar.gz of ``folder`` (named by the folder's own name inside)."""
    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    os.replace(tmp, archive)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = (device.type != "cuda") if args.quick is None else args.quick
    env = environment(device)
    ctx = Context(device=device, quick=quick, env=env, out_dir=args.out)
    print(f"packdit {env['packdit']} ({env['commit']}) on {env.get('gpu', env['cpu'])}, torch {env['torch']}, "
          f"triton {env['triton']}, native extension: {env['native_extension']}, {'quick' if quick else 'full'} run")
    written, refused, failed = [], [], []
    for name in args.sections:
        t0 = time.perf_counter()
        section_ctx = dataclasses.replace(ctx, deadline=None if args.budget is None else time.monotonic() + args.budget)
        try:
            module = importlib.import_module(name)
            # A static section (compiled code, no device: RESULTS_SLUG) has its own results folder and runs in
            # full unless --quick is given.
            slug = getattr(module, "RESULTS_SLUG", None)
            if slug:
                section_ctx = dataclasses.replace(section_ctx, quick=bool(args.quick))
            rows = module.run(section_ctx)
        except Exception:  # one broken section must not cost the others their numbers
            traceback.print_exc()
            failed.append(name)
            print(f"[{name}: FAILED after {time.perf_counter() - t0:.1f} s]")
            continue
        refused += [f"{name}: {r['refused']}" for r in rows if r.get("refused")]
        written += write_results(section_ctx, name, rows, slug)
        if not args.no_plots:
            png = results_dir(section_ctx, slug) / f"{name}.png"
            module.plot(rows, png)
            written.append(png)
        if args.archive:
            _archive(results_dir(ctx), args.archive)
        print(f"[{name}: {time.perf_counter() - t0:.1f} s]")
    print("\nresults written:")
    for path in written:
        print(f"  {path}")
    if refused:
        print(f"\n{len(refused)} implementation(s) refused (outputs differ from the reference; not timed):")
        for line in refused:
            print(f"  {line}")
    if failed:
        print(f"\nsection(s) failed: {', '.join(failed)}")
    return 1 if refused or failed else 0


if __name__ == "__main__":
    sys.exit(main())
