"""rl.metrics: metrics.jsonl, TensorBoard scalars, image grids, main-process gating, Timer."""

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from rl.metrics import MetricLogger, Timer


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_metrics_jsonl_contents(tmp_path):
    with MetricLogger(tmp_path, backends=()) as logger:
        logger.log({"reward/mean": torch.tensor(0.5), "policy/approx_kl": 0.015625, "time/rollout": 3}, step=3)
        logger.log({"reward/mean": np.float32(0.25), "critic/value_mse": float("nan")}, step=4)
    records = _records(tmp_path)
    assert len(records) == 2
    assert {k: v for k, v in records[0].items() if k != "wall_time"} == {
        "step": 3,
        "reward/mean": 0.5,
        "policy/approx_kl": 0.015625,
        "time/rollout": 3.0,
    }
    assert records[1]["step"] == 4 and records[1]["reward/mean"] == 0.25
    assert math.isnan(records[1]["critic/value_mse"])
    assert records[0]["wall_time"] >= 0.0
    # appends across loggers of the same run (a resumed run continues the file)
    with MetricLogger(tmp_path, backends=()) as logger:
        logger.log({"reward/mean": 1.0}, step=5)
    assert [r["step"] for r in _records(tmp_path)] == [3, 4, 5]


def test_jsonl_values_are_their_float32_in_the_shortest_text(tmp_path):
    # A float32 metric read back as float64 has 17 digits; the record keeps the float32 exactly in 7-9 of them.
    values = {"reward/mean": torch.tensor(0.7820728), "loss/kl": 1 / 3, "time/update": 3.3e-8, "train/rows": 123456789}
    with MetricLogger(tmp_path, backends=()) as logger:
        logger.log(values, step=1)
    line = (tmp_path / "metrics.jsonl").read_text()
    row = json.loads(line)
    assert '"reward/mean": 0.7820728,' in line and '"loss/kl": 0.33333334,' in line
    assert row["train/rows"] == 123456789  # an integer is exact whatever its size
    for name in ("reward/mean", "loss/kl", "time/update"):
        assert np.float32(row[name]) == np.float32(float(values[name])), name
    assert row["loss/kl"] != 1 / 3  # rounded, not the float64
    # outside float32's range the float64 is kept: neither inf nor 0 is written for a finite non-zero value
    with MetricLogger(tmp_path / "wide", backends=()) as logger:
        logger.log({"loss/big": 1e300, "loss/tiny": 1e-300}, step=1)
    row = _records(tmp_path / "wide")[0]
    assert row["loss/big"] == 1e300 and row["loss/tiny"] == 1e-300


def test_bad_metrics_are_refused(tmp_path):
    with MetricLogger(tmp_path, backends=()) as logger:
        with pytest.raises(ValueError, match="metric 'loss' needs a group prefix"):
            logger.log({"loss": 1.0}, step=0)
        with pytest.raises(ValueError, match=r"metric 'reward/all' is a tensor of shape \(3,\)"):
            logger.log({"reward/all": torch.ones(3)}, step=0)
        with pytest.raises(ValueError, match="metric 'reward/name' must be a number"):
            logger.log({"reward/name": "high"}, step=0)
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_non_main_process_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    logger = MetricLogger(run_dir, backends=("tensorboard",), is_main_process=False)
    logger.log({"reward/mean": 1.0}, step=0)
    logger.log_images("samples", torch.zeros(3, 4, 4), step=0)
    logger.close()
    assert not run_dir.exists()


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricLogger(tmp_path, backends=("tensorboard",)) as logger:
        logger.log({"reward/mean": 0.5}, step=3)
        logger.log({"reward/mean": 0.75}, step=4)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward/mean")] == [(3, 0.5), (4, 0.75)]


def test_backend_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown logging backend 'tb'; valid backends: tensorboard, wandb"):
        MetricLogger(tmp_path, backends=("tb",))
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ModuleNotFoundError, match="wandb is not installed: pip install 'stitchvm\\[wandb\\]'"):
            MetricLogger(tmp_path, backends=("wandb",), project="p")


def test_log_images_tensor_grid_and_pil_list(tmp_path):
    grid = torch.zeros(3, 4, 6)
    grid[0] = 1.0  # red
    grid[2, :, 3:] = 0.5
    with MetricLogger(tmp_path, backends=("tensorboard",)) as logger:
        logger.log_images("samples", grid, step=7)
        pils = [Image.new("RGB", (8, 8), (0, 255 * (i % 2), 0)) for i in range(4)]
        logger.log_images("pil", pils, step=2)
        with pytest.raises(ValueError, match=r"values must lie in \[0, 1\]"):
            logger.log_images("bad", grid * 2.0, step=0)
        with pytest.raises(ValueError, match=r"expected a \(3, H, W\) grid, got shape \(1, 3, 4, 6\)"):
            logger.log_images("bad", grid[None], step=0)

    png = np.asarray(Image.open(tmp_path / "images" / "samples" / "00000007.png"))
    assert png.shape == (4, 6, 3)
    np.testing.assert_array_equal(png[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(png[0, 5], [255, 0, 128])  # round(0.5 * 255) = 128

    pil_grid = np.asarray(Image.open(tmp_path / "images" / "pil" / "00000002.png"))
    assert pil_grid.shape == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2, 3)  # 2×2 grid of 8×8 with 2-pixel padding
    np.testing.assert_array_equal(pil_grid[2, 2], [0, 0, 0])  # image 0: black
    np.testing.assert_array_equal(pil_grid[2, 12], [0, 255, 0])  # image 1: green
    np.testing.assert_array_equal(pil_grid[0, 0], [255, 255, 255])  # padding


def test_timer_accumulates_per_section():
    ticks = iter([0.0, 1.5, 10.0, 10.25, 20.0, 22.0])
    timer = Timer(clock=lambda: next(ticks))
    with timer("rollout"):
        pass
    with timer("rollout"):
        pass
    with pytest.raises(RuntimeError), timer("optimise"):  # an exception still charges the time
        raise RuntimeError
    assert timer.summary(reset=True) == {"time/rollout": 1.75, "time/optimise": 2.0}
    assert timer.summary() == {}


def test_resume_at_drops_later_rows_and_a_torn_last_line(tmp_path):
    with MetricLogger(tmp_path, backends=()) as logger:
        for step in range(4):
            logger.log({"loss/x": float(step)}, step)
    path = tmp_path / "metrics.jsonl"
    rows = path.read_text().splitlines()
    path.write_text("\n".join(rows) + '\n{"step": 4, "loss/x": 4.0, "wal')  # killed while writing step 4
    with MetricLogger(tmp_path, backends=()) as logger:
        logger.resume_at(2)
        logger.log({"loss/x": 30.0}, 3)
    got = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(r["step"], r["loss/x"]) for r in got] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]
    assert got[3]["wall_time"] >= got[2]["wall_time"]  # the clock goes on from the kept rows
    path.write_text(rows[0] + "\nnot json\n" + rows[1] + "\n")  # damage inside the file is not a torn write
    with MetricLogger(tmp_path, backends=()) as logger, pytest.raises(ValueError, match="line 2 is not JSON"):
        logger.resume_at(1)
