"""Does the own-caption score term (distill.lambda_own_score) raise the student's fidelity to the teacher? (session 19)

Issue #4's remaining gap is the student's fidelity to the reward on the very images: at σ 0.1 the shipped low-σ
expert ranks the policy's samples at ρ ~.95 against the teacher (critic_error_split.py), and within .02 of Tweedie
needs ≥ .98. Stage 2 matches the whole embedding; the value is the embedding's score against the image's own
caption. This continues stage 2 from a shipped critic for --steps more steps, once per --lambda-own (0 is the
control: the same continuation without the term), on the build's data mix (renders and policy samples, half each)
at the critic's own noise law, and reports on held-out images, per σ:

    std of (student − teacher) score and Spearman ρ(student, teacher), on policy samples of test / train prompts

where the teacher scores the clean image against its caption. Every arm starts from the same weights, sees the same
batches, σ and ε, and is evaluated on the same images and noise. --jitter adds arms at λ 0 whose batches have half
their images hue-rotated (ColorJitterStream; session 20: does seeing the teacher's verdict on off-palette shades help
on the held-out colour-shape pairs?).

    python benchmarks/critic_own_score_cpu.py --steps 150 --lambda-own 0 1 4     # CPU: ~30 minutes
    python benchmarks/critic_own_score_cpu.py --steps 150 --lambda-own 0 --jitter 30 90 --sigmas 0.1 0.25
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch
from scipy.stats import spearmanr
from torch import Tensor

from critics import load
from critics.build import ImageStream, MixedStream, PolicySampleConfig, generate_samples, load_config, sample_prompts
from critics.distill import DistillConfig, distill
from critics.load import reward_preprocess
from critics.tails import make_tail
from rl.config import instantiate
from shapes import models
from shapes.data import prompts as shapes_prompts

BUILD_YAML = "configs/critic/build_shapes.yaml"


def hue_rotation(theta: Tensor) -> Tensor:
    """(B, 3, 3) RGB rotations by the angles theta (B,) about the grey axis (1, 1, 1): a hue shift that keeps grey."""
    c, s, k = theta.cos(), theta.sin(), 3 ** -0.5
    a, b, d = c + (1 - c) / 3, (1 - c) / 3 - k * s, (1 - c) / 3 + k * s
    return torch.stack([torch.stack([a, b, d], -1), torch.stack([d, a, b], -1), torch.stack([b, d, a], -1)], -2)


class ColorJitterStream:
    """A (images, captions) stream with a ``fraction`` of each batch's images hue-rotated by U(−deg, deg) degrees and
    scaled in brightness by U(0.85, 1.15), keeping their captions: the teacher then scores off-palette shades of
    every caption, as the policy draws the held-out colour-shape pairs (docs/critic.md, session 7's diagnosis)."""

    def __init__(self, stream, deg: float, fraction: float = 0.5, seed: int = 0):
        self.stream, self.deg, self.fraction, self.seed = stream, deg, fraction, seed

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        for images, captions in self.stream:
            n = images.shape[0]
            pick = torch.rand(n, generator=gen) < self.fraction
            theta = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(self.deg)
            gain = 0.85 + 0.3 * torch.rand(n, generator=gen)
            moved = torch.einsum("bij,bjhw->bihw", hue_rotation(theta), images) * gain[:, None, None, None]
            yield torch.where(pick[:, None, None, None], moved.clamp(0, 1), images), captions


@torch.no_grad()
def fidelity(critic, teacher, images, latents, prompts, sigma: float, seed: int = 1) -> tuple[float, float]:
    """(std of the score difference, Spearman ρ) of the critic at σ against the teacher on the clean images."""
    gen = torch.Generator().manual_seed(seed)
    student, target = [], []
    for s in range(0, images.shape[0], 128):
        z0, x0, p = latents[s:s + 128], images[s:s + 128], prompts[s:s + 128]
        z_t = (1 - sigma) * z0 + sigma * torch.randn(z0.shape, generator=gen)
        student.append(critic(z_t, torch.full((z0.shape[0],), sigma), p).float())
        target.append(critic.score(teacher.encode(x0).embed, p).float())
    student, target = torch.cat(student), torch.cat(target)
    return float((student - target).std()), float(spearmanr(student, target).statistic)


def continuation_parser(description: str, sigmas: list[float]) -> argparse.ArgumentParser:
    """The options every stage-2 continuation screen shares (this one, critic_teacher_input_cpu.py)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--critic", default="shapes/weights/stitchvm_prompt_low")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=6e-5, help="constant after 10 warm-up steps (the build's peak: 3e-4)")
    p.add_argument("--bank", type=int, default=2048, help="policy samples in the continuation's data mix")
    p.add_argument("--n-eval", type=int, default=512, help="held-out images per evaluation set")
    p.add_argument("--sigmas", type=float, nargs="+", default=sigmas)
    p.add_argument("--json", default=None, help="write the table's numbers here")
    return p


def continuation_setup(critic_path: str):
    """(policy, reward, the critic to continue, the teacher tower, its build config, the build's render dataset)."""
    torch.manual_seed(0)
    policy = models.load_shapes_policy().eval().requires_grad_(False)
    reward = models.load_shapes_reward()
    base = load.stitchvm(policy, reward, critic_path).eval()
    teacher = make_tail(reward.vision, reward_preprocess(reward))
    record = json.loads(open(f"{critic_path}/build.json").read())["config"]
    return policy, reward, base, teacher, record, instantiate(load_config(BUILD_YAML, []).data, _path="data")


def continuation_bank(policy, record: dict, n: int):
    """The continuation's data beside the renders: the build's policy-sample settings with a bank of n samples on
    train prompts. Returns (their PolicySampleConfig, images uint8, own latents, captions)."""
    ps_cfg = PolicySampleConfig(**{**record["policy_samples"], "n": n, "batch_size": 512})
    prompts = shapes_prompts("train", 4 * n, 5)
    t0 = time.perf_counter()
    bank, latents = generate_samples(policy, prompts, ps_cfg)
    print(f"bank: {n} policy samples in {time.perf_counter() - t0:.0f} s", flush=True)
    return ps_cfg, bank, latents, sample_prompts(prompts, n)


def main(argv: list[str] | None = None) -> None:
    p = continuation_parser(__doc__.split("\n\n")[0], [0.1, 0.25, 0.5])
    p.add_argument("--lambda-own", type=float, nargs="+", default=[0.0, 1.0, 4.0])
    p.add_argument("--jitter", type=float, nargs="*", default=[],
                   help="more arms at λ 0: half of every batch hue-rotated by up to this many degrees (session 20)")
    args = p.parse_args(argv)
    policy, reward, base, teacher, record, dataset = continuation_setup(args.critic)

    ps_cfg, bank, _, bank_captions = continuation_bank(policy, record, args.bank)

    def stream():  # a fresh stream per arm: the streams reseed each pass (seed + passes), so a shared one would
        # give every arm after the first other batches
        return MixedStream(ImageStream(dataset, 64, 0, 0, captions=True), bank, ps_cfg.fraction, ps_cfg.seed,
                           bank_captions)

    # held-out evaluation sets: the policy's samples (CFG 4.5, 20 steps) on test and train prompts, not in the bank
    sets = {}
    gen = torch.Generator().manual_seed(0)
    for name, split, seed in (("test prompts", "test", 1), ("train prompts", "train", 77)):
        prompts = shapes_prompts(split, args.n_eval, seed)
        traj = policy.sample(prompts, num_steps=20, guidance_scale=4.5, generator=gen, keep_latents=False)
        images = policy.decode(traj.z_tau).clamp(0, 1)
        sets[name] = (images, policy.encode(images).float(), prompts)

    d = record["distill"]
    results = {}
    arms = [(None, 0.0)] + [(lam, 0.0) for lam in args.lambda_own] + [(0.0, deg) for deg in args.jitter]
    for lam, deg in arms:
        critic = copy.deepcopy(base)
        if lam is not None:
            dcfg = DistillConfig(lr=args.lr, stitch_lr_mult=d["stitch_lr_mult"], warmup_steps=10,
                                 batch_size=args.batch_size, epochs=1000, max_steps=args.steps,
                                 lambda_own_score=lam, sigma_sampling=d["sigma_sampling"],
                                 sigma_mean=d["sigma_mean"], sigma_std=d["sigma_std"], grad_clip=d["grad_clip"],
                                 caption_dropout=d["caption_dropout"], seed=3, progress=False,
                                 log_every=max(1, args.steps // 3))
            t0 = time.perf_counter()
            stats = distill(critic, reward, policy.encode, ColorJitterStream(stream(), deg) if deg else stream(), dcfg, text_embed_fn=reward.text_embed)
            critic.eval()
            last = {k: sum(v[-10:]) / len(v[-10:]) for k, v in stats.items() if v}
            print(f"λ_own {lam:g}{f', jitter {deg:g}°' if deg else ''}: {args.steps} steps in {time.perf_counter() - t0:.0f} s; last 10: embed "
                  f"{last['distill/embed_loss']:.4f}, token {last['distill/token_loss']:.4f}, own score "
                  f"{last['distill/own_score_loss']:.4f}", flush=True)
        name = "shipped" if lam is None else f"+{args.steps} steps, λ_own {lam:g}" + (f", jitter {deg:g}°" if deg else "")
        results[name] = {f"{s} σ{sigma:g}": fidelity(critic, teacher, *sets[s], sigma)
                         for s in sets for sigma in args.sigmas}
    report(results, "the teacher", args)


def report(results: dict[str, dict[str, tuple[float, float]]], teacher: str, args: argparse.Namespace) -> None:
    """Print {arm: {set σ: (std, ρ)}} as a table and write it with the arguments to args.json (if set)."""
    keys = list(next(iter(results.values())))
    print(f"\nstd of (student − teacher) score (Spearman ρ against {teacher}), held-out policy samples\n")
    print("| critic | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(f"{row[k][0]:.4f} ({row[k][1]:.3f})" for k in keys) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "json"}, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
