"""Measure the shipped Shapes models: VAE PSNR, CLIP retrieval, CLIP-vs-ShapesEval rank correlation, and the
pretrained policy's ShapesEval per criterion; optionally draw the README sample grid.

    python -m shapes.bench_world --device cuda                      # the figures in docs/shapes_world.md
    python -m shapes.bench_world --num_prompts 64 --num_images 128 --spearman_prompts 32 --figure docs/img/shapes_samples.png

Protocol (every number is a pure function of the weights and these seeds):
  VAE PSNR        mean over ``num_images`` test-split images ShapesDataset('test', n, EVAL_SEED) of the per-image
                  PSNR (dB, images in [0, 1]) of decode(mode(encode(x))).
  CLIP top-1      the same images with their canonical captions, in consecutive groups of 32: an image is right
                  when its own caption has the highest CLIP score among the group's 32 captions (a duplicate
                  caption counts as right). ``hard``: the 32 candidates are the true caption and 31 captions of
                  nearby specs (one or two of count / colour / shape / relation / order changed).
  policy          ``num_prompts`` held-out test prompts prompts('test', n, TEST_PROMPT_SEED), one sample each,
                  Euler ODE at ``num_steps`` with z_T from SAMPLE_SEED; ShapesEval means per criterion, position over
                  relation prompts only; "overall" broken down by prompt kind.
  Spearman        rank correlation between the CLIP score (cosine) and the ShapesEval mean over the criteria
                  that apply (position for relation prompts only; ``eval_mean_score``) over a pool of the policy's own samples at several step
                  counts and guidance scales (SPEARMAN_SETTINGS: mixing good and bad samples), and, harder, over
                  the default-setting samples alone.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rl.checkpoint import atomic_write_json
from shapes.data import caption, parse_caption
from shapes.eval import CRITERIA, ShapesEval

EVAL_SEED = 1234  # ShapesDataset('test', n, EVAL_SEED): VAE PSNR and CLIP retrieval images
TEST_PROMPT_SEED = 0  # prompts('test', n, TEST_PROMPT_SEED): the held-out test prompts the policy is reported on
RL_EVAL_PROMPT_SEED = 1  # prompts('test', 512, 1): the trainers' reported evaluation (configs/experiments/*.yaml)
VAL_PROMPT_SEED = 2  # selection_prompts: checkpoint selection only (train_flow)
SAMPLE_SEED = 0  # initial noise of policy samples
RETRIEVAL_GROUP = 32
OTHER_GUIDANCE = 4.5  # the CFG scale reported beside the default
SPEARMAN_SETTINGS = ((1, 1.0), (2, 1.0), (3, 1.0), (5, 1.0), (20, 1.0), (2, 4.5), (5, 4.5), (20, 4.5))  # (steps, w)
KINDS = ("one object", "counting", "two groups", "relation")


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


def selection_prompts(n: int, seed: int = VAL_PROMPT_SEED, reported: int = 1024) -> list[str]:
    """``n`` prompts to choose on, none of which is reported: test-split prompts that are not among the first
    ``reported`` prompts of the reported seeds (TEST_PROMPT_SEED, RL_EVAL_PROMPT_SEED), and, since every one of the
    test split's 20 single-group prompts is a reported one, single-group prompts of train pairs at the evaluation's
    share of that kind (KIND_PROBS) -- the mix of configs/experiments/keep_best.yaml."""
    from shapes.data import KIND_PROBS, prompt_union, prompts

    taken = set(prompts("test", reported, TEST_PROMPT_SEED)) | set(prompts("test", reported, RL_EVAL_PROMPT_SEED))
    n_single = round(n * KIND_PROBS["single"])
    two_groups = [k for k in KIND_PROBS if k != "single"]
    pool, draw = [], n - n_single
    while len(pool) < n - n_single:  # about half of a draw is free; draw more until enough
        if draw > 64 * n + 4096:
            raise ValueError(f"selection_prompts: fewer than {n - n_single} test-split prompts outside the first "
                             f"{reported} reported ones; ask for fewer")
        draw *= 2
        pool = [p for p in prompts("test", draw, seed, kinds=two_groups) if p not in taken]
    return prompt_union([pool[: n - n_single], prompts("train", n_single, seed, kinds=["single"])])


def canonical(text: str) -> str:
    """The canonical phrasing of a Shapes caption."""
    return caption(parse_caption(text))


def test_images(num: int, seed: int = EVAL_SEED, workers: int | None = None) -> tuple[Tensor, list[str]]:
    """``num`` test-split renders, float (N, 3, 64, 64) in [0, 1] (CPU), with canonical captions."""
    from shapes.training import render, to_unit

    images, captions = render("test", num, seed, workers)
    return to_unit(images), [canonical(c) for c in captions]


def prompt_kind(prompt: str) -> str:
    spec = parse_caption(prompt)
    if len(spec.groups) == 1:
        return "one object" if spec.groups[0].count == 1 else "counting"
    return "two groups" if spec.relation is None else "relation"


# ---------------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def vae_psnr(vae, images: Tensor, batch_size: int = 256) -> Tensor:
    """Per-image PSNR (dB) of decode(mode(encode(x))) for images (N, 3, H, W) in [0, 1] -> (N,) on CPU."""
    from shapes.training import psnr

    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device)
        mode = vae.encode((x * 2 - 1).to(dtype)).latent_dist.mode()
        x_hat = (vae.decode(mode).sample.float() / 2 + 0.5).clamp(0, 1)
        out.append(psnr(x, x_hat).cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def embed(reward, images: Tensor, prompts: list[str], batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """L2-normalised image and text embeddings (N, D) of a CLIPScore, on CPU."""
    device = next(reward.model.parameters()).device
    img, txt = [], []
    for start in range(0, images.shape[0], batch_size):
        img.append(reward.image_embed(images[start : start + batch_size].to(device)).cpu())
    unique = sorted(set(prompts))
    for start in range(0, len(unique), batch_size):
        txt.append(reward.text_embed(unique[start : start + batch_size]).cpu())
    table = dict(zip(unique, torch.nn.functional.normalize(torch.cat(txt), dim=-1)))
    return torch.nn.functional.normalize(torch.cat(img), dim=-1), torch.stack([table[p] for p in prompts])


def hard_candidates(text: str, num: int, rng: np.random.Generator) -> list[str]:
    """The true (canonical) caption first, then ``num - 1`` distinct captions of nearby specs."""
    from shapes.train_clip import perturb_spec, spec_key

    spec = parse_caption(text)
    seen = {spec_key(spec)}
    out = [caption(spec)]
    for _ in range(200 * num):
        if len(out) == num:
            break
        other = perturb_spec(spec, rng)
        if rng.random() < 0.5:
            other = perturb_spec(other, rng)
        key = spec_key(other)
        if key not in seen:
            seen.add(key)
            out.append(caption(other))
    return out


@torch.no_grad()
def clip_retrieval(reward, images: Tensor, captions: list[str], group: int = RETRIEVAL_GROUP,
                   seed: int = EVAL_SEED) -> dict[str, float]:
    """Top-1 caption retrieval among ``group`` candidates (module docstring): in-batch and hard."""
    img, txt = embed(reward, images, captions)
    usable = (len(captions) // group) * group
    if usable == 0:
        raise ValueError(f"need at least {group} images for retrieval among {group}, got {len(captions)}")
    right = []
    for start in range(0, usable, group):
        sims = img[start : start + group] @ txt[start : start + group].T  # (G, G)
        best = sims.argmax(1)
        right += [captions[start + int(b)] == captions[start + i] for i, b in enumerate(best)]
    rng = np.random.default_rng(seed)
    hard_right = []
    for i in range(usable):
        candidates = hard_candidates(captions[i], group, rng)
        _, cand = embed(reward, images[i : i + 1], candidates)
        hard_right.append(int((cand @ img[i]).argmax()) == 0)
    return {"clip/top1_in_batch": float(np.mean(right)), "clip/top1_hard": float(np.mean(hard_right)),
            "clip/num_images": usable}


# ---------------------------------------------------------------------------------------------------------
# Policy
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_images(policy, prompts: list[str], num_steps: int, guidance_scale: float, seed: int = SAMPLE_SEED,
                  batch_size: int = 256) -> Tensor:
    """One Euler-ODE sample per prompt -> images (N, 3, H, W) in [0, 1] on CPU. z_T is drawn on the CPU from
    ``seed``, so CPU and GPU runs start from the same noise."""
    generator = torch.Generator().manual_seed(seed)
    z_T = torch.randn((len(prompts), policy.latent_channels, policy.latent_size, policy.latent_size),
                      generator=generator)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        z = z_T[start : start + batch_size].to(policy.device, policy.dtype)
        traj = policy.sample(chunk, num_steps=num_steps, guidance_scale=guidance_scale, z_T=z, keep_latents=False)
        out.append(policy.decode(traj.z_tau).cpu())
    return torch.cat(out)


def shapes_eval_summary(images: Tensor, prompts: list[str]) -> dict[str, float]:
    """ShapesEval means per criterion (position over relation prompts only) and overall per prompt kind."""
    result = ShapesEval()(images, prompts)
    row = {f"eval/{k}": float(getattr(result, k).mean()) for k in CRITERIA if k != "position"}
    rel = result.has_relation
    row["eval/position"] = float(result.position[rel].mean()) if rel.any() else float("nan")
    kinds = [prompt_kind(p) for p in prompts]
    for kind in KINDS:
        mask = torch.tensor([k == kind for k in kinds])
        if mask.any():
            row[f"eval/overall_{kind.replace(' ', '_')}"] = float(result.overall[mask].mean())
    return row


def eval_mean_score(images: Tensor, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """Per-image ShapesEval mean over the criteria that apply, (count + colour + shape [+ position]) / (3 [+ 1]),
    and overall, (N,) each. Position counts only for relation prompts: ShapesEval's 1.0 for "N/A" would give an
    empty image of a one-group prompt a quarter of the score for free."""
    result = ShapesEval()(images, prompts)
    rel = result.has_relation.float()
    mean = (result.count + result.color + result.shape + rel * result.position) / (3 + rel)
    return mean, result.overall


@torch.no_grad()
def clip_scores(reward, images: Tensor, prompts: list[str], batch_size: int = 512) -> Tensor:
    device = next(reward.model.parameters()).device
    return torch.cat([reward(images[s : s + batch_size].to(device), prompts[s : s + batch_size]).cpu()
                      for s in range(0, len(prompts), batch_size)])


def spearman(policy, reward, prompts: list[str], default_steps: int, default_guidance: float,
             settings=SPEARMAN_SETTINGS) -> dict[str, float]:
    """Spearman rho between CLIP score and ShapesEval on the policy's own samples (module docstring)."""
    from scipy.stats import spearmanr

    pool_clip, pool_eval, pool_overall = [], [], []
    default = None
    for steps, guidance in settings:
        images = sample_images(policy, prompts, steps, guidance, seed=SAMPLE_SEED + steps)
        score = clip_scores(reward, images, prompts)
        mean, overall = eval_mean_score(images, prompts)
        pool_clip.append(score), pool_eval.append(mean), pool_overall.append(overall)
        if (steps, guidance) == (default_steps, default_guidance):
            default = (score, mean)
    clip_all, eval_all = torch.cat(pool_clip).numpy(), torch.cat(pool_eval).numpy()
    out = {"spearman/pool": float(spearmanr(clip_all, eval_all).statistic),
           "spearman/pool_overall": float(spearmanr(clip_all, torch.cat(pool_overall).numpy()).statistic),
           "spearman/pool_size": int(clip_all.size)}
    if default is not None:
        out["spearman/default_setting"] = float(spearmanr(default[0].numpy(), default[1].numpy()).statistic)
    return out


