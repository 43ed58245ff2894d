"""benchmarks/compare_runs.py: the held-out curve of a run's metrics file, plain or gzipped (docs/bench keeps them
gzipped), and the time each run first reaches a score."""

import gzip
import json

import pytest

from benchmarks.compare_runs import curve, kept_curve, plateau, time_to_reach


def test_plain_and_gzipped_metrics_give_the_same_curve(tmp_path):
    rows = [{"step": 0, "wall_time": 3.0, "eval/overall": 0.3}, {"step": 1, "wall_time": 5.0, "reward/mean": 0.7},
            {"step": 10, "wall_time": 20.0, "eval/overall": 0.45}, {"step": 20, "wall_time": 40.0, "eval/overall": 0.42}]
    text = "\n".join(json.dumps(r) for r in rows) + "\n"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(text)
    (tmp_path / "m.jsonl.gz").write_bytes(gzip.compress(text.encode(), mtime=0))
    expected = [(3.0, 0.3), (20.0, 0.45), (40.0, 0.42)]
    assert curve(tmp_path / "run", "eval/overall") == expected
    assert curve(tmp_path / "m.jsonl.gz", "eval/overall") == expected
    assert time_to_reach(expected, 0.42) == 20.0 and time_to_reach(expected, 0.5) is None
    with pytest.raises(SystemExit, match="no 'eval/score'"):
        curve(tmp_path / "m.jsonl.gz", "eval/score")
    with pytest.raises(SystemExit, match="not a run directory"):
        curve(tmp_path / "missing", "eval/overall")


def test_plateau_averages_the_evaluations_before_the_final_one():
    points = [(0.0, 0.3), (10.0, 0.5), (20.0, 0.4), (30.0, 0.6), (31.0, 0.5)]  # last: the kept adapter re-scored
    assert plateau(points, 2) == pytest.approx(0.5)  # (0.4 + 0.6) / 2
    assert plateau(points, 10) == pytest.approx(0.45)  # all four before the last
    assert plateau([(0.0, 0.3)], 5) == pytest.approx(0.3)  # a single evaluation is its own plateau


def test_a_run_on_another_cards_clock_is_cut_and_its_kept_adapter_replayed(tmp_path):
    # The run (a faster card): 1 s per epoch, evaluations every 10 epochs, keep_best's final at epoch 40 re-scores
    # epoch 30's adapter (its best validation). The reference (the slower card): 2 s per epoch, 25 epochs. On that
    # card the run stops at epoch 25 and keeps epoch 10's adapter, the best validation up to there.
    def write(name, rows):
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        return tmp_path / name

    run = write("run.jsonl", [
        {"step": 0, "wall_time": 0.0, "eval/overall": 0.30, "val/overall": 0.40},
        {"step": 10, "wall_time": 10.0, "eval/overall": 0.45, "val/overall": 0.52},
        {"step": 20, "wall_time": 20.0, "eval/overall": 0.50, "val/overall": 0.51},
        {"step": 30, "wall_time": 30.0, "eval/overall": 0.40, "val/overall": 0.60},
        {"step": 40, "wall_time": 41.0, "eval/overall": 0.40, "val/overall": 0.60}])
    ref = write("ref.jsonl", [{"step": s, "wall_time": 2.0 * s + 1.0} for s in range(26)])
    points = curve(run, "eval/overall", clock=ref)
    assert points == [(1.0, 0.30), (21.0, 0.45), (41.0, 0.50), (51.0, 0.45)]
    assert curve(run, "val/overall", clock=ref)[-1] == (51.0, 0.52)
    # a run that ended before the reference's last epoch is kept whole, its own final included once
    long_ref = write("long.jsonl", [{"step": s, "wall_time": 2.0 * s} for s in range(61)])
    assert curve(run, "eval/overall", clock=long_ref) == [(0.0, 0.30), (20.0, 0.45), (40.0, 0.50), (60.0, 0.40),
                                                        (80.0, 0.40)]
    with pytest.raises(SystemExit, match="too few epochs"):
        curve(run, "eval/overall", clock=write("one.jsonl", [{"step": 0, "wall_time": 1.0}]))


def test_the_kept_curve_is_what_keep_best_would_have_kept_at_each_validation():
    # evaluations with validation at 10, 20, 30, 40 s; a training row between them; the best validation so far is the
    # 0.52 at 10 s until 0.60 at 30 s (a tie at 40 s keeps the earlier adapter)
    rows = [{"wall_time": 0.0, "eval/overall": 0.30, "val/overall": 0.40},
            {"wall_time": 5.0, "reward/mean": 0.7},
            {"wall_time": 10.0, "eval/overall": 0.45, "val/overall": 0.52},
            {"wall_time": 20.0, "eval/overall": 0.50, "val/overall": 0.51},
            {"wall_time": 30.0, "eval/overall": 0.41, "val/overall": 0.60},
            {"wall_time": 40.0, "eval/overall": 0.55, "val/overall": 0.60}]
    kept = kept_curve(rows, "eval/overall")
    assert kept == [(0.0, 0.30), (10.0, 0.45), (20.0, 0.45), (30.0, 0.41), (40.0, 0.41)]
    assert time_to_reach(kept, 0.45) == 10.0  # the best single evaluation (0.55, 0.50) is never what it kept
    assert time_to_reach(kept, 0.46) is None
    assert kept_curve([{"wall_time": 0.0, "eval/overall": 0.3}], "eval/overall") == []  # no validation: no kept adapter
