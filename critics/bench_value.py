"""Value-quality benchmark: how well do the critics estimate V(z_t) on the policy's own trajectories?

    python -m critics.bench_value                                   # the figures in docs/critic.md
    python -m critics.bench_value --n-prompts 64 --rollouts 8 --out docs/img/value_bench.png
    python -m critics.bench_value --quick                            # seconds; prints the table, writes nothing

Protocol (every number is a pure function of the weights, the critics and these seeds):
  trajectories  `--n-prompts` held-out test prompts shapes.data.prompts('test', n, TEST_PROMPT_SEED) (choose between
                critics on `--prompt-seed` VAL_PROMPT_SEED instead), one Euler-ODE
                trajectory each from z_T ~ N(0, I) (seed SAMPLE_SEED) at the policy's guidance scale, on the
                policy's schedule (policy.json num_steps, shift) with the benchmark sigmas inserted as extra
                nodes, so z_t is the trajectory latent at exactly sigma (not the nearest node, not a re-noised
                sample). The extra nodes only refine the discretisation of the same ODE.
  truth         V_MC(z_t) = mean CLIP score of K = `--rollouts` rollouts from z_t to sigma = 0 with the policy's
                SDE (critics.baselines.MonteCarloCritic, eta 0.7, the policy's schedule below sigma, same
                guidance). It is computed as two independent halves of K/2 rollouts; their Spearman ρ
                ("MC split-half") measures how noisy the truth itself is (a ceiling for any critic).
  critics       stitchvm and vae_stitch (the shipped weights via critics.load) and tweedie (r(D(ẑ_0)), one DiT
                call at the same guidance scale). Per sigma: Spearman ρ (scipy) and MSE against V_MC over the n
                trajectories. Cost: wall-clock ms per value in batches of `--batch-size` without gradients, on
                the device used (MC: all K rollouts of one value).
  retrieval     Table-5 style: `--retrieval-images` test renders ShapesDataset('test', n, EVAL_SEED) with their
                canonical captions, encoded with the policy's VAE, forward-noised z_t = (1 − σ) z0 + σ ε (seed
                NOISE_SEED) and embedded by the critic's tail; top-1 caption retrieval among the 32 captions of
                each consecutive group of 32 (a duplicate caption counts as right), against the clean CLIP on x0.

Targets (issue #4): StitchVM's ρ beats tweedie and vae_stitch at every σ >= 0.5 and is within 0.02 of the best at
σ <= 0.25; ρ >= 0.8 at σ = 0.5; retrieval at σ = 0.5 keeps >= 85% of clean.
Outputs: a markdown table on stdout, `--json` (default: next to --out) and the `--out` PNG.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from rl.checkpoint import atomic_write_bytes, atomic_write_json

SIGMAS = (0.1, 0.25, 0.5, 0.75, 0.9)
TEST_PROMPT_SEED = 0  # shapes.bench_world: the held-out test prompts the policy is reported on
VAL_PROMPT_SEED = 1  # test-split prompts for choosing between critics (the reported value figures use seed 0). Seed 1
#                       is also the trainers' evaluation set: a critic chosen on it has seen those prompts' value
#                       ranking (not any training outcome on them)
SAMPLE_SEED = 0
EVAL_SEED = 1234  # shapes.bench_world: test renders for retrieval
NOISE_SEED = 5
MC_SEEDS = (101, 202)  # the two halves of the Monte-Carlo truth
MC_ETA = 0.7  # configs/critic/mc.yaml
RETRIEVAL_GROUP = 32
CRITICS = ("stitchvm", "tweedie", "vae_stitch")
TARGET_RHO_AT_HALF = 0.8
TARGET_RHO_SLACK = 0.02
TARGET_RETRIEVAL_KEEP = 0.85


# ---------------------------------------------------------------------------------------------------------------
# Trajectories and values
# ---------------------------------------------------------------------------------------------------------------
def schedule_with(policy, num_steps: int, sigmas: Sequence[float]) -> Tensor:
    """The policy's (num_steps + 1,) schedule with `sigmas` inserted as extra nodes, decreasing, ending at 0."""
    base = policy.sigmas(num_steps, "cpu").double()
    merged = torch.cat([base, torch.tensor(sigmas, dtype=torch.float64)]).unique()  # ascending, deduplicated
    return merged.flip(0).float()


