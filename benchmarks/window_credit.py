"""How a critic splits GRPO-Fast's credit between the window's two steps, against the truth (issues #6 and #4).

    python benchmarks/window_credit.py                      # 16 train prompts x 8 samples x 9 continuations, CPU
    python benchmarks/window_credit.py --device cuda --prompts 64

Flow-GRPO-Fast as shipped (configs/experiments/shapes_gpu_grpo.yaml: 10 steps, eta 0.7, CFG 1, a 2-step SDE window
starting at k ~ U{0..4}, shared initial noise per group). The G samples of a prompt share z_T and the ODE steps up to
k, so they differ only through the noise of steps k and k+1. After the window the ODE is deterministic, so
V(z_{k+2}) = R exactly (rl.advantages.ode_values). With GAE lambda 0 and centring per group, the dense advantages are

    A_k     = V(z_{k+1}) - mean_group V(z_{k+1})
    A_{k+1} = (R - V(z_{k+1})) - mean_group (R - V(z_{k+1}))

So one critic value per sample, at sigma_{k+1}, decides how the group-relative reward R - mean R is split between
the two steps. The truth is V*(z_{k+1}) = E[R | z_{k+1}]: here the mean of M - 1 continuations (step k+1's SDE
noise, then the ODE) under the rollout policy, and R another, independent one. Per window start k (the critic is asked at
sigma_{k+1}), within groups (group means removed, pooled over prompts):

    share*   Var V* / Var R: the share of the group-relative reward variance that step k's action decides. It is
             corrected for the noise of V* (the continuations' variance / (M - 1) is subtracted).
    rho      Spearman of the critic's V(z_{k+1}) against V*.
    slope    least-squares slope of V* on V: 1 = the critic's within-group differences have the right scale;
             0 = they carry no information.
    err A_k  E (A_k - A_k*)^2 / Var A_k* with A_k* = V* - mean V*: 1.0 is what giving step k no credit scores,
             and "sparse" is Flow-GRPO's sparse signal, A_k = R - mean R.
    calibrated  the critic's deviations scaled by the least-squares slope of the one-rollout R on V, fitted on the
             same samples (what ``algo.dense_calibration=batch`` does in a trainer, rl.advantages.calibrate_values),
             and the err A_k that gives.

Tweedie (decode-and-score of z_t - sigma v at sigma_{k+1}) is the decode-and-score reference.

A second table (session 14) scores the trainers' whole estimators over both window steps. The truth is A_k* = V* and
A_{k+1}* = R - V*, group means removed. Each estimator's advantages are given, and the correlation of each step's
advantages with the truth is reported (scale-free, as the trainers normalise):

    sparse              A_k = A_{k+1} = R                           (Flow-GRPO; the decode-and-score twins)
    dense, lambda 0     A_k = V(z_{k+1}),  A_{k+1} = R - V(z_{k+1})  (the shipped configs until session 15)
    dense, lambda 0, cal  the same with V scaled by the batch's slope of R on V (``dense_calibration: batch``)
    dense, lambda 1, cal  A_k = R - V(z_k) = R (z_k is shared within a group), A_{k+1} = R - beta V(z_{k+1})
                          (the trainers' dense default since session 15)

A step whose advantages are all 0 (a calibrated critic with slope 0) has no correlation: "0 (no credit)".
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy.stats import spearmanr

from critics import bench_value as bv
from critics import load
from critics.baselines import TweedieCritic
from policies import samplers
from shapes import models
from shapes.data import prompts as shapes_prompts

NUM_STEPS, ETA, CFG = 10, 0.7, 1.0  # shapes_gpu_grpo.yaml via configs/algo/grpo.yaml
WINDOW_STARTS = (0, 1, 2, 3, 4)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=16, help="train prompts (one group each)")
    p.add_argument("--group", type=int, default=8, help="G: samples per prompt sharing z_T")
    p.add_argument("--continuations", type=int, default=9, help="M: rollouts from each z_{k+1} (R and M - 1 for V*)")
    p.add_argument("--starts", default=",".join(map(str, WINDOW_STARTS)), help="window starts k")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


@torch.no_grad()
def window_rollouts(policy, reward, prompts: list[str], k: int, group: int, m: int, batch_size: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For P prompts x G samples: z_{k+1} (P*G, ...) after the window's first SDE step from a z_T shared per group,
    and the rewards (P*G, M) of M continuations from each (step k+1 stochastic, then the ODE)."""
    dev = next(policy.parameters()).device
    sigmas = policy.sigmas(NUM_STEPS, dev)
    rows = [p for p in prompts for _ in range(group)]
    z_T = policy.noise(len(prompts), generator).repeat_interleave(group, 0)
    z1 = []
    for s in range(0, len(rows), batch_size):
        fn = policy.velocity_fn(policy.encode_prompts(rows[s:s + batch_size]), CFG)
        z1.append(samplers.sample(fn, z_T[s:s + batch_size], sigmas, eta=ETA, sde_steps=[k], stop_at=k + 1,
                                  generator=generator, keep_latents=False).z_tau)
    z1 = torch.cat(z1)
    rep_rows = [p for p in rows for _ in range(m)]
    rep_z = z1.repeat_interleave(m, 0)
    tail = sigmas[k + 1:]  # the rest of the schedule; its first step (k+1) is the window's second SDE step
    rewards = []
    for s in range(0, len(rep_rows), batch_size):
        fn = policy.velocity_fn(policy.encode_prompts(rep_rows[s:s + batch_size]), CFG)
        z0 = samplers.sample(fn, rep_z[s:s + batch_size], tail, eta=ETA, sde_steps=[0], generator=generator,
                             keep_latents=False).z_tau
        rewards.append(reward(policy.decode(z0), rep_rows[s:s + batch_size]).float())
    return z1, rows, torch.cat(rewards).view(len(rows), m)


