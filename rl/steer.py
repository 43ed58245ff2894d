"""Steer a prompt list with a critic and score it: ``python -m rl.steer --method dps --critic stitchvm --n 64``.

Methods: ``none`` (the policy's own sampler), ``dps`` (value-guided SDE, rl/steering/dps.py) and ``fk``
(Feynman-Kac steering, rl/steering/fk.py). Critics: any configs/critic/<name>.yaml with a value at sigma > 0, built
with the run's policy and reward as in rl/train.py — ``stitchvm`` (the shipped Shapes critic), ``tweedie``
(decode-and-score at the one-step denoised latent), ``vae_stitch``, ``mc`` (no gradient: FK only). Each critic runs
through its cheapest exact guide (rl/steering/guides.py: shared head for StitchVM, shared denoiser for Tweedie);
``fused=false`` runs the critic on its own.

The run's config is configs/steer/<method>.yaml (typed: ``SteerConfig``), then ``--config FILE``, then ``key=value``
overrides (``dps.guidance_scale=0.5 fk.num_particles=8 num_steps=40``). It prints held-out ShapesEval (overall,
count, colour, shape, position over relation prompts), the reward of the final images and the seconds per sample of
the sampling itself (including the VAE decode, excluding scoring), and writes ``grid.png`` + ``metrics.json`` to
the output directory.

World: ``--world shapes`` (default) loads the shipped Shapes policy, CLIP reward and StitchVM; ``--world tiny`` a
random tiny world (rl/steering/testing.py) for smoke tests: its numbers mean nothing.

Exit status: 0 done, 2 configuration error or missing weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from critics.base import Critic
from policies.flow import FlowPolicy
from policies.graphs import CUDA_GRAPH_MODES
from rl.checkpoint import atomic_write_json
from rl.config import (ConfigError, apply_overrides, build, check, compose, from_dict, load_yaml, loading, option,
                       to_dict)
from rl.steering.dps import DPSConfig
from rl.steering.fk import FKConfig

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs" / "steer"
CRITIC_ROOT = CONFIG_ROOT.parent / "critic"
METHODS = ("none", "dps", "fk")


@dataclass
class SteerConfig:
    """A steering run (``--method`` picks which of ``dps`` / ``fk`` is used)."""

    num_steps: int | None = option(None, help="sampler steps K (None: the policy's default, policy.json)")
    guidance_scale: float | None = option(None, help="CFG weight w (None: the policy's default)")
    eta: float = option(0.0, help="SDE noise level of method 'none' (0 = the Euler ODE)")
    batch_size: int = option(16, help="prompts per batch (FK runs N particles per prompt)")
    seed: int = option(0, help="seed of the initial noise and SDE noise (batch b uses seed + b)")
    fused: bool = option(True, help="use the critic's fused guide (shared head / shared denoiser)")
    cuda_graph: str | None = option(None, help="StitchVM shared-head guide on CUDA: replay 'tail' or the 'full' "
                                               "step as CUDA graphs (policies/graphs.py); None: eager")
    stitchvm_path: str | None = option(None, help="saved StitchVM directory (None: configs/critic/stitchvm.yaml's)")
    grid_images: int = option(64, help="images in grid.png (the first ones)")
    dps: DPSConfig = option(default_factory=DPSConfig, help="DPS step form (rl/steering/dps.py)")
    fk: FKConfig = option(default_factory=FKConfig, help="FK steering (rl/steering/fk.py)")

    def __post_init__(self):
        check(self.num_steps is None or self.num_steps >= 1, "num_steps", f"must be >= 1, got {self.num_steps}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.grid_images >= 0, "grid_images", f"must be >= 0 (0: no grid.png), got {self.grid_images}")
        check(self.eta >= 0, "eta", f"must be >= 0, got {self.eta}")
        check(self.cuda_graph in CUDA_GRAPH_MODES, "cuda_graph",
              f"must be null (eager), 'tail' or 'full', got {self.cuda_graph!r}")


@dataclass
class World:
    """What a run steers: the policy, the reward it is scored with, the critic (None for 'none'), the sampling
    defaults resolved against the policy's, and the prompt list."""

    policy: FlowPolicy
    reward: torch.nn.Module
    critic: Critic | None
    num_steps: int
    guidance_scale: float
    prompts: list[str] = field(default_factory=list)
    guide: object | None = None  # the steering guide, built once per run (guide_for)


def load_config(method: str, config_files: list[str], overrides: list[str]) -> SteerConfig:
    if method not in METHODS:
        raise ConfigError(f"--method: unknown method '{method}'; valid choices: {list(METHODS)}")
    # the dataclass defaults first, so that every field can be overridden on the command line
    parts = [to_dict(SteerConfig()), load_yaml(CONFIG_ROOT / f"{method}.yaml")] + [load_yaml(p) for p in config_files]
    return from_dict(SteerConfig, apply_overrides(compose(*parts), overrides))


