"""The StitchVM on the policy's denoised estimate (critics/denoised.py) against V(z_t), Tweedie and V_MC (session 19)

A trainer that samples has the policy's velocity v(z_t) at every step already, so x̂0 = z_t − σ·v(z_t) (Tweedie's
denoised latent) is free there. Tweedie decodes it and runs the pixel reward; this instead feeds it to the low-σ
StitchVM expert, as a latent at a small noise level σ_in, where its fidelity to the reward is highest (ρ ~.94-.96
against the teacher at σ 0.1). If the student's gap at σ 0.5 (.78-.80 against V_MC, Tweedie .85-.87) is the
denoising it has to do inside its head, this would close it at no extra DiT call in a trainer (one here, to get v).

On critics.bench_value's protocol (held-out prompts, ODE trajectories, the latent at exactly σ, V_MC from K SDE
rollouts in two halves), Spearman ρ against V_MC of: the shipped experts on z_t, Tweedie, and the low expert on
x̂0 at each σ_in.

    python benchmarks/critic_on_denoised.py --n-prompts 128 --rollouts 8 --sigmas 0.25 0.5 0.75   # CPU, ~20 minutes
"""

from __future__ import annotations

import argparse
import json

import torch

from critics import load
from critics.baselines import TweedieCritic
from critics.bench_value import trajectory_latents, value_quality
from critics.denoised import DenoisedCritic
from shapes import models
from shapes.data import prompts as shapes_prompts

EXPERTS = (["shapes/weights/stitchvm_prompt_low", "shapes/weights/stitchvm_prompt"], [0.5, 1.0])


def screen_parser(description: str, n_prompts: int) -> argparse.ArgumentParser:
    """The options of a CPU screen on critics.bench_value's protocol (this one and critic_views_cpu.py)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--n-prompts", type=int, default=n_prompts)
    ap.add_argument("--rollouts", type=int, default=8)
    ap.add_argument("--prompt-seed", type=int, default=1, help="1: critics.bench_value's validation prompts")
    ap.add_argument("--json", default=None)
    return ap


def screen_world() -> tuple:
    """(policy, reward, policy config) of the shipped Shapes world, in eval mode, the global seed set."""
    torch.manual_seed(0)
    return (models.load_shapes_policy().eval().requires_grad_(False), models.load_shapes_reward(),
            models.policy_config(None))


def main(argv: list[str] | None = None) -> None:
    ap = screen_parser(__doc__.split("\n\n")[0], 128)
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--sigma-in", type=float, nargs="+", default=[0.1, 0.15, 0.2])
    args = ap.parse_args(argv)
    policy, reward, cfg = screen_world()
    experts = load.stitchvm_experts(policy, reward, *EXPERTS).eval()
    low = load.stitchvm(policy, reward, EXPERTS[0][0]).eval()
    critics = {"experts(z_t)": experts, "tweedie": TweedieCritic(policy, reward, guidance_scale=cfg.guidance_scale)}
    for s_in in args.sigma_in:
        critics[f"low(x̂0, σ_in {s_in:g})"] = DenoisedCritic(policy, low, s_in, cfg.guidance_scale)
    prompts = shapes_prompts("test", args.n_prompts, args.prompt_seed)
    latents = trajectory_latents(policy, prompts, args.sigmas, cfg.num_steps, cfg.guidance_scale, 128)
    result = value_quality(policy, reward, critics, prompts, latents, args.rollouts, cfg.num_steps,
                           cfg.guidance_scale, 64)
    names = list(critics)
    print(f"{args.n_prompts} prompts (test split, seed {args.prompt_seed}), K = {args.rollouts}; Spearman ρ vs V_MC\n")
    print("| σ | MC split-half | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for sigma, row in result["rows"].items():
        print(f"| {sigma} | {row['mc/split_half_rho']:.3f} | " + " | ".join(f"{row[n + '/rho']:.3f}" for n in names)
              + " |")
    print("\ncost ms per value (CPU): " + ", ".join(f"{k} {v:.2f}" for k, v in result["cost_ms_per_value"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "json"}, **result}, f, indent=1)


if __name__ == "__main__":
    main()
