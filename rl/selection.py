"""Early stopping on a validation prompt set: keep the adapter with the best validation score (``run.keep_best``).

Policy-gradient runs on a small model often peak and then turn down (docs/bench/trainers_session5_h100.md: GRPO on
Shapes reaches +0.154 held-out at 6 minutes and ends at +0.068). Choosing the adapter on the *reported* evaluation
set would be selection on the test set, so the choice is made on ``prompts.val``, a separate prompt set from which
rl/train.py removes every prompt of ``prompts.eval``, sampled with other noise (``eval.seed + 1``):

    at the start, at every evaluation (every ``run.eval_every`` epochs) and at the end:
        s_e = metric(policy_e, prompts.val)[run.best_metric]
        if s_e > best: best, theta_best = s_e, theta_e     (ties keep the earlier, smaller change; NaN never wins)
    at the end: theta <- theta_best, then the final held-out evaluation and the diffusers export

The start counts: if training never beats the initial policy on validation, the run finishes with the initial
adapter; the end counts, so the epochs after the last evaluation are candidates too. The kept adapter, its score and
a fingerprint of the validation set are part of every checkpoint, so a resumed run chooses as an uninterrupted one
would (a resume from a checkpoint written without keep_best validates the restored adapter first). Under DeepSpeed
the snapshot is the fp32 master copy (rl.common.adapter_tensors), as in checkpoints. Every process runs all of this
with the same gathered scores, so the collectives inside match.
"""

from __future__ import annotations

import hashlib
import json
import math

import torch
from torch import Tensor

from rl import common
from rl.config import ConfigError

GROUP = "best_adapter"  # the checkpoint's tensor group


class BestAdapter:
    """The best adapter so far by validation score (module docstring)."""

    def __init__(self, metric: str, prompts: list[str], eval_cfg: common.EvalConfig):
        self.metric = metric
        # what the scores are comparable under: the validation prompts and the sampler that draws them
        setting = {"prompts": list(prompts), "num_steps": eval_cfg.num_steps,
                   "guidance_scale": eval_cfg.guidance_scale, "seed": eval_cfg.seed}
        self.fingerprint = hashlib.sha256(json.dumps(setting).encode()).hexdigest()[:16]
        self.score = -math.inf
        self.epoch: int | None = None
        self.tensors: dict[str, Tensor] | None = None
        self.last_validated: int | None = None

    def validate(self, run: common.Run, epoch: int, adapter: str = "default") -> dict[str, float]:
        """Score ``adapter`` on the validation prompts after ``epoch`` epochs; keep it if it is the best so far.
        Returns the validation scores (``val/...``) and the choice so far (``best/...``). Every process calls it."""
        scores, _ = common.evaluate(run, adapter, run.val_prompts, seed=run.eval_cfg.seed + 1)
        key = f"eval/{self.metric}"
        if key not in scores:
            raise ConfigError(f"run.best_metric={self.metric!r} is not a score of the eval metric; it gives: "
                              f"{', '.join(k.removeprefix('eval/') for k in sorted(scores))}")
        value = scores[key]
        self.last_validated = epoch
        if value > self.score:  # NaN never wins
            self.score, self.epoch = value, epoch
            self.tensors = {k: v.detach().to("cpu", torch.float32, copy=True)
                            for k, v in common.adapter_tensors(run, adapter).items()}
        return {**{f"val/{k.removeprefix('eval/')}": v for k, v in scores.items()}, **self.chosen()}

    def chosen(self) -> dict[str, float]:
        """``best/epoch`` and ``best/val_<metric>`` once an adapter is kept ({} before)."""
        if self.epoch is None:
            return {}
        return {"best/epoch": float(self.epoch), f"best/val_{self.metric}": self.score}

    def finish(self, run: common.Run, epoch: int, adapter: str = "default") -> dict[str, float]:
        """At the end of a run (``epoch`` epochs done): validate the last adapter unless that was just done, then
        load the kept adapter into ``adapter`` for the final evaluation and export. Returns the last validation's
        scores (if it ran) and the choice."""
        out = self.validate(run, epoch, adapter) if self.last_validated != epoch else {}
        if self.tensors is None:
            raise RuntimeError(f"run.keep_best: every validation score of {self.metric!r} was NaN, so no adapter was "
                               f"chosen and none is exported; the last adapter is in the checkpoints of "
                               f"{run.run_dir} (check the eval metric, or resume with run.keep_best=false)")
        common.load_adapter(run, adapter, self.tensors)
        return {**out, **self.chosen()}

    # ---------------------------------------------------------------------------------------- checkpoints
    def state(self) -> tuple[dict[str, dict[str, Tensor]], dict]:
        """(tensor groups, JSON state) for a checkpoint."""
        if self.tensors is None:
            return {}, {}
        return {GROUP: self.tensors}, {"best": {"epoch": self.epoch, "score": self.score, "metric": self.metric,
                                                "fingerprint": self.fingerprint}}

    def load(self, tensors: dict[str, dict[str, Tensor]], state: dict) -> None:
        """Restore from a checkpoint written by a run with keep_best (a checkpoint without it: start afresh)."""
        best = state.get("best")
        if best is None or GROUP not in tensors:
            return
        if best["metric"] != self.metric:
            raise ConfigError(f"run.best_metric={self.metric!r}, but the checkpoint chose by {best['metric']!r}: "
                              f"resume with run.best_metric={best['metric']}")
        if best["fingerprint"] != self.fingerprint:
            raise ConfigError("the checkpoint's kept adapter was scored on other validation prompts or another eval "
                              "sampler (prompts.val, eval.num_steps / guidance_scale / seed): resume with the same "
                              "ones, or start a new run")
        self.score, self.epoch = float(best["score"]), int(best["epoch"])
        self.tensors = {k: v.float() for k, v in tensors[GROUP].items()}


# -------------------------------------------------------------------------------------------- trainer hooks
# One call each at the places every trainer loop shares; all are no-ops without run.keep_best.
def on_evaluation(run: common.Run, epoch: int, adapter: str = "default") -> dict[str, float]:
    """After the held-out evaluation at ``epoch`` (0: the initial policy): validate, timed as evaluation."""
    if run.best is None:
        return {}
    with run.timer("eval"):
        return run.best.validate(run, epoch, adapter)


def on_resume(run: common.Run, epoch: int, adapter: str = "default") -> None:
    """After a restore: a checkpoint written without keep_best holds no kept adapter, so the restored one is
    validated (and logged at ``epoch``) to become the first candidate."""
    if run.best is not None and run.best.tensors is None:
        run.logger.log(run.best.validate(run, epoch, adapter), epoch)


def on_finish(run: common.Run, epoch: int, adapter: str = "default") -> dict[str, float]:
    """Before the final evaluation: load the kept adapter into ``adapter`` (BestAdapter.finish)."""
    return run.best.finish(run, epoch, adapter) if run.best is not None else {}