@torch.no_grad()
def trajectory_latents(policy, prompts: list[str], sigmas: Sequence[float], num_steps: int, guidance: float,
                       batch_size: int, seed: int = SAMPLE_SEED) -> dict[float, Tensor]:
    """{sigma: z_t (N, C, h, w) on the CPU}: each prompt's ODE trajectory latent at exactly sigma."""
    from policies import samplers

    schedule = schedule_with(policy, num_steps, sigmas).to(policy.device)
    z_T = torch.randn((len(prompts), policy.latent_channels, policy.latent_size, policy.latent_size),
                      generator=torch.Generator().manual_seed(seed))
    index = {s: int(torch.argmin((schedule - s).abs())) for s in sigmas}
    out: dict[float, list[Tensor]] = {s: [] for s in sigmas}
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        cond = policy.encode_prompts(chunk)
        traj = samplers.sample(policy.velocity_fn(cond, guidance), z_T[start:start + batch_size].to(policy.device,
                               policy.dtype), schedule)
        for s in sigmas:
            out[s].append(traj.latents[:, index[s]].float().cpu())
    return {s: torch.cat(v) for s, v in out.items()}


def batched_values(value_fn: Callable[[Tensor, float, list[str]], Tensor], z: Tensor, sigma: float,
                   prompts: list[str], batch_size: int, device) -> tuple[Tensor, float]:
    """(values (N,) on the CPU, seconds) of value_fn over z in batches, without gradients."""
    out = []
    start_t = time.perf_counter()
    with torch.no_grad():
        for start in range(0, z.shape[0], batch_size):
            out.append(value_fn(z[start:start + batch_size].to(device), sigma,
                                prompts[start:start + batch_size]).float().cpu())
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return torch.cat(out), time.perf_counter() - start_t


def spearman(a: Tensor, b: Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.numpy(), b.numpy()).statistic)