def within(x: torch.Tensor, group: int) -> np.ndarray:
    """x (P*G,) with each group's mean removed."""
    g = x.double().view(-1, group)
    return (g - g.mean(1, keepdim=True)).flatten().numpy()


def corr(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two group-centred vectors (their means are 0 by construction); None if a is all 0."""
    na, nb = float(np.dot(a, a)), float(np.dot(b, b))
    return None if na < 1e-24 or nb < 1e-24 else float(np.dot(a, b)) / (na * nb) ** 0.5


def estimator_cell(a_k: np.ndarray, a_k1: np.ndarray, v_star: np.ndarray, r_one: np.ndarray) -> str:
    """'c_k / c_k+1': each step's correlation with its true advantage (V* and R - V*, within groups)."""
    c = [corr(a_k, v_star), corr(a_k1, r_one - v_star)]
    return " / ".join("0 (no credit)" if x is None else f"{x:.2f}" for x in c)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    policy = models.load_shapes_policy(dev).eval().requires_grad_(False)
    reward = models.load_shapes_reward(dev)
    critics = {
        "stitchvm": load.stitchvm(policy, reward, "shapes/weights/stitchvm").eval(),
        "stitchvm_experts": load.stitchvm_experts(policy, reward, ["shapes/weights/stitchvm_prompt_low",
                                                                   "shapes/weights/stitchvm_prompt"], [0.5, 1.0]).eval(),
        "tweedie": TweedieCritic(policy, reward, guidance_scale=CFG).eval(),
    }
    prompts = shapes_prompts("train", args.prompts, 7)
    sig = policy.sigmas(NUM_STEPS, "cpu")
    g, m = args.group, args.continuations
    print(f"{args.prompts} train prompts x {g} samples (shared z_T) x {m} continuations; 10 steps, eta {ETA}, CFG {CFG}\n")
    print("| window start k | sigma_{k+1} | share* | critic | rho vs V* | slope of V* on V | err A_k | calibrated: "
          "slope of R on V, err A_k | err A_k, sparse |")
    print("|---|---|---|---|---|---|---|---|---|")
    estimator_rows = []
    for k in (int(x) for x in args.starts.split(",")):
        generator = torch.Generator(dev).manual_seed(args.seed * 100 + k)
        z1, rows, r = window_rollouts(policy, reward, prompts, k, g, m, args.batch_size, generator)
        # R: the first continuation (the rollout a trainer sees); V*: the mean of the other M - 1, independent of it
        v_star = within(r[:, 1:].mean(1).cpu(), g)
        noise = float(r[:, 1:].var(1, unbiased=True).mean()) / (m - 1)  # the (M-1)-sample noise in V*
        r_one = within(r[:, 0].cpu(), g)
        var_r = float(np.mean(r_one**2)) * g / (g - 1)
        share = (float(np.mean(v_star**2)) * g / (g - 1) - noise) / var_r
        var_a = float(np.mean(v_star**2))
        sparse_err = float(np.mean((r_one - v_star) ** 2)) / var_a
        sigma = float(sig[k + 1])
        for name, critic in critics.items():
            v = bv.batched_values(critic.value, z1, sigma, rows, args.batch_size, dev)[0]
            vw = within(v, g)
            rho = float(spearmanr(vw, v_star).statistic)
            slope = float(np.dot(vw, v_star) / max(np.dot(vw, vw), 1e-30))
            err = float(np.mean((vw - v_star) ** 2)) / var_a
            # what algo.dense_calibration=batch does: the slope of the one-rollout R on V, fitted on these samples
            beta = max(float(np.dot(vw, r_one) / max(np.dot(vw, vw), 1e-30)), 0.0)
            err_cal = float(np.mean((beta * vw - v_star) ** 2)) / var_a
            print(f"| {k} | {sigma:.3f} | {share:.2f} | {name} | {rho:.3f} | {slope:.2f} | {err:.2f} | {beta:.2f}: "
                  f"{err_cal:.2f} | {sparse_err:.2f} |")
            estimator_rows.append((k, name, [estimator_cell(a_k, a_k1, v_star, r_one) for a_k, a_k1 in (
                (r_one, r_one), (vw, r_one - vw), (beta * vw, r_one - beta * vw), (r_one, r_one - beta * vw))]))
    print("\nerr A_k: 1.0 = no credit to step k; below the sparse column = a better split than Flow-GRPO's sparse one.")
    print("\nWhole estimators: correlation of each window step's advantages with the truth, step k / step k+1\n")
    print("| window start k | critic | sparse | dense, lambda 0 | dense, lambda 0, cal | dense, lambda 1, cal |")
    print("|---|---|---|---|---|---|")
    for k, name, row in estimator_rows:
        print(f"| {k} | {name} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
