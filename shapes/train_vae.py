"""Train the Shapes VAE: a diffusers ``AutoencoderKL`` with 3 resolution levels, 64x64x3 -> 16x16x4.

    python -m shapes.train_vae --device cuda                       # the shipped VAE (~3 min on one H200)
    python -m shapes.train_vae --steps 20 --num_images 256 ...     # a CPU smoke run

Loss per image x in [-1, 1], posterior q(z|x) = N(mu, sigma^2), z ~ q, reconstruction x_hat = D(z):

    L = |x - x_hat|^2 + |x - x_hat|_1 + lambda_edge |grad x - grad x_hat|_1 + lambda_KL KL(q || N(0, I))

(pixel means; grad = horizontal and vertical finite differences, which keeps the shape edges ShapesEval
measures sharp without a downloaded perceptual network; KL summed over latent elements, as SD's VAEs, with a
small weight so the latent keeps detail and only its scale is regularised).

After training, the latent statistics of the trained encoder over training images set the normalisation the
flow model sees, as SD3 does: shift_factor = mean, scaling_factor = 1 / std of the posterior modes (scalars over
all elements), so normalised latents have zero mean and unit variance. They are stored in the VAE config.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import trange

from shapes import models
from shapes.training import (Deadline, autocast, check_finite, lr_at, parse_args, render, resolve_device,
                             seed_everything, set_lr, to_json, to_unit, write_json)


@dataclass
class VAEArgs:
    """Arguments of the VAE run (the defaults are the shipped model's)."""

    out_dir: str = str(models.WEIGHTS_DIR)
    """weights directory; the VAE goes to <out_dir>/vae, metrics to <out_dir>/logs/vae.json"""
    device: str = "cpu"
    seed: int = 0
    """seeds the initialisation, batch order and posterior samples (data is fixed by shapes.data)"""
    num_images: int = 60000
    """training images: ShapesDataset('train', num_images, seed=0), pre-rendered once"""
    steps: int = 4000
    batch_size: int = 128
    lr: float = 5e-4
    warmup: int = 200
    weight_decay: float = 0.0
    kl_weight: float = 1e-6
    """lambda_KL, on the KL summed over latent elements"""
    edge_weight: float = 1.0
    """lambda_edge, on the L1 of finite differences"""
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    stats_images: int = 4096
    """training images whose posterior modes give shift_factor / scaling_factor"""
    eval_images: int = 512
    """test-split images for the final PSNR (shapes.bench_world.EVAL_SEED)"""
    workers: int = 0
    """rendering processes (0 = all cores)"""
    log_every: int = 50
    """steps between logged losses (the first and last step are always logged)"""
    max_minutes: float = 0.0
    """wall-clock guard for jobs with a hard limit (0 = none); stopping early is logged as such"""


DATA_SEED = 0  # the training images of the VAE and the flow model: ShapesDataset('train', n, DATA_SEED)


def vae_loss(x: torch.Tensor, x_hat: torch.Tensor, kl: torch.Tensor, kl_weight: float, edge_weight: float):
    """The loss of the module docstring. x, x_hat: (B, 3, H, W) in [-1, 1]; kl: (B,) summed KL.
    Returns (loss, stats dict of floats)."""
    x_hat = x_hat.float()
    mse = F.mse_loss(x_hat, x)
    l1 = F.l1_loss(x_hat, x)
    edge = (F.l1_loss(x_hat.diff(dim=-1), x.diff(dim=-1)) + F.l1_loss(x_hat.diff(dim=-2), x.diff(dim=-2))) / 2
    kl_mean = kl.float().mean()
    loss = mse + l1 + edge_weight * edge + kl_weight * kl_mean
    return loss, {"mse": mse.item(), "l1": l1.item(), "edge": edge.item(), "kl": kl_mean.item()}


@torch.no_grad()
def latent_statistics(vae, images_u8: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Mean and std over all elements of the posterior modes of ``images_u8`` (N, 3, H, W) uint8."""
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, images_u8.shape[0], batch_size):
        x = to_unit(images_u8[start : start + batch_size]) * 2 - 1
        mode = vae.encode(x).latent_dist.mode().double()
        total += mode.sum().item()
        total_sq += mode.pow(2).sum().item()
        count += mode.numel()
    mean = total / count
    return mean, (total_sq / count - mean * mean) ** 0.5


def train(args: VAEArgs) -> dict:
    """Train, set the latent normalisation, save to ``<out_dir>/vae`` and return the metrics."""
    from shapes import bench_world

    device = resolve_device(args.device)
    seed_everything(args.seed)
    deadline = Deadline(args.max_minutes)
    t0 = time.perf_counter()
    images, _ = render("train", args.num_images, DATA_SEED, args.workers or None)
    images = images.to(device)  # (N, 3, 64, 64) uint8
    render_s = time.perf_counter() - t0

    config = models.vae_config(args.block_out_channels, args.layers_per_block, args.latent_channels,
                               args.norm_num_groups, image_size=images.shape[-1])
    vae = models.build_vae(config).to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))
    batch_gen = torch.Generator().manual_seed(args.seed)

    log, stopped_at, last_step = [], None, args.steps - 1
    t_train = time.perf_counter()
    bar = trange(args.steps, desc="vae", mininterval=2.0)
    for step in bar:
        set_lr(optimizer, lr_at(step, args.lr, args.warmup, args.steps))
        idx = torch.randint(images.shape[0], (args.batch_size,), generator=batch_gen).to(device)
        x = to_unit(images[idx]) * 2 - 1  # (B, 3, H, W) in [-1, 1]
        with autocast(device):
            posterior = vae.encode(x).latent_dist
            x_hat = vae.decode(posterior.sample()).sample
        loss, stats = vae_loss(x, x_hat, posterior.kl(), args.kl_weight, args.edge_weight)
        check_finite(loss, step, "vae")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % args.log_every == 0 or step == last_step:
            psnr_batch = -10 * torch.log10(torch.tensor(stats["mse"] / 4))  # mse on [-1, 1] -> [0, 1] units
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr_batch:.1f}")
            log.append({"step": step, "loss/total": loss.item(), **{f"loss/{k}": v for k, v in stats.items()}})
        if deadline.expired():
            stopped_at = step + 1
            print(f"vae: STOPPED EARLY by --max_minutes at step {stopped_at} of {args.steps}")
            break
    train_s = time.perf_counter() - t_train

    vae.eval()
    mean, std = latent_statistics(vae, images[: args.stats_images], args.batch_size)
    vae.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)
    models.save_vae(vae, args.out_dir)

    # measure the shipped (fp16-stored) artifact, not the in-memory fp32 model
    shipped = models.shapes_vae(device, weights_dir=args.out_dir)
    test_images, _ = bench_world.test_images(args.eval_images, workers=args.workers or None)
    psnr = bench_world.vae_psnr(shipped, test_images.to(device))
    metrics = {
        "vae/psnr_test_db": float(psnr.mean()), "vae/psnr_test_min_db": float(psnr.min()),
        "vae/shift_factor": mean, "vae/scaling_factor": 1.0 / std,
        "vae/params": sum(p.numel() for p in vae.parameters()),
        "time/render_s": render_s, "time/train_s": train_s, "time/steps_done": stopped_at or args.steps,
        "stopped_early": stopped_at is not None, "device": torch.cuda.get_device_name(device)
        if device.type == "cuda" else "cpu", "args": to_json(args), "log": log,
    }
    write_json(Path(args.out_dir) / "logs" / "vae.json", metrics)
    print(f"vae: test PSNR {metrics['vae/psnr_test_db']:.2f} dB (min {metrics['vae/psnr_test_min_db']:.2f}) on "
          f"{args.eval_images} images; shift {mean:.4f} scale {1 / std:.4f}; trained {train_s:.0f}s")
    return metrics


def main(argv: list[str] | None = None) -> dict:
    return train(parse_args(VAEArgs, argv, __doc__))


if __name__ == "__main__":
    main()
