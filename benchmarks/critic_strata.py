"""Issue #4 diagnostic (session 5): where the StitchVM's ranking against the Monte-Carlo truth fails, by prompt kind.

    python benchmarks/critic_strata.py [N_PROMPTS]        # CPU, ~1.5 minutes for 64 validation prompts

Same protocol as ``python -m critics.bench_value`` (the policy's own ODE trajectories, V_MC = mean CLIP score of SDE
rollouts from z_t; here K = 4, sigma 0.1 and 0.5, validation prompts ``prompts('test', N, 1)``), plus: how much of
V_MC and of the StitchVM's error (V - V_MC) a linear model of the caption's kind explains (number of groups, of
objects, a relation or not), the StitchVM's rho after removing that fitted bias (an optimistic bound: fitted on the
same prompts), and Spearman rho inside each kind. Prints a table; writes nothing.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from critics import bench_value as bv
from critics.baselines import MonteCarloCritic
from shapes import models
from shapes.data import parse_caption, prompts as shapes_prompts

SIGMAS = (0.1, 0.5)


def rho(a, b) -> float:
    return bv.spearman(torch.as_tensor(a), torch.as_tensor(b))


def r2(X: np.ndarray, y: np.ndarray) -> float:
    """Fraction of y's variance a least-squares fit on X explains."""
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    return float(1 - (y - X @ coef).var() / y.var())


def main(n: int = 64) -> None:
    torch.manual_seed(0)
    policy = models.load_shapes_policy("cpu").eval().requires_grad_(False)
    reward = models.load_shapes_reward("cpu")
    cfg = models.policy_config(None)
    prompts = shapes_prompts("test", n, 1)
    critics = bv.load_critics(["stitchvm", "tweedie"], policy, reward, cfg.guidance_scale,
                              "shapes/weights/stitchvm", "shapes/weights/vae_stitch")
    latents = bv.trajectory_latents(policy, prompts, SIGMAS, cfg.num_steps, cfg.guidance_scale, 64)
    mc = MonteCarloCritic(policy, reward, num_rollouts=4, num_steps=cfg.num_steps, eta=bv.MC_ETA,
                          guidance_scale=cfg.guidance_scale, seed=bv.MC_SEEDS[0])
    specs = [parse_caption(p) for p in prompts]
    kind = np.array([[len(s.groups), sum(g.count for g in s.groups), s.relation is not None] for s in specs], float)
    X = np.c_[np.ones(n), kind]
    print("| sigma | rho stitchvm | rho tweedie | R2(V_MC ~ kind) | R2(error ~ kind) | rho stitchvm - kind bias |")
    print("|---|---|---|---|---|---|")
    strata = []
    for sigma in SIGMAS:
        z = latents[sigma]
        v_mc = bv.batched_values(mc.value, z, sigma, prompts, 16, "cpu")[0].numpy()
        v = {name: bv.batched_values(c.value, z, sigma, prompts, 64, "cpu")[0].numpy() for name, c in critics.items()}
        err = v["stitchvm"] - v_mc
        coef, *_ = np.linalg.lstsq(X, err, rcond=None)
        print(f"| {sigma} | {rho(v['stitchvm'], v_mc):.3f} | {rho(v['tweedie'], v_mc):.3f} | {r2(X, v_mc):.3f} | "
              f"{r2(X, err):.3f} | {rho(v['stitchvm'] - X @ coef, v_mc):.3f} |")
        for groups, relation in sorted({(int(k[0]), int(k[2])) for k in kind}):
            m = (kind[:, 0] == groups) & (kind[:, 2] == relation)
            if m.sum() >= 6:
                strata.append(f"| {sigma} | {groups} | {'yes' if relation else 'no'} | {int(m.sum())} | "
                              f"{rho(v['stitchvm'][m], v_mc[m]):.2f} | {rho(v['tweedie'][m], v_mc[m]):.2f} |")
    print("\n| sigma | groups | relation | prompts | rho stitchvm | rho tweedie |\n|---|---|---|---|---|---|")
    print("\n".join(strata))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 64)
