"""What the VAE round trip does to the reward, and how well critics reproduce r(D(z0)) on the policy's own latents.
(session 21)

The value a trainer asks for is E[r(D(z0)) | z_t]: the reward of the image the policy's latent z0 decodes to. Stage 2
used to score the clean image x0 and noise the student's z_t from E(x0); for the policy's samples that pairs
r(D(z0)) with E(D(z0)), which differs from z0. This reports, on the policy's samples (CFG 4.5, 20 steps) for train-
and test-split prompts:

    round trip      r(D(E(D(z0)))) against r(D(z0)): std of the difference, Spearman ρ (what stage 2's targets miss)
    per critic, σ   the critic on z_t noised from the sample's own z0 / from E(D(z0)), against r(D(z0))

    python benchmarks/critic_vae_round_trip.py [--n 256] [--critic DIR ...]      # CPU: ~2 minutes a critic
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from scipy.stats import spearmanr

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]  # run from anywhere
from critic_error_split import load_models  # noqa: E402
from critics import load  # noqa: E402
from shapes import models  # noqa: E402
from shapes.data import prompts as shapes_prompts  # noqa: E402


@torch.no_grad()
def teacher_scores(critic, teacher, images, prompts):
    return torch.cat([critic.score(teacher.encode(images[s:s + 64]).embed, prompts[s:s + 64]).float()
                      for s in range(0, len(images), 64)])


@torch.no_grad()
def critic_scores(critic, z0, prompts, sigma, seed=1):
    gen, out = torch.Generator().manual_seed(seed), []
    for s in range(0, len(z0), 64):
        z = z0[s:s + 64]
        z_t = (1 - sigma) * z + sigma * torch.randn(z.shape, generator=gen)
        out.append(critic(z_t, torch.full((z.shape[0],), sigma), prompts[s:s + 64]).float())
    return torch.cat(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=256, help="policy samples per prompt split")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.02, 0.1, 0.25])
    p.add_argument("--critic", nargs="+", default=["shapes/weights/stitchvm_prompt_low"])
    args = p.parse_args(argv)
    policy, first, teacher = load_models(args.critic[0])
    critics = {args.critic[0]: first}
    for path in args.critic[1:]:
        critics[path] = load.stitchvm(policy, models.load_shapes_reward(), path).eval()
    gen = torch.Generator().manual_seed(0)
    print("| prompts | σ | critic | own z0: std (ρ) vs r(D(z0)) | E(D(z0)): std (ρ) vs r(D(z0)) |")
    print("|---|---|---|---|---|")
    notes = []
    for split, seed in (("train", 5), ("test", 1)):
        prompts = shapes_prompts(split, args.n, seed)
        z0 = policy.sample(prompts, num_steps=20, guidance_scale=4.5, generator=gen, keep_latents=False).z_tau.float()
        with torch.no_grad():
            images = policy.decode(z0)
            z_rt = policy.encode(images).float()
            images_rt = policy.decode(z_rt)
        truth = teacher_scores(first, teacher, images, prompts)
        rt = teacher_scores(first, teacher, images_rt, prompts)
        notes.append(f"{split} prompts: r(D(z0)) std {truth.std():.4f}; round trip r(D(E(D(z0)))) vs r(D(z0)): "
                     f"std {(rt - truth).std():.4f}, ρ {spearmanr(rt, truth).statistic:.3f}; "
                     f"|E(D(z0)) − z0| / |z0| {((z_rt - z0).norm() / z0.norm()).item():.3f}")
        for sigma in args.sigmas:
            for path, critic in critics.items():
                cells = []
                for z in (z0, z_rt):
                    v = critic_scores(critic, z, prompts, sigma)
                    cells.append(f"{(v - truth).std():.4f} ({spearmanr(v, truth).statistic:.3f})")
                print(f"| {split} | {sigma:g} | {path} | " + " | ".join(cells) + " |", flush=True)
    print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