def critic_choices() -> list[str]:
    return sorted(p.stem for p in CRITIC_ROOT.glob("*.yaml") if not p.stem.startswith("build_"))


def load_critic(name: str | None, world: str, policy, reward, stitchvm_path: str | None):
    """The critic by config name, ``configs/critic/<name>.yaml`` instantiated with the policy and reward (as in
    rl/train.py); None for no critic. The tiny world's StitchVM is a random one on the tiny policy."""
    if name is None:
        return None
    if name not in critic_choices():
        raise ConfigError(f"--critic: unknown critic '{name}'; valid choices: {critic_choices()}")
    if world == "tiny" and name == "stitchvm":
        from rl.steering.testing import random_stitchvm

        if stitchvm_path is not None:
            raise ConfigError(f"stitchvm_path={stitchvm_path}: the tiny world's StitchVM is a random one on its tiny "
                              f"policy, so a saved critic cannot load there; use --world shapes")

        return random_stitchvm(policy, reward, i=1).requires_grad_(False)
    overrides = {"path": stitchvm_path} if name == "stitchvm" and stitchvm_path is not None else {}
    critic = build(load_yaml(CRITIC_ROOT / f"{name}.yaml"), "critic", policy=policy, reward=reward, **overrides)
    if not critic.dense:
        raise ConfigError(f"--critic {name} has no value at sigma > 0 (dense = False): steering needs a value critic")
    if isinstance(critic, torch.nn.Module):
        critic.to(policy.device).eval().requires_grad_(False)  # inference: no weight gradients anywhere
    return critic


def build_world(world: str, critic_name: str | None, cfg: SteerConfig, device: torch.device) -> World:
    """Policy, reward and critic (None for method 'none'); raises FileNotFoundError for missing weights."""
    if world == "tiny":
        from rl.steering.testing import tiny_clip_reward
        from policies.testing import tiny_policy

        policy, reward, steps, w = tiny_policy().to(device), tiny_clip_reward().to(device), 10, 4.5
    elif world == "shapes":
        from shapes.models import load_shapes_policy, load_shapes_reward, policy_config

        with loading("--world shapes"):
            policy, reward = load_shapes_policy(device), load_shapes_reward(device)
        shipped = policy_config()
        steps, w = shipped.num_steps, shipped.guidance_scale
    else:
        raise ConfigError(f"--world: unknown world '{world}'; valid choices: ['shapes', 'tiny']")
    policy.transformer.requires_grad_(False)  # inference: graphs keep no activations for weight gradients
    critic = load_critic(critic_name, world, policy, reward, cfg.stitchvm_path)
    return World(policy, reward, critic, cfg.num_steps or steps,
                 cfg.guidance_scale if cfg.guidance_scale is not None else w)


def guide_for(world: World, cfg: SteerConfig):
    """The run's guide (rl.steering.guides.make_guide), built on first use and kept: CUDA-graph captures are reused
    across batches of one shape. Raises ValueError for a critic / cuda_graph combination that cannot work."""
    from rl.steering.guides import make_guide

    if world.critic is None:
        if cfg.cuda_graph is not None:
            raise ConfigError("cuda_graph applies to steering with a critic (--method dps / fk); method 'none' "
                              "samples without a guide: drop cuda_graph")
        return None
    if world.guide is None:
        world.guide = make_guide(world.policy, world.critic, world.guidance_scale, fused=cfg.fused,
                                 cuda_graph=cfg.cuda_graph)
    return world.guide


def steer_batch(method: str, world: World, cfg: SteerConfig, prompts: list[str], generator: torch.Generator,
                batch_index: int = 0):
    """Final latents (P, C, h, w) for the prompts with the chosen method; ``batch_index`` offsets FK's resampling
    seed as ``generator`` is offset for the noise, so batches do not repeat one another's resampling draws."""
    from policies import samplers
    from rl.steering.dps import dps_sample
    from rl.steering.fk import fk_sample
    policy = world.policy
    sigmas = policy.sigmas(world.num_steps)
    cond = policy.encode_prompts(prompts)
    if method == "none":
        z_T = policy.noise(len(prompts), generator)
        with torch.no_grad():
            return samplers.sample(policy.velocity_fn(cond, world.guidance_scale), z_T, sigmas, eta=cfg.eta,
                                   generator=generator, keep_latents=False).z_tau
    guide = guide_for(world, cfg)
    if method == "dps":
        return dps_sample(guide, policy.noise(len(prompts), generator), sigmas, cond, prompts, cfg.dps, generator).z_0
    z_T = policy.noise(len(prompts) * cfg.fk.num_particles, generator)
    fk_cfg = dataclasses.replace(cfg.fk, seed=cfg.fk.seed + batch_index)
    return fk_sample(guide, z_T, sigmas, cond, prompts, fk_cfg, generator).z_0


