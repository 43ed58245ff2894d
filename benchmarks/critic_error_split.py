"""Where does the StitchVM lose precision on the policy's images: the stitch's tokens or the finetuned tail? (session 14)

The critic's score is tail_S(stitch(head(z_t))) · t, the teacher's tail_T(stem(x0)) · t. The error splits into

    tail_S(stitch(h)) - tail_S(stem(x0))     what the stitch's tokens cost, read by the student's own tail
    tail_S(stem(x0))  - tail_T(stem(x0))     what finetuning the tail changed: the student's tail on the true tokens

and, read the other way, tail_T(stitch(h)) - tail_T(stem(x0)) (the stitch's tokens read by the untouched teacher tail).
Each is reported as the std of the score difference and as Spearman ρ against the teacher's score, over renders and
over the policy's samples on train- and test-split prompts (CFG 4.5, 20 steps), at one noise level. For a j = 1
critic (the shipped prompt experts) the stitch's tokens replace the stem's patch tokens. If the student's tail on the
true tokens is precise where the full student is not, the stitch is the lever; if not, the tail's finetuning is.
CPU: ~1 minute.

    python benchmarks/critic_error_split.py [--n 256] [--sigma 0.1] [--critic shapes/weights/stitchvm_prompt_low]
"""

from __future__ import annotations

import argparse

import torch
from scipy.stats import spearmanr

from critics import load
from critics.build import caption_of, collate_images, first_items, load_config
from critics.load import reward_preprocess
from critics.tails import make_tail
from rl.config import instantiate
from shapes import models
from shapes.data import prompts as shapes_prompts

BUILD_YAML = "configs/critic/build_shapes.yaml"


@torch.no_grad()
def split(critic, teacher, images, latents, prompts, sigma, gen):
    """Scores (B,) of: the full student, the student tail on the true stem tokens, the teacher tail on the student's
    stitch tokens, and the teacher."""
    out = {k: [] for k in ("student", "tail_S(stem)", "tail_T(stitch)", "teacher")}
    for s in range(0, images.shape[0], 64):
        z0, x0, p = latents[s:s + 64], images[s:s + 64], prompts[s:s + 64]
        z_t = (1 - sigma) * z0 + sigma * torch.randn(z0.shape, generator=gen)
        h = critic.head(z_t, torch.full((z0.shape[0],), sigma), critic.head_cond(p, z0.shape[0]))
        stitched = critic.stitch(h)
        stem = teacher.stem(teacher.preprocess(x0))
        embeds = {"student": critic.tail.forward_from(stitched, 1).embed,
                  "tail_S(stem)": critic.tail.forward_from(stem, 1).embed,
                  "tail_T(stitch)": teacher.forward_from(stitched, 1).embed,
                  "teacher": teacher.forward_from(stem, 1).embed}
        for k, e in embeds.items():
            out[k].append(critic.score(e, p).float())
    return {k: torch.cat(v) for k, v in out.items()}


def load_models(critic_path: str):
    """(policy, critic, teacher tail) for split(): the shipped Shapes policy and reward, a j = 1 critic (else exit)."""
    torch.manual_seed(0)
    policy = models.load_shapes_policy().eval().requires_grad_(False)
    reward = models.load_shapes_reward()
    critic = load.stitchvm(policy, reward, critic_path).eval()
    if critic.j != 1:
        raise SystemExit(f"error: {critic_path} stitches at j = {critic.j}; split() needs a j = 1 critic")
    return policy, critic, make_tail(reward.vision, reward_preprocess(reward))


@torch.no_grad()
def image_sets(policy, n: int, renders: bool = True) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """name → (images, captions): n renders of the build's data (train split), and n of the policy's samples (CFG 4.5,
    20 steps) on train- and test-split prompts. Seeded, so every script that calls it scores the same images."""
    sets = {}
    if renders:
        items = first_items(instantiate(load_config(BUILD_YAML, []).data, _path="data"), n)
        sets["renders (train split)"] = (collate_images(items), [caption_of(it) for it in items])
    gen = torch.Generator().manual_seed(0)
    for split_name, seed in (("train", 5), ("test", 1)):
        prompts = shapes_prompts(split_name, n, seed)
        traj = policy.sample(prompts, num_steps=20, guidance_scale=4.5, generator=gen, keep_latents=False)
        sets[f"policy samples, {split_name} prompts"] = (policy.decode(traj.z_tau).clamp(0, 1), prompts)
    return sets


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=256, help="images per set")
    p.add_argument("--sigma", type=float, default=0.1)
    p.add_argument("--critic", default="shapes/weights/stitchvm_prompt_low", help="a j = 1 critic")
    args = p.parse_args(argv)
    policy, critic, teacher = load_models(args.critic)
    sets = image_sets(policy, args.n)
    print(f"σ {args.sigma:g}, {args.critic}, {args.n} images per set; std of the score difference (ρ vs the teacher)\n")
    print("| set | teacher score std | student | student tail on the true stem tokens | "
          "teacher tail on the stitch's tokens |")
    print("|---|---|---|---|---|")
    for name, (images, prompts) in sets.items():
        latents = policy.encode(images).float()  # E(x0), as stage 2 trains on
        r = split(critic, teacher, images, latents, prompts, args.sigma, torch.Generator().manual_seed(1))
        t = r["teacher"]
        cells = [f"{(r[k] - t).std():.4f} ({spearmanr(r[k], t).statistic:.3f})"
                 for k in ("student", "tail_S(stem)", "tail_T(stitch)")]
        print(f"| {name} | {t.std():.4f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
