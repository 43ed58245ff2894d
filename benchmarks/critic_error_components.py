"""Is the student's error a per-caption bias or per-image noise? (issue #4, session 20; CPU, ~4 minutes)

critic_error_split.py measures the student's fidelity to the teacher on one policy sample per prompt. Here every
prompt gets K samples (CFG 4.5, 20 steps), so the error e = student − teacher splits into a between-prompt part (a
bias the student carries for a caption: the variance of the per-prompt mean error, less its sampling share
within/K) and a within-prompt part (the mean per-prompt variance). The teacher's score splits alike. Also reported:
the pooled Spearman ρ(student, teacher), and the mean over prompts of ρ within each prompt's K samples, the ranking a
GRPO group uses.

    python benchmarks/critic_error_components.py [--prompts 128] [--k 4] [--sigmas 0.1 0.25]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from scipy.stats import spearmanr

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]  # run from anywhere
from critic_error_split import load_models, split  # noqa: E402

from shapes.data import prompts as shapes_prompts  # noqa: E402


def components(values: torch.Tensor) -> tuple[float, float]:
    """(between, within) variance of a (P, K) table: Var of the row means less E[row var]/K, and E[row var]."""
    within = values.var(1).mean()
    return float(values.mean(1).var() - within / values.shape[1]), float(within)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--critic", default="shapes/weights/stitchvm_prompt_low", help="a j = 1 critic")
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--k", type=int, default=4, help="samples per prompt (≥ 2)")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 0.25])
    args = p.parse_args(argv)
    if args.k < 2:
        raise SystemExit(f"error: --k must be at least 2 to split within from between prompts; got {args.k}")
    policy, critic, teacher = load_models(args.critic)
    P, K = args.prompts, args.k
    print(f"{args.critic}, {P} prompts x {K} policy samples\n")
    print("| prompts | σ | error var: between / within (between share) | teacher var: between / within | pooled ρ | "
          "mean ρ within a prompt |")
    print("|---|---|---|---|---|---|")
    for split_name, seed in (("test", 1), ("train", 5)):
        prompts = [q for q in shapes_prompts(split_name, P, seed) for _ in range(K)]
        with torch.no_grad():
            traj = policy.sample(prompts, num_steps=20, guidance_scale=4.5, generator=torch.Generator().manual_seed(0),
                                 keep_latents=False)
            images = policy.decode(traj.z_tau).clamp(0, 1)
            latents = policy.encode(images).float()  # E(x0), as stage 2 trains on
        for sigma in args.sigmas:
            r = split(critic, teacher, images, latents, prompts, sigma, torch.Generator().manual_seed(1))
            s, t = r["student"].view(P, K), r["teacher"].view(P, K)
            eb, ew = components(s - t)
            tb, tw = components(t)
            within = [spearmanr(s[i], t[i]).statistic for i in range(P) if t[i].std() > 1e-4]
            within = [v for v in within if v == v]  # a prompt whose student scores tie has no ρ
            print(f"| {split_name} | {sigma:g} | {eb:.2e} / {ew:.2e} ({eb / (eb + ew):.2f}) | {tb:.2e} / {tw:.2e} | "
                  f"{spearmanr(s.flatten(), t.flatten()).statistic:.3f} | {sum(within) / len(within):.3f} "
                  f"({len(within)} prompts) |", flush=True)


if __name__ == "__main__":
    main()
