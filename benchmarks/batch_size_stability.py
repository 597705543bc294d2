"""Does max_batch_size=auto choose the same size from one start to the next, on a quiet and on a busy machine?

    python benchmarks/batch_size_stability.py --starts 5 --markdown out.md [--root OLD_TREE]

Starts the demo profile ``--starts`` times with nothing else running, then as often again while ``--hogs`` busy
loops (one per core by default) hold the cores, and tabulates each model's choice, with whether it fell back
(``auto-fallback``: the timings could not decide). A choice is stable when at least 4 of 5 starts pick the same
size or one power of two away from it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serve_load import spawn  # noqa: E402


def choices(root: Path) -> tuple[dict[str, str], float]:
    """Each model's max_batch_size (with '*' for a fallback) from one start, and the seconds to ready."""
    started = time.monotonic()
    proc, url = spawn({}, root=root)
    ready = time.monotonic() - started
    try:
        models = httpx.get(url + "/v1/models", timeout=30).json()["models"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    out = {}
    for model in models:
        batching = model["batching"]
        fallback = "*" if batching.get("max_batch_size_source") == "auto-fallback" else ""
        out[model["name"]] = f"{batching['max_batch_size']}{fallback}"
    return out, ready


def stable(sizes: list[str]) -> bool:
    """At least 4 in 5 starts (the same share of any count) at one size or a power of two next to it."""
    values = [int(s.rstrip("*")) for s in sizes]
    best = max(sum(1 for v in values if centre / 2 <= v <= centre * 2) for centre in set(values))
    return best >= 0.8 * len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--root", type=Path, default=ROOT, help="the tree whose server to start (default: this)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    runs: dict[str, list[tuple[dict[str, str], float]]] = {"quiet": [], "busy": []}
    for _ in range(args.starts):
        runs["quiet"].append(choices(args.root))
    hogs = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(args.hogs)]
    try:
        for _ in range(args.starts):
            runs["busy"].append(choices(args.root))
    finally:
        for hog in hogs:
            hog.kill()
    names = sorted({name for runs_ in runs.values() for result, _ in runs_ for name in result})
    rows = [
        f"max_batch_size=auto over {args.starts} starts each, quiet and with {args.hogs} busy loops "
        f"({os.cpu_count()} cores); * marks a fallback",
        "",
        "| model | quiet | stable | busy | stable |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        cells = []
        for kind in ("quiet", "busy"):
            sizes = [result[name] for result, _ in runs[kind]]
            cells += [", ".join(sizes), "yes" if stable(sizes) else "**no**"]
        rows.append(f"| {name} | {' | '.join(cells)} |")
    for kind in ("quiet", "busy"):
        rows.append(f"\nSeconds from start to ready, {kind}: {', '.join(f'{r:.0f}' for _, r in runs[kind])}")
    text = "\n".join(rows)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
