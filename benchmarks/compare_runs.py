"""Compare training runs by held-out score against wall-clock, from their metrics.jsonl.

    python benchmarks/compare_runs.py runs/nft_stitchvm runs/nft_terminal --metric eval/overall
    python benchmarks/compare_runs.py docs/bench/s9_grpo_fast_exact_h200.jsonl.gz docs/bench/s9_grpo_fast_terminal_h200.jsonl.gz

Each argument is a run directory or its metrics.jsonl (the GPU scripts keep only that file), gzipped or not (the
records in docs/bench are gzipped: the device tool uploads the working tree, at most 64 MiB with what it carries).

Prints, per run: the score at start and end, the gain, wall-clock, and the time each run needed to reach the
other's final score (within --tol), so "the same final score in <= 1/2 of the wall-clock" is read off directly.
"Plateau" is the mean of the --plateau evaluations before the last one (with keep_best the last one re-scores the
kept adapter): one 512-prompt score has a standard error of ~0.022, so a run's level reads steadier from several.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path


def curve(run: Path, metric: str) -> list[tuple[float, float]]:
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise SystemExit(f"{run}: not a run directory with a metrics.jsonl, nor a metrics file")
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    points = [(r["wall_time"], r[metric]) for r in rows if metric in r]
    if not points:
        raise SystemExit(f"{path}: no '{metric}' in it")
    return points


def time_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, v in points if v >= target), None)


def plateau(points: list[tuple[float, float]], k: int) -> float:
    """Mean of the k evaluations before the last one (all but the last if there are fewer)."""
    before = [v for _, v in points[:-1]][-k:] or [points[-1][1]]
    return sum(before) / len(before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--metric", default="eval/overall")
    parser.add_argument("--tol", type=float, default=0.02, help="'the same score' tolerance")
    parser.add_argument("--plateau", type=int, default=5, help="evaluations averaged in the plateau column")
    args = parser.parse_args()
    curves = {r: curve(r, args.metric) for r in args.runs}
    print(f"| run | {args.metric} start | end | gain | wall s | best | plateau ({args.plateau}) "
          "| s to reach others' final - tol |")
    print("|---|---|---|---|---|---|---|---|")
    for run, pts in curves.items():
        others = [c[-1][1] - args.tol for r, c in curves.items() if r != run]
        reach = [time_to_reach(pts, t) for t in others]
        reach_s = ", ".join("never" if x is None else f"{x:.0f}" for x in reach) or "-"
        print(f"| {run.name} | {pts[0][1]:.3f} | {pts[-1][1]:.3f} | {pts[-1][1] - pts[0][1]:+.3f} | "
              f"{pts[-1][0]:.0f} | {max(v for _, v in pts):.3f} | {plateau(pts, args.plateau):.3f} | {reach_s} |")


if __name__ == "__main__":
    main()
