"""Early stopping on a validation prompt set: keep the adapter with the best validation score (``run.keep_best``).

Policy-gradient runs on a small model often peak and then turn down (docs/bench/trainers_session5_h100.md: GRPO on
Shapes reaches +0.154 held-out at 6 minutes and ends at +0.068). Choosing the adapter on the *reported* evaluation
set would be selection on the test set, so the choice is made on ``prompts.val``, a separate prompt set from which
rl/train.py removes every prompt of ``prompts.eval``:

    at the start and at every evaluation (every ``run.eval_every`` epochs):
        s_e = metric(policy_e, prompts.val)[run.best_metric]
        if s_e > best: best, theta_best = s_e, theta_e          (ties keep the earlier, smaller change)
    at the end: theta <- theta_best, then the final held-out evaluation and the diffusers export

The start counts: if training never beats the initial policy on validation, the run finishes with the initial
adapter. The kept adapter and its score are part of every checkpoint, so a resumed run chooses as an uninterrupted
one would. Under DeepSpeed the snapshot is the fp32 master copy (rl.common.adapter_tensors), as in checkpoints.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from policies import lora
from rl import common, distributed
from rl.config import ConfigError

GROUP = "best_adapter"  # the checkpoint's tensor group


class BestAdapter:
    """The best adapter so far by validation score (module docstring)."""

    def __init__(self, metric: str):
        self.metric = metric
        self.score = -math.inf
        self.epoch: int | None = None
        self.tensors: dict[str, Tensor] | None = None

    def validate(self, run: common.Run, epoch: int, adapter: str = "default") -> dict[str, float]:
        """Score ``adapter`` on the validation prompts after ``epoch`` epochs; keep it if it is the best so far.
        Returns the validation scores (``val/...``) and the choice so far (``best/...``). Every process calls it."""
        scores, _ = common.evaluate(run, adapter, run.val_prompts)
        key = f"eval/{self.metric}"
        if key not in scores:
            raise ConfigError(f"run.best_metric={self.metric!r} is not a score of the eval metric; it gives: "
                              f"{', '.join(k.removeprefix('eval/') for k in sorted(scores))}")
        value = scores[key]
        if value > self.score:  # NaN never wins
            self.score, self.epoch = value, epoch
            self.tensors = {k: v.detach().to("cpu", torch.float32, copy=True)
                            for k, v in common.adapter_tensors(run, adapter).items()}
        out = {f"val/{k.removeprefix('eval/')}": v for k, v in scores.items()}
        out.update({"best/epoch": float(self.epoch), f"best/val_{self.metric}": self.score})
        return out

    def apply(self, run: common.Run, adapter: str = "default") -> dict[str, float]:
        """Load the kept adapter into ``adapter`` (before the final evaluation and export)."""
        if self.tensors is None:
            raise RuntimeError("run.keep_best: no adapter was validated (the start-of-run validation did not run)")
        transformer = run.policy.transformer
        dtype = next(iter(lora.adapter_parameters(transformer, adapter).values())).dtype
        lora.load_adapter_state_dict(transformer, {k: v.to(run.device, dtype) for k, v in self.tensors.items()},
                                     adapter)
        if adapter == "default":  # the trained adapter: DeepSpeed's fp32 masters too
            distributed.load_master_weights(run.accelerator, lora.adapter_parameters(transformer, adapter),
                                            self.tensors)
        return {"best/epoch": float(self.epoch), f"best/val_{self.metric}": self.score}

    # ---------------------------------------------------------------------------------------- checkpoints
    def state(self) -> tuple[dict[str, dict[str, Tensor]], dict]:
        """(tensor groups, JSON state) for a checkpoint."""
        if self.tensors is None:
            return {}, {}
        return {GROUP: self.tensors}, {"best": {"epoch": self.epoch, "score": self.score, "metric": self.metric}}

    def load(self, tensors: dict[str, dict[str, Tensor]], state: dict) -> None:
        """Restore from a checkpoint written by a run with keep_best (a checkpoint without it: start afresh)."""
        best = state.get("best")
        if best is None or GROUP not in tensors:
            return
        if best["metric"] != self.metric:
            raise ConfigError(f"run.best_metric={self.metric!r}, but the checkpoint chose by {best['metric']!r}: "
                              f"resume with run.best_metric={best['metric']}")
        self.score, self.epoch = float(best["score"]), int(best["epoch"])
        self.tensors = {k: v.float() for k, v in tensors[GROUP].items()}
