"""Policy-gradient variance of the estimators a whole-trajectory GRPO run *trains* with (CPU, ~1 minute per seed).

    python benchmarks/pg_variance_trained.py [--critic stitchvm] [--seeds 0 1] [--samples 256] [--json OUT]

One rollout of the initial GRPO policy with the SDE at all 10 steps (configs/experiments/shapes_gpu_grpo.yaml with
sde_window 0, group noise, --samples / 16 prompts x 16) and 2 trained steps per sample (timestep_fraction 0.2).
Per-sample gradients g_i = sum over the trained steps of A_ik grad log pi (rl/policy_gradient.py
``gradient_variance``, paired, advantages at unit RMS) for:

    sparse@2-per-sample            Flow-GRPO: group-normalised R on each sample's own 2 random steps
    sparse@2-per-group             the same credit on each group's 2 steps (the draw values_at: trained makes)
    dense-l1-global@trained        R - V(z_k), global scale, V asked at each group's 2 steps only
    dense-l1-cal-global@trained    the same, calibrated (each latent's slope is fitted on the groups that drew it:
                                   ~samples / 80 groups, ~13 in the GPU config's 64)
    dense-shipped(group_step)@...  calibrated, with the shipped per-(group, step) scale

The paired comparison is on the same steps (per-group rows): the draw decides most of the variance, because the late
steps' log-prob gradients are the largest. Session 16's figures: docs/bench/trainers_session16.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import torch

from rl import grpo
from rl import policy_gradient as pg
from rl.bench_trainers import initial_rollout, parse_args

WHOLE_TRAJECTORY = ["algo.sde_window=0", "algo.sde_window_start=[0,0]", "algo.timestep_fraction=0.2"]


def trained_variance(critic: str, seed: int, samples: int) -> dict[str, float]:
    args = parse_args(["--variance-samples", str(samples), "--dense-critic", critic, "--config",
                       "configs/experiments/shapes_gpu_grpo.yaml", "run.cuda_graphs=false",
                       f"run.output_dir=runs/bench/pg_variance_trained_{critic}", *WHOLE_TRAJECTORY])
    run, cfg, params, rollout, values = initial_rollout(args, seed, f"trained-seed{seed}")
    try:
        return estimators_variance(run, cfg, params, rollout, values, seed, samples)
    finally:
        run.logger.close()


def estimators_variance(run, cfg, params, rollout, values, seed: int, samples: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for draw, group in (("per-sample", 1), ("per-group", cfg.group_size)):
        steps = pg.train_steps(rollout.sde_mask, cfg.timestep_fraction, generator, group)
        masks[draw] = torch.zeros_like(rollout.sde_mask).scatter_(1, steps, True)
    trained = masks["per-group"]
    # values_at: trained asks V at the latents that begin each group's steps only
    asked = torch.cat([trained, trained.new_zeros(trained.shape[0], 1)], 1)
    asked_values = torch.where(asked, values, torch.full_like(values, math.nan))

    def adv(mode: str, v, mask, norm: str, calibration: str = "batch"):
        c = dataclasses.replace(cfg, advantages=mode, gae_lambda=1.0, dense_calibration=calibration, dense_norm=norm)
        return grpo.grpo_advantages(rollout.rewards, v, mask, c)

    advs = {"sparse@2-per-sample": adv("sparse", None, masks["per-sample"], "global"),
            "sparse@2-per-group": adv("sparse", None, trained, "global"),
            "dense-l1-global@trained": adv("dense", asked_values, trained, "global", "none"),
            "dense-l1-cal-global@trained": adv("dense", asked_values, trained, "global"),
            "dense-shipped(group_step)@trained": adv("dense", asked_values, trained, "group_step")}
    # backpropagate only where some estimator has credit (every estimator is scaled over the same entries, so their
    # ratios are those over all ten steps)
    union = rollout._replace(sde_mask=masks["per-sample"] | trained)
    return pg.gradient_variance(run.policy, union, advs, params, cfg.eta, cfg.guidance_scale, samples)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--critic", default="stitchvm", help="critic config name (configs/critic)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--samples", type=int, default=256, help="rollout rows (whole groups of 16)")
    p.add_argument("--json", default=None, help="write the per-seed figures here")
    a = p.parse_args(argv)
    res = {seed: trained_variance(a.critic, seed, a.samples) for seed in a.seeds}
    names = sorted({k.split("/")[1] for r in res.values() for k in r})
    print(f"\ntr Cov(g) / n per seed ({', '.join(map(str, a.seeds))}), --critic {a.critic}")
    for name in names:
        print(f"  {name:36s} " + " / ".join(f"{res[s][f'pg/{name}/var']:.3g}" for s in a.seeds))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
