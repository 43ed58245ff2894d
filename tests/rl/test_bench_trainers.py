"""rl/bench_trainers.py's variance section on the tiny world: its rollout follows the config's group noise, and every
estimator is reported."""

from __future__ import annotations

import pytest
import torch

from rl.bench_trainers import VARIANCE_ESTIMATORS, gradient_variance_at_init, initial_rollout, parse_args


def args(tmp_path, *overrides):
    return parse_args(["--tiny", "--variance-samples", "4", "--out", str(tmp_path), "algo.group_size=2",
                       "algo.prompts_per_epoch=2", *overrides])


@pytest.mark.parametrize("group_noise", [True, False])
def test_initial_rollout_follows_the_configs_group_noise(tmp_path, group_noise):
    run, cfg, _, rollout, values = initial_rollout(args(tmp_path, f"algo.group_noise={str(group_noise).lower()}"), 0,
                                                   "rollout")
    run.logger.close()
    z_T = rollout.latents[:, 0].view(-1, cfg.group_size, *rollout.latents.shape[2:])
    assert torch.equal(z_T[:, 0], z_T[:, 1]) == group_noise  # a group's samples start from one z_T, or not
    assert values.shape == rollout.latents.shape[:2] and bool(torch.isfinite(values).all())


def test_variance_section_reports_every_estimator(tmp_path):
    out = gradient_variance_at_init(args(tmp_path, "algo.group_noise=true"), 0)
    assert {f"pg/{est}/{k}" for est in VARIANCE_ESTIMATORS for k in ("var", "grad_sq", "snr")} == set(out)
    assert all(out[f"pg/{est}/var"] > 0 for est in VARIANCE_ESTIMATORS)
    assert out["pg/sparse/var"] != pytest.approx(out["pg/dense-l0/var"], rel=1e-3)  # the critic changes the credit
