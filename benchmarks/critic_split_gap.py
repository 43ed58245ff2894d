"""Is the StitchVM's low-σ ranking gap to Tweedie specific to held-out colour-shape pairs? (session-8 diagnostic)

On the policy's own trajectories (critics.bench_value's sampler: Euler ODE, the policy's steps and CFG) for
``--n`` train-split and ``--n`` test-split prompts, the critics' values at each σ against Tweedie's (≈ the Monte-
Carlo truth at σ ≤ 0.25: ρ 0.999 / 0.988, docs/critic.md): Spearman ρ and the std of the difference, overall and
split by whether ShapesEval finds the sample's colours right. CPU: ~3.5 minutes at the defaults.

    python benchmarks/critic_split_gap.py [--n 128] [--sigmas 0.1,0.25] [--device cpu]
"""

from __future__ import annotations

import argparse

import torch

from critics import bench_value as bv
from critics import load
from critics.baselines import TweedieCritic
from shapes import models
from shapes.data import prompts as shapes_prompts
from shapes.eval import ShapesEval

CRITICS = {"prompt_low": "shapes/weights/stitchvm_prompt_low", "stitchvm": "shapes/weights/stitchvm"}
SPLIT_SEEDS = {"train": 123, "test": 1}  # test seed 1: the value benchmark's validation prompts


def parse_args(doc: str, sigmas: str, argv: list[str] | None) -> argparse.Namespace:
    """The diagnostics' shared options (this script and critic_latent_domain.py); ``sigmas``: the default list."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--n", type=int, default=128, help="prompts per split (one trajectory each)")
    p.add_argument("--sigmas", default=sigmas)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    args.sigmas = tuple(float(s) for s in args.sigmas.split(","))
    args.device = torch.device(args.device)
    return args


def load_world(dev: torch.device):
    """(policy, reward, the policy's sampling config, {name: shipped StitchVM of CRITICS}) on ``dev``."""
    torch.manual_seed(0)
    policy = models.load_shapes_policy(dev).eval().requires_grad_(False)
    reward = models.load_shapes_reward(dev)
    critics = {n: load.stitchvm(policy, reward, d).eval() for n, d in CRITICS.items()}
    return policy, reward, models.policy_config(None), critics


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__, "0.1,0.25", argv)
    sigmas, dev = args.sigmas, args.device
    policy, reward, cfg, critics = load_world(dev)
    tweedie = TweedieCritic(policy, reward, guidance_scale=cfg.guidance_scale).eval()
    checker = ShapesEval()
    print("| split | σ | critic | ρ vs tweedie | err std | err std, colours right / wrong (n) | tweedie std |")
    print("|---|---|---|---|---|---|---|")
    for split, seed in SPLIT_SEEDS.items():
        prompts = shapes_prompts(split, args.n, seed)
        lat = bv.trajectory_latents(policy, prompts, sigmas + (0.0,), cfg.num_steps, cfg.guidance_scale, args.batch_size)
        with torch.no_grad():
            images = torch.cat([policy.decode(lat[0.0][s:s + args.batch_size]) for s in range(0, args.n, args.batch_size)])
        right = checker(images, prompts).color.cpu().numpy() == 1
        for sigma in sigmas:
            tw = bv.batched_values(tweedie.value, lat[sigma], sigma, prompts, args.batch_size, dev)[0]
            for name, critic in critics.items():
                v = bv.batched_values(critic.value, lat[sigma], sigma, prompts, args.batch_size, dev)[0]
                err = v - tw
                print(f"| {split} | {sigma:g} | {name} | {bv.spearman(v, tw):.3f} | {err.std():.3f} | "
                      f"{err[right].std():.3f} / {err[~right].std():.3f} ({right.sum()} / {(~right).sum()}) | "
                      f"{tw.std():.3f} |", flush=True)


if __name__ == "__main__":
    main()
