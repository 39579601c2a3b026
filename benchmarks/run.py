#!/usr/bin/env python
"""packdit benchmarks: ``python benchmarks/run.py [--only layout,...] [--quick | --full] [--out DIR]``.

Every section times packdit and its peers in the same process on the same inputs (medians after
warm-up; CUDA events on a GPU), prints a table, and writes ``<out>/<device-slug>/<section>.json``,
``.csv`` and ``.png``. Without a GPU the run is ``--quick``: small shapes, CPU paths only, no
performance claims.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import DEFAULT_OUT, Context, device_slug, environment, write_results  # noqa: E402

# section name -> module in benchmarks/ with run(ctx) -> rows and plot(rows, path)
SECTIONS = ("layout", "packing", "attention", "norm", "mlp", "patchify", "e2e")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run (default: all of {', '.join(SECTIONS)})")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", default=None, help="small shapes (default without a GPU)")
    size.add_argument("--full", dest="quick", action="store_false", help="full sizes (default on a GPU)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results root (default: {DEFAULT_OUT})")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"--only: unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = (device.type != "cuda") if args.quick is None else args.quick
    env = environment(device)
    ctx = Context(device=device, quick=quick, env=env, out_dir=args.out)
    print(f"packdit {env['packdit']} ({env['commit']}) on {env.get('gpu', env['cpu'])}, torch {env['torch']}, "
          f"triton {env['triton']}, native extension: {env['native_extension']}, {'quick' if quick else 'full'} run")
    written, refused = [], []
    for name in args.sections:
        module = importlib.import_module(name)
        t0 = time.perf_counter()
        rows = module.run(ctx)
        refused += [f"{name}: {r['refused']}" for r in rows if r.get("refused")]
        written += write_results(ctx, name, rows)
        if not args.no_plots:
            png = args.out / device_slug(env) / f"{name}.png"
            module.plot(rows, png)
            written.append(png)
        print(f"[{name}: {time.perf_counter() - t0:.1f} s]")
    print("\nresults written:")
    for path in written:
        print(f"  {path}")
    if refused:
        print(f"\n{len(refused)} implementation(s) refused (outputs differ from the reference; not timed):")
        for line in refused:
            print(f"  {line}")
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