def draw_grid(images: Tensor, prompts: list[str], path: str | Path, cols: int = 6, title: str = "") -> None:
    """A matplotlib grid: each sample titled with its prompt and ShapesEval scores (count/colour/shape/position,
    overall)."""
    import matplotlib

    matplotlib.use("Agg")
    import textwrap

    import matplotlib.pyplot as plt

    result = ShapesEval()(images, prompts)
    rows = (len(prompts) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.55 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, prompt in enumerate(prompts):
        ax = axes.flat[i]
        ax.imshow(images[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        scores = "  ".join(f"{k[:3]} {float(getattr(result, k)[i]):.2g}" for k in ("count", "color", "shape"))
        pos = f"  pos {float(result.position[i]):.0f}" if result.has_relation[i] else ""
        ok = float(result.overall[i]) == 1.0
        ax.set_title("\n".join(textwrap.wrap(prompt, 30)) + f"\n{scores}{pos}\noverall {int(ok)}", fontsize=6.5,
                     color="darkgreen" if ok else "darkred")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    from shapes import models
    from shapes.data import prompts as shapes_prompts

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights_dir", default=str(models.WEIGHTS_DIR))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num_images", type=int, default=1024, help="test renders for VAE PSNR and CLIP top-1")
    parser.add_argument("--num_prompts", type=int, default=1024, help="held-out test prompts for the policy")
    parser.add_argument("--spearman_prompts", type=int, default=256, help="prompts per Spearman setting")
    parser.add_argument("--figure", default="", help="write the sample grid PNG here")
    parser.add_argument("--figure_prompts", type=int, default=24)
    parser.add_argument("--out", default="", help="write the figures as JSON here")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    device = torch.device(args.device)
    cfg = models.policy_config(args.weights_dir)
    metrics: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "policy/shift": cfg.shift, "policy/guidance_scale": cfg.guidance_scale,
                     "policy/num_steps": cfg.num_steps}
    images, captions = test_images(args.num_images)
    vae = models.shapes_vae(device, weights_dir=args.weights_dir)
    metrics["vae/psnr_test_db"] = float(vae_psnr(vae, images).mean())
    reward = models.load_shapes_reward(device, weights_dir=args.weights_dir)
    metrics.update(clip_retrieval(reward, images, captions))

    policy = models.load_shapes_policy(device, weights_dir=args.weights_dir)
    prompts = shapes_prompts("test", args.num_prompts, TEST_PROMPT_SEED)
    for guidance in (cfg.guidance_scale, OTHER_GUIDANCE if cfg.guidance_scale != OTHER_GUIDANCE else 1.0):
        samples = sample_images(policy, prompts, cfg.num_steps, guidance)
        metrics.update({f"{k}@w{guidance:g}": v for k, v in shapes_eval_summary(samples, prompts).items()})
    metrics.update(spearman(policy, reward, prompts[: args.spearman_prompts], cfg.num_steps, cfg.guidance_scale))
    if args.figure:
        fig_prompts = prompts[: args.figure_prompts]
        samples = sample_images(policy, fig_prompts, cfg.num_steps, cfg.guidance_scale)
        draw_grid(samples, fig_prompts, args.figure,
                  title=f"Pretrained Shapes policy on held-out test prompts: {cfg.num_steps} Euler steps, "
                        f"CFG {cfg.guidance_scale:g}, shift {cfg.shift:g} (ShapesEval per sample)")
    metrics["time/bench_s"] = time.perf_counter() - t0

    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if args.out:
        atomic_write_json(args.out, metrics)
    return metrics


if __name__ == "__main__":
    main()
