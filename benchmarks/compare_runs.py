"""Compare training runs by held-out score against wall-clock, from their metrics.jsonl.

    python benchmarks/compare_runs.py runs/nft_stitchvm runs/nft_terminal --metric eval/overall
    python benchmarks/compare_runs.py docs/bench/s9_grpo_fast_exact_h200.jsonl.gz docs/bench/s9_grpo_fast_terminal_h200.jsonl.gz

Each argument is a run directory or its metrics.jsonl (the GPU scripts keep only that file), gzipped or not (the
records in docs/bench are gzipped: the device tool uploads the working tree, at most 64 MiB with what it carries).

Prints, per run: the score at start and end, the gain, wall-clock, and the time each run needed to reach its own
final score and the other's (within --tol), and, for keep_best runs, when the adapter it would have kept had it
stopped there first scores at least its own final and the other's (``kept_curve``: the time to an equal final
reward), so "the same final score in <= 1/2 of the wall-clock" is read off directly.
"Plateau" is the mean of the --plateau evaluations before the last one (with keep_best the last one re-scores the
kept adapter): one 512-prompt score has a standard error of ~0.022, so a run's level reads steadier from several.

Runs from another card: a run is deterministic given its seed on either card, which only sets how many epochs fit
(docs/bench/trainers_session10.md). ``--clock RUN=REF`` puts RUN's epochs on the wall clock of REF, a run doing the
same work per epoch on the card to compare on (e.g. an H100 run of the same trainer and critic), and cuts RUN at REF's
last epoch. With keep_best (the run logged val/overall) the final is then replayed: the evaluation at the epoch of
the best validation up to the cut, which is what the run would have kept on that card.

    python benchmarks/compare_runs.py s15a_grpo_fast_l1cal.jsonl.gz s12d_grpo_fast_terminal_graphs.jsonl.gz \
        --clock s15a_grpo_fast_l1cal.jsonl.gz=s13b_grpo_fast_kl0.01.jsonl.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path


def read_rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise SystemExit(f"{run}: not a run directory with a metrics.jsonl, nor a metrics file")
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def curve(run: Path, metric: str, clock: Path | None = None) -> list[tuple[float, float]]:
    return points_of(run_rows(run, metric, clock), metric, run)


def run_rows(run: Path, metric: str, clock: Path | None = None) -> list[dict]:
    rows = read_rows(run)
    return rows if clock is None else on_clock(rows, read_rows(clock), metric, clock)


def points_of(rows: list[dict], metric: str, run: Path) -> list[tuple[float, float]]:
    points = [(r["wall_time"], r[metric]) for r in rows if metric in r]
    if not points:
        raise SystemExit(f"{run}: no '{metric}' in it")
    return points


def kept_curve(rows: list[dict], metric: str) -> list[tuple[float, float]]:
    """What a keep_best run stopped at each validation would have kept: (wall time, ``metric`` of the adapter that
    validated best so far; ties: the earliest). Empty for a run without validation. Its last point is the run's
    final, and "the time to an equal final reward" is read off it, not off single evaluations."""
    best, points = None, []
    for r in rows:
        if metric in r and "val/overall" in r:
            if best is None or r["val/overall"] > best["val/overall"]:
                best = r
            points.append((r["wall_time"], best[metric]))
    return points


def on_clock(rows: list[dict], ref: list[dict], metric: str, ref_name: Path) -> list[dict]:
    """``rows`` on ``ref``'s clock: wall_time(epoch) interpolated from ref, cut at ref's last epoch, the final
    (keep_best) evaluation replayed as the one at the best val/overall up to the cut."""
    clock = sorted({r["step"]: r["wall_time"] for r in ref if "step" in r and "wall_time" in r}.items())
    if len(clock) < 2:
        raise SystemExit(f"{ref_name}: too few epochs with a wall_time to serve as a clock")
    last = clock[-1][0]

    def wall(step: float) -> float:
        for (s0, w0), (s1, w1) in zip(clock, clock[1:]):
            if step <= s1:
                return w0 + (w1 - w0) * (step - s0) / (s1 - s0) if s1 > s0 else w1
        return clock[-1][1]

    if max(r.get("step", 0) for r in rows) <= last:  # the run ended first: it is all there, only the clock changes
        return [dict(r, wall_time=wall(r["step"])) for r in rows if "step" in r]
    kept = [dict(r, wall_time=wall(r["step"])) for r in rows if r.get("step", 0) <= last]
    evals = [r for r in kept if metric in r]
    if not evals:
        raise SystemExit(f"no '{metric}' up to epoch {last} (the end of {ref_name})")
    vals = [r for r in evals if "val/overall" in r]
    if vals:  # keep_best: the cut run keeps the adapter that validated best up to the cut (ties: the earliest)
        best = max(vals, key=lambda r: (r["val/overall"], -r["step"]))
        final = dict(best, wall_time=wall(last), step=last)
    else:
        final = evals[-1]
    cut = [r for r in evals if r["step"] < final["step"]]
    return cut + [final]


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
    parser.add_argument("--clock", action="append", default=[], metavar="RUN=REF",
                        help="put RUN (as given) on the wall clock of REF, a run of the same work per epoch on another "
                             "card; RUN is cut at REF's last epoch and its keep_best final replayed (repeatable)")
    args = parser.parse_args()
    clocks = {}
    for item in args.clock:
        run, sep, ref = item.partition("=")
        if not sep or Path(run) not in args.runs:
            raise SystemExit(f"--clock {item!r}: expected RUN=REF with RUN one of the runs given")
        clocks[Path(run)] = Path(ref)
    rows = {r: run_rows(r, args.metric, clocks.get(r)) for r in args.runs}
    curves = {r: points_of(rows[r], args.metric, r) for r in args.runs}
    print(f"| run | {args.metric} start | end | gain | wall s | best | plateau ({args.plateau}) "
          "| s to reach own final - tol | s to reach others' final - tol "
          "| s until the kept adapter scores own, others' final |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def times(points: list[tuple[float, float]], targets: list[float]) -> str:
        reached = (time_to_reach(points, t) for t in targets)
        return ", ".join("never" if x is None else f"{x:.0f}" for x in reached) or "-"

    for run, pts in curves.items():
        others = [c[-1][1] for r, c in curves.items() if r != run]
        kept = kept_curve(rows[run], args.metric)
        reach_s = times(pts, [o - args.tol for o in others])
        kept_s = times(kept, [kept[-1][1]] + others) if kept else "-"
        own = time_to_reach(pts, pts[-1][1] - args.tol)
        name = f"{run.name} (on {clocks[run].name}'s clock)" if run in clocks else run.name
        print(f"| {name} | {pts[0][1]:.3f} | {pts[-1][1]:.3f} | {pts[-1][1] - pts[0][1]:+.3f} | "
              f"{pts[-1][0]:.0f} | {max(v for _, v in pts):.3f} | {plateau(pts, args.plateau):.3f} | {own:.0f} | "
              f"{reach_s} | {kept_s} |")

if __name__ == "__main__":
    main()
