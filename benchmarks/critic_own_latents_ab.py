"""A/B of ``policy_samples.student_latents`` on the CPU: fine-tune a shipped StitchVM briefly on renders + policy
samples whose z_t starts from E(D(z0)) ("encoded", as every shipped critic was built) or from the policy's own z0
("own"), then value the policy's own latents. (Session-9 check of the option before a GPU build.)

Both arms start from the same critic (``--critic``, default the low-σ expert of ``stitchvm_experts``), see the same
renders, bank rows, σ and ε in the same order (same seeds), and differ only in the latent of the bank rows. The bank:
``--bank`` samples of train-split prompts (seed 5, as the builds), the builds' CFG / SDE cycles. Evaluation: as
benchmarks/critic_latent_domain.py, the policy's own z0 for 128 train (seed 123) and 128 test (seed 1) prompts,
forward-noised to each σ, against the teacher's reward of the decoded sample. CPU: ~40 minutes at the defaults.

    python benchmarks/critic_own_latents_ab.py [--bank 1024] [--steps 150] [--batch-size 64] [--lr 3e-5]
"""

from __future__ import annotations

import argparse
import time

import torch

from critic_split_gap import SPLIT_SEEDS  # this directory (run as a script)
from critics import bench_value as bv
from critics import load
from critics.build import ImageStream, MixedStream, PolicySampleConfig, generate_samples, sample_prompts
from critics.distill import DistillConfig, distill
from shapes import models
from shapes.data import ShapesDataset
from shapes.data import prompts as shapes_prompts


def eval_sets(policy, reward, n: int, b: int) -> dict[str, tuple[list[str], torch.Tensor, torch.Tensor]]:
    """{split: (prompts, the policy's own z0 (n, C, h, w), the teacher's reward of the decoded sample (n,))}."""
    out = {}
    for split, seed in SPLIT_SEEDS.items():
        prompts = shapes_prompts(split, n, seed)
        z0 = bv.trajectory_latents(policy, prompts, (0.0,), 20, 4.5, b)[0.0]
        with torch.no_grad():
            x0 = torch.cat([policy.decode(z0[s:s + b]) for s in range(0, n, b)])
            truth = torch.cat([reward(x0[s:s + b], prompts[s:s + b]) for s in range(0, n, b)]).float()
        out[split] = (prompts, z0, truth)
    return out


def evaluate(critic, sets, sigmas, b) -> dict[tuple[str, float], tuple[float, float]]:
    """{(split, σ): (ρ, error std)} of the critic on the policy's own latents forward-noised to σ."""
    out = {}
    for split, (prompts, z0, truth) in sets.items():
        eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))
        for sigma in sigmas:
            v = bv.batched_values(critic.value, (1 - sigma) * z0 + sigma * eps, sigma, prompts, b, "cpu")[0]
            out[(split, sigma)] = (bv.spearman(v, truth), (v - truth).std().item())
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--critic", default="shapes/weights/stitchvm_prompt_low")
    p.add_argument("--bank", type=int, default=1024)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--sigmas", default="0.05,0.1,0.25")
    args = p.parse_args(argv)
    sigmas = [float(s) for s in args.sigmas.split(",")]
    torch.manual_seed(0)
    policy = models.load_shapes_policy("cpu").eval().requires_grad_(False)
    reward = models.load_shapes_reward("cpu")
    t = time.perf_counter()
    ps = PolicySampleConfig(n=args.bank, prompts={}, batch_size=128, seed=0)
    bank_prompts = sample_prompts(shapes_prompts("train", 65536, 5), args.bank)
    images, latents = generate_samples(policy, bank_prompts, ps)
    print(f"bank: {args.bank} samples in {time.perf_counter() - t:.0f} s", flush=True)
    # the session-7 low-σ law, caption dropout and stitch multiplier; a fine-tune lr with cosine decay
    cfg = DistillConfig(lr=args.lr, stitch_lr_mult=5.0, warmup_steps=10, lr_decay="cosine", batch_size=args.batch_size,
                        max_steps=args.steps, sigma_sampling="logit_normal", sigma_mean=-2.2, sigma_std=0.6,
                        caption_dropout=0.1, progress=False, log_every=50, seed=0)
    sets = eval_sets(policy, reward, 128, 32)
    rows = {}
    for arm in ("start", "encoded", "own"):
        critic = load.stitchvm(policy, reward, args.critic)
        if arm != "start":
            t = time.perf_counter()
            renders = ImageStream(ShapesDataset("train", 1 << 20, seed=7), args.batch_size // 2, seed=0,
                                  captions=True)
            stream = MixedStream(renders, images, 0.5, seed=0, bank_prompts=bank_prompts,
                                 bank_latents=latents if arm == "own" else None)
            stats = distill(critic, reward, policy.encode, stream, cfg)
            last = stats["distill/loss"][-10:]
            print(f"{arm}: {args.steps} steps in {time.perf_counter() - t:.0f} s, loss "
                  f"{stats['distill/loss'][0]:.4f} -> {sum(last) / len(last):.4f} (first step, mean of the last 10)",
                  flush=True)
        critic.eval()
        rows[arm] = evaluate(critic, sets, sigmas, 32)
    print("| split | σ | " + " | ".join(f"{a} ρ / err std" for a in rows) + " |")
    print("|---|---|" + "---|" * len(rows))
    for key in rows["start"]:
        print(f"| {key[0]} | {key[1]:g} | " + " | ".join(f"{rows[a][key][0]:.3f} / {rows[a][key][1]:.3f}"
                                                          for a in rows) + " |")


if __name__ == "__main__":
    main()
