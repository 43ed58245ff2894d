"""Metric logging: ``metrics.jsonl`` always, TensorBoard and/or wandb on request; a section ``Timer``.

Metric names carry a group prefix, as in CleanRL's ``charts/`` and ``losses/``: ``reward/mean``,
``policy/approx_kl``, ``critic/value_mse``, ``time/rollout``. A name without ``/`` is refused so that the
dashboards stay grouped.

``run_dir/metrics.jsonl`` gets one JSON object per ``log`` call, ``{"step": 10, "wall_time": 12.3,
"reward/mean": 0.41, ...}``, flushed immediately, so tests, benchmarks and plotting scripts read metrics
without TensorBoard. Non-finite values are written as Python's ``json`` writes them (``NaN``), because a NaN
metric is information. A non-integral value is written at float32 precision, the shortest decimal that reads back to
its float32 (``_short``): the metrics are float32 computations, and the 17-digit float64 text of a float32 made the
run records in docs/bench 1.6x larger for digits that carry nothing (TensorBoard and wandb get the full value).
Images are also saved as ``run_dir/images/{tag}/{step:08d}.png``.

Only the main process logs: with ``is_main_process=False`` every method is a no-op and nothing is created.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["BACKENDS", "MetricLogger", "Timer"]

BACKENDS = ("tensorboard", "wandb")


def _scalar(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric '{name}' is a tensor of shape {tuple(value.shape)}; log a scalar (e.g. .mean())")
        return float(value.detach().item())
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"metric '{name}' must be a number or a one-element tensor, got {type(value).__name__}")
    return float(value)


def _short(value: float) -> float:
    """``value`` rounded to the float32 it was (or nearest); integers and non-finite values unchanged. ``json`` writes
    the result with the shortest repr that reads back to it, e.g. 0.7820728 instead of 0.7820727825164795."""
    if not math.isfinite(value) or value.is_integer():
        return value
    single = np.float32(value)
    if not np.isfinite(single) or single == 0:  # outside float32's range: the float64 is the information
        return value
    return float(str(single))


def _to_grid(images: torch.Tensor | Sequence[Image.Image], tag: str) -> torch.Tensor:
    """A (3, H, W) float grid in [0, 1] from a grid tensor or a list of equally sized PIL images."""
    if isinstance(images, torch.Tensor):
        grid = images.detach().float().cpu()
        if grid.dim() != 3 or grid.shape[0] != 3:
            raise ValueError(f"image '{tag}': expected a (3, H, W) grid, got shape {tuple(grid.shape)}")
    else:
        import torchvision.utils  # local: only needed for lists of PIL images

        if not images:
            raise ValueError(f"image '{tag}': empty list of images")
        sizes = {im.size for im in images}
        if len(sizes) != 1:
            raise ValueError(f"image '{tag}': all images must have the same size, got {sorted(sizes)}")
        batch = torch.stack(
            [
                torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
                for im in images
            ]
        )  # (N, 3, H, W)
        nrow = math.ceil(math.sqrt(len(images)))
        grid = torchvision.utils.make_grid(batch, nrow=nrow, padding=2, pad_value=1.0)
    lo, hi = float(grid.min()), float(grid.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"image '{tag}': values must lie in [0, 1] (the project's image convention), got [{lo}, {hi}]")
    return grid


class MetricLogger:
    """Logs scalar metrics and images of one run.

    Args:
        run_dir: the run directory (``metrics.jsonl``, ``tensorboard/``, ``images/`` go there).
        backends: any of ``"tensorboard"``, ``"wandb"``; ``()`` writes only ``metrics.jsonl`` and images.
        project: wandb project name (required for the wandb backend).
        config: the resolved config as a plain dict (``rl.config.to_dict(cfg)``), recorded by wandb.
        is_main_process: False on non-zero ranks: nothing is logged or created.
        run_name: wandb run name (defaults to the run directory's name).
    """

    def __init__(
        self,
        run_dir: str | Path,
        backends: Sequence[str] = ("tensorboard",),
        project: str | None = None,
        config: Mapping[str, Any] | None = None,
        is_main_process: bool = True,
        run_name: str | None = None,
    ) -> None:
        for backend in backends:
            if backend not in BACKENDS:
                raise ValueError(f"unknown logging backend '{backend}'; valid backends: {', '.join(BACKENDS)}")
        self.run_dir = Path(run_dir)
        self.is_main_process = is_main_process
        self._tb = None
        self._wandb = None
        self._jsonl = None
        self._start = time.time()
        if not is_main_process:
            return
        if "wandb" in backends:
            try:
                import wandb
            except ModuleNotFoundError as e:
                raise ModuleNotFoundError(
                    "logging backend 'wandb' was requested but wandb is not installed: "
                    "pip install 'stitchvm[wandb]', or drop 'wandb' from the logging backends"
                ) from e
            if project is None:
                raise ValueError("logging backend 'wandb' needs a project name (project=...)")
            self._wandb = wandb.init(
                project=project,
                name=run_name or self.run_dir.name,
                dir=str(self.run_dir),
                config=dict(config) if config is not None else None,
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def resume_at(self, step: int) -> None:
        """A run resumed from its checkpoint at ``step``: drop the metrics.jsonl rows of the epochs after it (they
        are trained again and would appear twice) and continue wall_time from the last kept row, so the file reads
        as one run. The rewrite is atomic; TensorBoard / wandb keep their own history (both show the newest value
        at a step)."""
        if not self.is_main_process:
            return
        from rl.checkpoint import atomic_write_bytes

        path = self.run_dir / "metrics.jsonl"
        self._jsonl.close()
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        kept = []  # (line, row) of the epochs up to the checkpoint
        for k, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if k == len(lines) - 1:  # a kill while the last row was written: that epoch is trained again
                    continue
                raise ValueError(f"{path}: line {k + 1} is not JSON; repair or remove it to resume") from None
            if row.get("step", 0) <= step:
                kept.append((line, row))
        atomic_write_bytes(path, "".join(line + "\n" for line, _ in kept).encode())
        offset = max((row.get("wall_time", 0.0) for _, row in kept), default=0.0)
        self._start = time.time() - offset
        self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def log(self, metrics: Mapping[str, float | torch.Tensor], step: int) -> None:
        """Log scalars at ``step``; names must look like ``group/name``."""
        if not self.is_main_process:
            return
        values = {}
        for name, value in metrics.items():
            if "/" not in name or name.startswith("/") or name.endswith("/"):
                raise ValueError(f"metric '{name}' needs a group prefix, like 'reward/mean' or 'policy/{name}'")
            values[name] = _scalar(name, value)
        record = {"step": int(step), "wall_time": round(time.time() - self._start, 3),
                  **{name: _short(value) for name, value in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, global_step=step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def log_images(self, tag: str, images: torch.Tensor | Sequence[Image.Image], step: int) -> None:
        """Log an image grid: a (3, H, W) float tensor in [0, 1], or a list of same-size PIL images."""
        if not self.is_main_process:
            return
        grid = _to_grid(images, tag)  # (3, H, W)
        pixels = (grid.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)  # (H, W, 3)
        out = self.run_dir / "images" / tag / f"{step:08d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(out)
        if self._tb is not None:
            self._tb.add_image(tag, grid, global_step=step, dataformats="CHW")
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Image(Image.fromarray(pixels))}, step=step)

    def close(self) -> None:
        """Flush and close every backend; safe to call twice."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Timer:
    """Wall-clock seconds accumulated per named section.

        timer = Timer(cuda_sync=True)
        with timer("rollout"):
            ...
        logger.log(timer.summary(reset=True), step)   # {"time/rollout": 1.93, ...}

    Args:
        cuda_sync: call ``torch.cuda.synchronize()`` at both ends of a section, so that asynchronous kernels
            are charged to the section that launched them (costs a sync; off by default).
        clock: seconds as a float; ``time.perf_counter`` (tests pass a fake clock).
    """

    def __init__(self, cuda_sync: bool = False, clock: Callable[[], float] = time.perf_counter) -> None:
        self.cuda_sync = cuda_sync and torch.cuda.is_available()
        self.clock = clock
        self._seconds: defaultdict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.cuda_sync:
            torch.cuda.synchronize()
        start = self.clock()
        try:
            yield
        finally:
            if self.cuda_sync:
                torch.cuda.synchronize()
            self._seconds[name] += self.clock() - start

    def summary(self, reset: bool = False) -> dict[str, float]:
        """``{"time/<section>": seconds}`` accumulated since creation or the last reset."""
        out = {f"time/{name}": seconds for name, seconds in self._seconds.items()}
        if reset:
            self.reset()
        return out

    def reset(self) -> None:
        self._seconds.clear()