def run(method: str, world: World, cfg: SteerConfig, out_dir: Path) -> dict[str, float]:
    """Steer ``world.prompts`` batch by batch, score with ShapesEval and the reward, write grid + metrics."""
    from torchvision.utils import save_image

    from shapes.eval import ShapesEval

    policy, prompts = world.policy, world.prompts
    device = policy.device
    evaluator, images, seconds = ShapesEval(), [], 0.0
    scores: dict[str, list[torch.Tensor]] = {}
    # warm-up, untimed, on a full batch (CUDA-graph guides capture per batch shape)
    steer_batch(method, world, cfg, prompts[:cfg.batch_size], torch.Generator(device).manual_seed(cfg.seed))
    for b, start in enumerate(range(0, len(prompts), cfg.batch_size)):
        batch = prompts[start:start + cfg.batch_size]
        generator = torch.Generator(device).manual_seed(cfg.seed + b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        z_0 = steer_batch(method, world, cfg, batch, generator, b)
        with torch.no_grad():
            x = policy.decode(z_0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t0
        with torch.no_grad():
            scores.setdefault("reward", []).append(world.reward(x, batch).float().cpu())
        result = evaluator(x, batch)
        for k in ("overall", "count", "color", "shape"):
            scores.setdefault(k, []).append(getattr(result, k).cpu())
        scores.setdefault("position", []).append(result.position[result.has_relation].cpu())
        images.append(x.cpu())
    # position is scored on relation prompts only: none among them leaves it out (not NaN, which strict JSON lacks)
    metrics = {f"shapes_eval/{k}": torch.cat(v).mean().item() for k, v in scores.items()
               if k != "reward" and torch.cat(v).numel()}
    metrics["reward/mean"] = torch.cat(scores["reward"]).mean().item()
    metrics["time/seconds_per_sample"] = seconds / len(prompts)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "metrics.json", {"metrics": metrics, "config": to_dict(cfg)})  # first: the result
    grid = torch.cat(images)[: cfg.grid_images]
    if len(grid):
        save_image(grid, out_dir / "grid.png", nrow=max(1, int(math.sqrt(len(grid)))), padding=1)
    return metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rl.steer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="dps", help=f"one of {list(METHODS)}")
    parser.add_argument("--critic", default="stitchvm", help="a configs/critic/<name>.yaml: stitchvm, tweedie, "
                                                              "vae_stitch, mc (FK only; ignored by 'none')")
    parser.add_argument("--world", default="shapes", help="'shapes' (shipped weights) or 'tiny' (random, smoke test)")
    parser.add_argument("--prompts", default="test", help="Shapes split: 'test' (held-out compositions) or 'train'")
    parser.add_argument("--n", type=int, default=64, help="number of prompts")
    parser.add_argument("--prompt-seed", type=int, default=1, help="seed of the prompt list (shapes.data.prompts)")
    parser.add_argument("--config", action="append", default=[], help="extra YAML merged on top (repeatable)")
    parser.add_argument("--out", default=None, help="output directory (default runs/steer/<method>_<critic>)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of SteerConfig")
    return parser.parse_intermixed_args(argv)  # key=value may come before or after the flags, as for rl/train.py


def parse_device(text: str) -> torch.device:
    """``--device`` as a torch.device that exists here, or a ConfigError that says what does."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ConfigError(f"--device {text!r} is not a device name: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {text}: this machine has no CUDA device; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def main(argv: list[str] | None = None) -> int:
    from shapes.data import prompts as shapes_prompts

    args = parse_args(argv)
    try:
        cfg = load_config(args.method, args.config, args.overrides)
        if args.n < 1:
            raise ConfigError(f"--n must be >= 1, got {args.n}")
        prompts = shapes_prompts(args.prompts, args.n, args.prompt_seed)
        device = parse_device(args.device)
        world = build_world(args.world, None if args.method == "none" else args.critic, cfg, device)
        if args.method == "dps" and getattr(world.critic, "differentiable", True) is False:
            raise ConfigError(f"--method dps follows the gradient of V, and critic '{args.critic}' has none: use a "
                              f"differentiable critic (stitchvm, tweedie), or --method fk, which needs values only")
        guide_for(world, cfg)  # here, so that a bad combination is an error before anything runs
        if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
            raise ConfigError(f"--out {args.out} is a file; the results go into a directory: give a directory path")
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    world.prompts = prompts
    label = args.method if args.method == "none" else f"{args.method}_{args.critic}"
    out_dir = Path(args.out or f"runs/steer/{label}")
    metrics = run(args.method, world, cfg, out_dir)
    grid = f"  -> {out_dir / 'grid.png'}" if cfg.grid_images else ""
    print(f"{label}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()) + grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
