#!/usr/bin/env python
"""Compact tables of a results folder: ``python benchmarks/summary.py DIR`` (DIR holds ``<device>/<section>.json``).

What the GPU check prints last, so that the few kilobytes of a run's output that come back hold the
numbers: packdit's attention against the best peer per case, the e2e strategies (measured, then
simulated), the key columns of every other section, and every refused implementation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tabulate import tabulate

# section -> (row filter, columns)
VIEWS = {
    "attention": (lambda r: r.get("provider") == "packdit" and "TFLOPs" in r,
                  ["mix", "mode", "rope", "head_dim", "pass", "TFLOPs", "vs_best_peer", "best_peer", "rope_overhead"]),
    "e2e": (lambda r: "strategy" in r,
            ["kind", "strategy", "samples_per_s", "useful_tokens_per_s", "MFU", "peak_memory_GiB",
             "useful_tokens_per_s_vs_shape-buckets", "useful_tokens_per_s_vs_pad", "note"]),
    "mlp": (lambda r: "TFLOPs" in r, ["impl", "tokens", "D", "fwd_bwd_ms", "TFLOPs"]),
    "norm": (lambda r: "fwd_GBps" in r, ["impl", "tokens", "D", "segments", "fwd_ms", "fwd_GBps", "bwd_ms", "bwd_GBps",
                                         "bwd_pct_hbm_peak"]),
    "rope": (lambda r: "fwd_GBps" in r, ["impl", "H", "D", "norm", "fwd_ms", "fwd_GBps", "bwd_ms", "bwd_GBps",
                                         "bwd_pct_hbm_peak"]),
    "patchify": (lambda r: "GBps" in r, ["impl", "op", "mix", "ms", "GBps", "pct_hbm_peak"]),
    "layout": (lambda r: "pack_ms" in r, ["mix", "tokens", "pack_GBps", "unpack_GBps", "positions_speedup_vs_torch"]),
    "packing": (lambda r: r.get("mix") == "video-mix" and r.get("window") in (None, 16) and "E" in r,
                ["ranks", "strategy", "E", "padding", "changed_samples", "changed_tokens"]),
}
MAX_ROWS = 40


def summarize(folder: Path) -> str:
    lines = []
    for path in sorted(folder.glob("*/*.json")):
        data = json.loads(path.read_text())
        section, rows = data["section"], data["rows"]
        keep, columns = VIEWS.get(section, (lambda r: True, list(rows[0]) if rows else []))
        shown = [r for r in rows if keep(r)]
        lines.append(f"\n## {path.parent.name}/{section}: {len(rows)} rows"
                     f"{' (quick run)' if data.get('quick') else ''}, {len(shown)} shown")
        if shown:
            table = [[_cell(r.get(c, "")) for c in columns] for r in shown[:MAX_ROWS]]
            lines.append(tabulate(table, headers=columns, floatfmt=".3g"))
        lines += [f"REFUSED: {r['refused']}" for r in rows if r.get("refused")]
    return "\n".join(lines) if lines else f"no results under {folder}"


def _cell(value):
    return value[:60] if isinstance(value, str) else value


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} RESULTS_DIR")
    print(summarize(Path(sys.argv[1])))