def value_quality(policy, reward, critics: dict, prompts: list[str], latents: dict[float, Tensor], rollouts: int,
                  num_steps: int, guidance: float, batch_size: int) -> dict:
    """Spearman / MSE of every critic against V_MC at each sigma, the MC split-half ρ, and cost per value."""
    from critics.baselines import MonteCarloCritic

    if rollouts < 2 or rollouts % 2:
        raise ValueError(f"--rollouts must be even and >= 2 (two halves of the truth); got {rollouts}")
    halves = [MonteCarloCritic(policy, reward, num_rollouts=rollouts // 2, num_steps=num_steps, eta=MC_ETA,
                               guidance_scale=guidance, seed=s) for s in MC_SEEDS]
    device = policy.device
    mc_batch = max(1, batch_size // rollouts)  # rows per MC call: K rollouts each
    sigma0, z0 = next(iter(latents.items()))
    for critic in critics.values():  # warm-up: first-call overheads and the per-prompt text caches (of the reward,
        # and of a prompt-conditioned head) are not a cost per value; a trainer values the same prompts all run long
        batched_values(critic.value, z0, sigma0, prompts, batch_size, device)
    rows, seconds = {}, {name: 0.0 for name in ("mc", *critics)}
    for sigma, z in latents.items():
        v_a, t_a = batched_values(halves[0].value, z, sigma, prompts, mc_batch, device)
        v_b, t_b = batched_values(halves[1].value, z, sigma, prompts, mc_batch, device)
        v_mc = (v_a + v_b) / 2
        seconds["mc"] += t_a + t_b
        row = {"mc/mean": float(v_mc.mean()), "mc/std": float(v_mc.std()), "mc/split_half_rho": spearman(v_a, v_b)}
        for name, critic in critics.items():
            v, t = batched_values(critic.value, z, sigma, prompts, batch_size, device)
            seconds[name] += t
            row[f"{name}/rho"] = spearman(v, v_mc)
            row[f"{name}/mse"] = float((v - v_mc).pow(2).mean())
            row[f"{name}/mean"] = float(v.mean())
        rows[f"{sigma:g}"] = row
    n_values = len(prompts) * len(latents)
    cost = {name: 1000 * s / n_values for name, s in seconds.items()}
    return {"rows": rows, "cost_ms_per_value": cost}


# ---------------------------------------------------------------------------------------------------------------
# Retrieval (Table 5 style)
# ---------------------------------------------------------------------------------------------------------------
def held_out_renders(n: int, size: int, seed: int = EVAL_SEED) -> tuple[Tensor, list[str]]:
    """n test-split renders (N, 3, size, size) in [0, 1] with canonical captions."""
    from shapes.bench_world import canonical
    from shapes.data import ShapesDataset

    ds = ShapesDataset("test", n, seed, size=size)
    items = [ds[k] for k in range(n)]
    return torch.stack([it["image"] for it in items]), [canonical(it["caption"]) for it in items]


def top1_in_groups(img: Tensor, txt: Tensor, captions: list[str], group: int = RETRIEVAL_GROUP) -> float:
    """Top-1 caption retrieval among each consecutive group's captions; img, txt L2-normalised (N, E)."""
    right = []
    for start in range(0, (len(captions) // group) * group, group):
        best = (img[start:start + group] @ txt[start:start + group].T).argmax(1)
        right += [captions[start + int(b)] == captions[start + k] for k, b in enumerate(best)]
    return float(np.mean(right))


@torch.no_grad()
def retrieval(policy, reward, critics: dict, sigmas: Sequence[float], n_images: int, batch_size: int) -> dict:
    """Top-1 of the clean CLIP and of each stitched critic's image embedding at each sigma. A prompt-conditioned
    head embeds without its caption (on null text; it would otherwise be told the answer): listed in
    ``null_text_heads``."""
    if n_images < RETRIEVAL_GROUP:
        raise ValueError(f"--retrieval-images must be >= {RETRIEVAL_GROUP}; got {n_images}")
    n_images = (n_images // RETRIEVAL_GROUP) * RETRIEVAL_GROUP
    images, captions = held_out_renders(n_images, policy.image_size)
    device = policy.device
    unique = sorted(set(captions))
    table = dict(zip(unique, F.normalize(reward.text_embed(unique).float().cpu(), dim=-1)))
    txt = torch.stack([table[c] for c in captions])
    clean = torch.cat([reward.image_embed(images[s:s + batch_size].to(device)).float().cpu()
                       for s in range(0, n_images, batch_size)])
    out = {"clean": top1_in_groups(F.normalize(clean, dim=-1), txt, captions), "n_images": n_images,
           "null_text_heads": [n for n, c in critics.items() if getattr(c, "head_conditioning", "") == "prompt"]}
    z0 = torch.cat([policy.encode(images[s:s + batch_size].to(device)).float().cpu()
                    for s in range(0, n_images, batch_size)])
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(NOISE_SEED))
    for sigma in sigmas:
        z_t = (1 - sigma) * z0 + sigma * eps
        for name, critic in critics.items():
            emb = torch.cat([critic.features(z_t[s:s + batch_size].to(device), sigma).embed.float().cpu()
                             for s in range(0, n_images, batch_size)])
            out[f"{name}@{sigma:g}"] = top1_in_groups(F.normalize(emb, dim=-1), txt, captions)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
def check_targets(result: dict) -> list[tuple[str, bool]]:
    """The issue's targets, each (description with the measured numbers, met?). Skips those whose critics are absent."""
    rows = result["value"]["rows"]
    variants = set(result.get("variants", {}))  # other StitchVM builds: compared, not competitors of the targets
    names = [n for n in result["critics"] if n not in variants]
    checks = []
    if "stitchvm" in names and len(names) > 1:
        for key, row in rows.items():
            sigma = float(key)
            others = {n: row[f"{n}/rho"] for n in names if n != "stitchvm"}
            mine = row["stitchvm/rho"]
            if sigma >= 0.5:
                checks.append((f"σ={key}: stitchvm ρ {mine:.3f} > others {max(others.values()):.3f}",
                               mine > max(others.values())))
            elif sigma <= 0.25:
                best = max(mine, *others.values())
                checks.append((f"σ={key}: stitchvm ρ {mine:.3f} within {TARGET_RHO_SLACK} of best {best:.3f}",
                               mine >= best - TARGET_RHO_SLACK))
    if "stitchvm" in names and "0.5" in rows:
        mine = rows["0.5"]["stitchvm/rho"]
        checks.append((f"σ=0.5: stitchvm ρ {mine:.3f} >= {TARGET_RHO_AT_HALF}", mine >= TARGET_RHO_AT_HALF))
    ret = result.get("retrieval")
    if ret is not None and "stitchvm@0.5" in ret and ret["clean"] > 0:
        keep = ret["stitchvm@0.5"] / ret["clean"]
        checks.append((f"σ=0.5: retrieval keeps {keep:.1%} of clean (>= {TARGET_RETRIEVAL_KEEP:.0%})",
                       keep >= TARGET_RETRIEVAL_KEEP))
    return checks


def format_report(result: dict) -> str:
    names, rows = result["critics"], result["value"]["rows"]
    lines = [f"Value quality vs V_MC ({result['rollouts']} rollouts), {result['n_prompts']} held-out prompts, "
             f"device {result['device']}", "",
             "| σ | " + " | ".join(f"{n} ρ" for n in names) + " | " + " | ".join(f"{n} MSE" for n in names)
             + " | MC split-half ρ | V_MC mean ± std |",
             "|---" * (2 * len(names) + 3) + "|"]
    for key, row in rows.items():
        lines.append(f"| {key} | " + " | ".join(f"{row[f'{n}/rho']:.3f}" for n in names) + " | "
                     + " | ".join(f"{row[f'{n}/mse']:.2e}" for n in names)
                     + f" | {row['mc/split_half_rho']:.3f} | {row['mc/mean']:.3f} ± {row['mc/std']:.3f} |")
    cost = result["value"]["cost_ms_per_value"]
    lines += ["", "| critic | ms per value |", "|---|---|"]
    lines += [f"| {n} | {cost[n]:.2f} |" for n in ("mc", *names)]
    ret = result.get("retrieval")
    if ret is not None:
        stitched = [n for n in names if f"{n}@{result['sigmas'][0]:g}" in ret]
        lines += ["", f"Retrieval top-1 among {RETRIEVAL_GROUP} captions, {ret['n_images']} test images "
                      f"(clean CLIP: {ret['clean']:.3f})", "",
                  "| σ | " + " | ".join(stitched) + " | " + " | ".join(f"{n} / clean" for n in stitched) + " |",
                  "|---" * (2 * len(stitched) + 1) + "|"]
        for sigma in result["sigmas"]:
            vals = [ret[f"{n}@{sigma:g}"] for n in stitched]
            lines.append(f"| {sigma:g} | " + " | ".join(f"{v:.3f}" for v in vals) + " | "
                         + " | ".join(f"{v / ret['clean']:.1%}" if ret["clean"] > 0 else "n/a" for v in vals) + " |")
        if ret.get("null_text_heads"):
            lines += ["", f"{', '.join(ret['null_text_heads'])}: prompt-conditioned heads, which embed these images on "
                          f"null text (their caption would be the answer)."]
    checks = check_targets(result)
    if checks:
        lines += ["", "Targets:"] + [f"- [{'x' if ok else ' '}] {text}" for text, ok in checks]
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names, rows, sigmas = result["critics"], result["value"]["rows"], result["sigmas"]
    keys = [f"{s:g}" for s in sigmas]
    ret = result.get("retrieval")
    fig = Figure(figsize=(12 if ret else 8, 3.6))
    FigureCanvasAgg(fig)
    n_axes = 3 if ret else 2
    ax = fig.add_subplot(1, n_axes, 1)
    for n in names:
        ax.plot(sigmas, [rows[k][f"{n}/rho"] for k in keys], marker="o", label=n)
    ax.plot(sigmas, [rows[k]["mc/split_half_rho"] for k in keys], ls="--", color="grey", label="MC split-half")
    ax.set(xlabel="σ", ylabel="Spearman ρ vs V_MC", title="rank agreement with the MC value")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(1, n_axes, 2)
    for n in names:
        ax.semilogy(sigmas, [rows[k][f"{n}/mse"] for k in keys], marker="o", label=n)
    ax.set(xlabel="σ", ylabel="MSE vs V_MC", title="squared error")
    if ret:
        ax = fig.add_subplot(1, n_axes, 3)
        for n in names:
            if f"{n}@{sigmas[0]:g}" in ret:
                ax.plot(sigmas, [ret[f"{n}@{s:g}"] for s in sigmas], marker="o", label=n)
        ax.axhline(ret["clean"], ls="--", color="grey", label="clean CLIP")
        ax.set(xlabel="σ", ylabel="top-1", title=f"caption retrieval among {RETRIEVAL_GROUP}", ylim=(0, 1.02))
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()  # rendered whole, then swapped in: a kill mid-write never leaves a truncated plot
    fig.savefig(buffer, dpi=120, format=Path(path).suffix.lstrip(".") or "png")
    atomic_write_bytes(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------
def denoised_node() -> dict:
    """The arguments of configs/critic/stitchvm_experts_denoised.yaml (without its _component_)."""
    from rl.config import load_yaml
    from rl.train import CONFIG_ROOT

    node = dict(load_yaml(CONFIG_ROOT / "critic" / "stitchvm_experts_denoised.yaml"))
    node.pop("_component_")
    return node


def load_critics(names: Sequence[str], policy, reward, guidance: float, stitchvm_path: str,
                 vae_stitch_path: str, variants: dict[str, str] | None = None) -> dict:
    """The named critics, plus ``variants`` {name: StitchVM directory}, in eval mode on the policy's device."""
    from critics import load
    from critics.baselines import TweedieCritic

    builders = {"stitchvm": lambda: load.stitchvm(policy, reward, stitchvm_path),
                "vae_stitch": lambda: load.vae_stitch(policy, reward, vae_stitch_path),
                "tweedie": lambda: TweedieCritic(policy, reward, guidance_scale=guidance),
                # diagnostic: Tweedie with the unconditional (null-text) denoiser, the conditioning the StitchVM
                # head sees; the gap to "tweedie" is what the prompt adds to a denoised estimate
                "tweedie_null": lambda: TweedieCritic(policy, reward, guidance_scale=0.0),
                # the experts with the low one on the policy's denoised estimate (critics/denoised.py), whose
                # denoiser runs at the benchmark's guidance, as Tweedie's does
                "stitchvm_experts_denoised": lambda: load.stitchvm_experts_denoised(
                    policy, reward, **{**denoised_node(), "guidance_scale": guidance})}
    unknown = sorted(set(names) - set(builders))
    if unknown:
        raise ValueError(f"unknown critics {unknown}; choose from {sorted(builders)}")
    critics = {n: builders[n]() for n in names}
    for name, path in (variants or {}).items():  # more StitchVM builds, benchmarked on the same trajectories
        if name in builders or name == "mc":
            raise ValueError(f"--variant name {name!r} is taken by a critic of the benchmark; pick another")
        spec = denoised_spec(path)
        if spec is not None:  # the denoised experts with this build as their low expert
            low, options = spec
            node = denoised_node()
            critics[name] = load.stitchvm_experts_denoised(policy, reward, **{
                **node, "paths": [low, *node["paths"][1:]], "guidance_scale": guidance, **options})
        else:
            critics[name] = load.stitchvm(policy, reward, path)
    for critic in critics.values():
        critic.eval()
        critic.to(policy.device)
    return critics


def run(args: argparse.Namespace) -> dict:
    from shapes import models
    from shapes.data import prompts as shapes_prompts

    torch.manual_seed(0)
    t0 = time.perf_counter()
    device = torch.device(args.device)
    weights_dir = args.weights_dir or None
    policy = models.load_shapes_policy(device, weights_dir=weights_dir).eval().requires_grad_(False)
    reward = models.load_shapes_reward(device, weights_dir=weights_dir)
    cfg = models.policy_config(weights_dir)
    guidance = cfg.guidance_scale if args.guidance is None else args.guidance
    num_steps = args.num_steps or cfg.num_steps
    names = [n for n in args.critics.split(",") if n]
    variants = parse_variants(args.variant)
    critics = load_critics(names, policy, reward, guidance, args.stitchvm, args.vae_stitch, variants)
    names += list(variants)
    prompts = shapes_prompts("test", args.n_prompts, args.prompt_seed)
    latents = trajectory_latents(policy, prompts, args.sigmas, num_steps, guidance, args.batch_size)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              f"cpu ({torch.get_num_threads()} threads)",
              "critics": names, "variants": variants, "sigmas": list(args.sigmas), "n_prompts": args.n_prompts,
              "rollouts": args.rollouts, "prompt_seed": args.prompt_seed,
              "num_steps": num_steps, "guidance_scale": guidance, "shift": policy.shift,
              "value": value_quality(policy, reward, critics, prompts, latents, args.rollouts, num_steps, guidance,
                                     args.batch_size)}
    stitched = {n: c for n, c in critics.items()
                if n in ("stitchvm", "vae_stitch") or (n in variants and denoised_spec(variants[n]) is None)}
    if args.retrieval_images and stitched:
        result["retrieval"] = retrieval(policy, reward, stitched, args.sigmas, args.retrieval_images, args.batch_size)
    result["targets"] = [{"check": text, "met": ok} for text, ok in check_targets(result)]
    result["time_s"] = time.perf_counter() - t0
    return result


DENOISED_SPEC = re.compile(r"denoised(?:\[(?P<options>[^\]]*)\])?:(?P<dir>.+)")
DENOISED_OPTIONS = {"sigma_in": (float, "a number"), "noise_draws": (int, "an integer")}


def denoised_spec(text: str) -> tuple[str, dict] | None:
    """A --variant DIR written 'denoised:DIR' or 'denoised[sigma_in=0.1,noise_draws=4]:DIR' -> (DIR, {option:
    value}) for stitchvm_experts_denoised with DIR as its low expert (the options replace the shipped config's); any
    other DIR -> None."""
    match = DENOISED_SPEC.fullmatch(text)
    if match is None:
        if text.startswith(("denoised[", "denoised:")):  # meant as one, but malformed: not a directory name
            raise ValueError(f"--variant {text!r}: write denoised:DIR or denoised[KEY=VALUE,...]:DIR")
        return None
    options = {}
    for item in filter(None, (match["options"] or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in DENOISED_OPTIONS:
            raise ValueError(f"--variant {text!r}: options in denoised[...] are KEY=VALUE with KEY one of "
                             f"{sorted(DENOISED_OPTIONS)}, got {item!r}")
        if key in options:
            raise ValueError(f"--variant {text!r}: {key} given twice")
        try:
            options[key] = DENOISED_OPTIONS[key][0](value)
        except ValueError:
            raise ValueError(f"--variant {text!r}: {key} must be {DENOISED_OPTIONS[key][1]}, got {value!r}") from None
    if not 0 < options.get("sigma_in", 0.5) < 1 or options.get("noise_draws", 1) < 1:
        raise ValueError(f"--variant {text!r}: sigma_in must be in (0, 1) and noise_draws >= 1")
    return match["dir"], options


def parse_variants(texts: Sequence[str]) -> dict[str, str]:
    """The 'NAME=DIR' values of --variant -> {NAME: DIR}; NAME is [A-Za-z0-9_.-]+ and used once. A DIR written
    'denoised:DIR' stands for stitchvm_experts_denoised with DIR as its low expert (:func:`denoised_spec`)."""
    variants: dict[str, str] = {}
    for text in texts:
        name, sep, path = text.partition("=")
        if not sep or not path or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"--variant must look like NAME=DIR (NAME of letters, digits, _ . -; DIR a StitchVM "
                             f"directory), got {text!r}")
        if name in variants:
            raise ValueError(f"--variant name {name!r} given twice")
        denoised_spec(path)  # a bad option fails here, before any work
        variants[name] = path
    return variants


def sigma_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.1,0.5, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="critics.bench_value", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-prompts", type=int, default=64, help="held-out test prompts (one trajectory each)")
    parser.add_argument("--prompt-seed", type=int, default=TEST_PROMPT_SEED,
                        help=f"seed of the test prompts: {TEST_PROMPT_SEED} = the reported set; pick critics on "
                             f"another (e.g. {VAL_PROMPT_SEED}) so the reported figures stay held out")
    parser.add_argument("--rollouts", type=int, default=8, help="K, Monte-Carlo rollouts per z_t (even, >= 8 "
                                                                "for the reported figures)")
    parser.add_argument("--sigmas", type=sigma_list, default=SIGMAS, help="comma-separated noise levels in (0, 1)")
    parser.add_argument("--critics", default=",".join(CRITICS), help=f"comma-separated subset of {CRITICS}")
    parser.add_argument("--stitchvm", default="shapes/weights/stitchvm", help="StitchVM directory")
    parser.add_argument("--vae-stitch", default="shapes/weights/vae_stitch", help="vae_stitch directory")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=DIR",
                        help="another StitchVM to benchmark alongside, reported as NAME (repeatable); "
                             "NAME=denoised:DIR: stitchvm_experts_denoised with DIR as its low expert; "
                             "NAME=denoised[sigma_in=0.1,noise_draws=4]:DIR: the same with those settings")
    parser.add_argument("--weights-dir", default="", help="Shapes weights directory (default: shapes/weights)")
    parser.add_argument("--num-steps", type=int, default=0, help="schedule length (default: policy.json)")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: policy.json)")
    parser.add_argument("--retrieval-images", type=int, default=512, help="test renders for retrieval (0: skip)")
    parser.add_argument("--batch-size", type=int, default=64, help="latents per forward pass")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="docs/img/value_bench.png", help="plot PNG ('' to skip)")
    parser.add_argument("--json", default="", help="results JSON (default: --out with .json)")
    parser.add_argument("--quick", action="store_true",
                        help="defaults for a smoke run: 4 prompts, 2 rollouts, 32 retrieval images, batch 16, and no "
                             "files unless --out / --json are given (the default --out is the reported figure)")
    if parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(n_prompts=4, rollouts=2, retrieval_images=32, batch_size=16, out="")
    args = parser.parse_args(argv)
    if args.n_prompts < 1:
        parser.error(f"--n-prompts must be >= 1 (one trajectory each), got {args.n_prompts}")
    if not args.sigmas or not all(0 < s < 1 for s in args.sigmas):
        parser.error(f"--sigmas are noise levels strictly between 0 (clean) and 1 (pure noise), got {args.sigmas}")
    if args.batch_size < 1 or args.retrieval_images < 0:
        parser.error(f"--batch-size must be >= 1 and --retrieval-images >= 0, got {args.batch_size} and "
                     f"{args.retrieval_images}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(format_report(result), flush=True)
    if args.out:
        plot(result, args.out)
    json_path = args.json or (str(Path(args.out).with_suffix(".json")) if args.out else "")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(json_path, result)
    return result


def cli(argv: list[str] | None = None) -> int:
    """``main`` for the command line: a bad input (critic directory, option) is one ``error:`` line and exit 2."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
