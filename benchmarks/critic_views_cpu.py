"""Averaging views of the low-σ expert at σ 0.1 (session 22): does a mean of less correlated values close the gap?

At σ 0.1 the shipped `stitchvm_experts_denoised` ranks the policy's latents at ρ .973-.977 against V_MC, Tweedie at
.999: the rest is the student's fidelity to the reward on near-clean latents. A mean of values whose errors are not
the same would shrink it. The views here, each on the policy's denoised estimate x̂0 re-noised to σ_in (the
shipped setting at σ 0.1: 0.05):

- ``prompt``: the shipped low expert (its head runs the DiT on the prompt being valued);
- ``null``: the same weights with the head on null text "" (stage 2 dropped 10 % of the captions, so it was
  distilled for that too); the score is still against the prompt;
- ``other``: another build of the recipe (``--other DIR``; session 22's 6-block 10000-step build);
- and the means ``prompt+null``, ``prompt+other``, ``all``.

On critics.bench_value's protocol (held-out prompts, ODE trajectories with σ as a schedule node, V_MC from K SDE
rollouts in two halves): Spearman ρ against V_MC, and the correlation of each view's error (value − V_MC) with the
shipped one's.

    python benchmarks/critic_views_cpu.py --other runs/s22/call2/L10k6 --n-prompts 512 --prompt-seed 1   # CPU, ~10 min
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from critics import load
from critics.baselines import MonteCarloCritic, TweedieCritic
from critics.bench_value import MC_ETA, MC_SEEDS, batched_values, spearman, trajectory_latents
from critics.denoised import DenoisedCritic
from shapes.data import prompts as shapes_prompts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from critic_on_denoised import screen_parser, screen_world  # noqa: E402  (a sibling script)

LOW = "shapes/weights/stitchvm_prompt_low"


class NullHead(nn.Module):
    """A prompt-head StitchVM run with its head on null text, scored against the prompts being valued."""

    dense = True

    def __init__(self, critic: nn.Module):
        super().__init__()
        self.critic = critic
        self.latent_channels, self.latent_size = critic.latent_channels, critic.latent_size

    def value(self, z_t: Tensor, sigma: Tensor | float, prompts=None) -> Tensor:
        return self.critic.score(self.critic.features(z_t, sigma, None).embed, prompts).float()


class Mean(nn.Module):
    """The mean of several critics' values."""

    def __init__(self, *critics: nn.Module):
        super().__init__()
        self.parts = nn.ModuleList(critics)

    def value(self, z_t: Tensor, sigma: Tensor | float, prompts=None) -> Tensor:
        return torch.stack([c.value(z_t, sigma, prompts) for c in self.parts]).mean(0)


def main(argv: list[str] | None = None) -> None:
    ap = screen_parser(__doc__.split("\n\n")[0], 512)
    ap.add_argument("--other", required=True, help="another StitchVM build of the low-σ recipe")
    ap.add_argument("--sigma", type=float, default=0.1)
    ap.add_argument("--sigma-in", type=float, default=0.05)
    args = ap.parse_args(argv)
    policy, reward, cfg = screen_world()
    low, other = (load.stitchvm(policy, reward, p).eval() for p in (LOW, args.other))

    def on_x0(critic: nn.Module) -> DenoisedCritic:
        return DenoisedCritic(policy, critic, args.sigma_in, cfg.guidance_scale)

    views = {"prompt": on_x0(low), "null": on_x0(NullHead(low)), "other": on_x0(other)}
    critics = {**views, "prompt+null": Mean(views["prompt"], views["null"]),
               "prompt+other": Mean(views["prompt"], views["other"]),
               "all": Mean(*views.values()),
               "tweedie": TweedieCritic(policy, reward, guidance_scale=cfg.guidance_scale)}
    prompts = shapes_prompts("test", args.n_prompts, args.prompt_seed)
    z = trajectory_latents(policy, prompts, [args.sigma], cfg.num_steps, cfg.guidance_scale, 128)[args.sigma]
    device = policy.device
    halves = [MonteCarloCritic(policy, reward, num_rollouts=args.rollouts // 2, num_steps=cfg.num_steps, eta=MC_ETA,
                               guidance_scale=cfg.guidance_scale, seed=s) for s in MC_SEEDS]
    v_a, v_b = (batched_values(h.value, z, args.sigma, prompts, max(1, 64 // args.rollouts), device)[0]
                for h in halves)
    truth = (v_a + v_b) / 2
    values = {n: batched_values(c.value, z, args.sigma, prompts, 64, device)[0] for n, c in critics.items()}
    print(f"{args.n_prompts} prompts (test split, seed {args.prompt_seed}), σ {args.sigma}, the views on x̂0 re-noised "
          f"to σ_in {args.sigma_in}, K = {args.rollouts}; MC split-half ρ {spearman(v_a, v_b):.3f}\n")
    print("| view | ρ vs V_MC | error std | error correlation with `prompt` |")
    print("|---|---|---|---|")
    rows = {}
    for n, v in values.items():
        error, shipped = v - truth, values["prompt"] - truth
        rows[n] = {"rho": spearman(v, truth), "error_std": float(error.std()),
                   "error_corr": float(torch.corrcoef(torch.stack([error, shipped]))[0, 1])}
        print(f"| {n} | {rows[n]['rho']:.3f} | {rows[n]['error_std']:.4f} | {rows[n]['error_corr']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "json"},
                       "mc_split_half_rho": spearman(v_a, v_b), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
