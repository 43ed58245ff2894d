"""Do the two prompt-conditioned experts rank better together at sigma = 0.5 than either alone? (issue #4, CPU)

    python benchmarks/expert_blend.py                  # 512 prompts, validation (seed 1) then test (seed 0) prompts

`stitchvm_experts` routes sigma <= 0.5 to the low-sigma build and the rest to the uniform one. At sigma 0.5 the two
tie (rho .756 / .755 against V_MC on 1024 validation prompts, docs/critic.md session 7), and issue #4 asks for
rho >= 0.8 there. If their errors are partly independent, the mean of their values ranks better than either: two
critic passes instead of one, still far below Tweedie's decode. Protocol of critics.bench_value (the policy's own
ODE trajectories at exactly sigma, V_MC from 8 SDE rollouts, Spearman rho and MSE against it), at the sigmas given.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from critics import bench_value as bv
from critics import load
from critics.baselines import TweedieCritic
from critics.stitchvm import HeadText
from shapes import models
from shapes.data import prompts as shapes_prompts

EXPERTS = {"low": "shapes/weights/stitchvm_prompt_low", "uniform": "shapes/weights/stitchvm_prompt"}


class MeanCritic(nn.Module):
    """V = the mean of the critics' values."""

    dense = True

    def __init__(self, critics: list[nn.Module]):
        super().__init__()
        self.critics = nn.ModuleList(critics)

    def value(self, z_t, t, prompts):
        return torch.stack([c.value(z_t, t, prompts).float() for c in self.critics]).mean(0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-prompts", type=int, default=512)
    p.add_argument("--sigmas", default="0.5")
    p.add_argument("--rollouts", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seeds", default="1,0", help="prompt seeds: validation (1) first, then the test prompts (0)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--expert", action="append", default=None, metavar="NAME=DIR",
                   help="an expert to blend (repeatable); default: the two shipped prompt experts")
    args = p.parse_args(argv)
    paths = dict(e.split("=", 1) for e in args.expert) if args.expert else EXPERTS
    dev = torch.device(args.device)
    torch.manual_seed(0)
    policy = models.load_shapes_policy(dev).eval().requires_grad_(False)
    reward = models.load_shapes_reward(dev)
    cfg = models.policy_config(None)
    text = HeadText(policy.encode_prompts)
    experts = {n: load.stitchvm(policy, reward, d, head_text=text).eval() for n, d in paths.items()}
    critics = {**experts, "mean": MeanCritic(list(experts.values())).eval(),
               "tweedie": TweedieCritic(policy, reward, guidance_scale=cfg.guidance_scale).eval()}
    sigmas = tuple(float(s) for s in args.sigmas.split(","))
    print(f"rho (MSE) against V_MC, {args.n_prompts} prompts, K = {args.rollouts}\n")
    print("| prompts | sigma | " + " | ".join(critics) + " | MC split-half |")
    print("|---|---|" + "---|" * (len(critics) + 1))
    for seed in (int(s) for s in args.seeds.split(",")):
        prompts = shapes_prompts("test", args.n_prompts, seed)
        latents = bv.trajectory_latents(policy, prompts, sigmas, cfg.num_steps, cfg.guidance_scale, args.batch_size)
        out = bv.value_quality(policy, reward, critics, prompts, latents, args.rollouts, cfg.num_steps,
                               cfg.guidance_scale, args.batch_size)
        name = {1: "validation (seed 1)", 0: "test (seed 0)"}.get(seed, f"seed {seed}")
        for sigma, row in out["rows"].items():
            cells = " | ".join(f"{row[f'{c}/rho']:.3f} ({row[f'{c}/mse']:.4f})" for c in critics)
            print(f"| {name} | {sigma} | {cells} | {row['mc/split_half_rho']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
