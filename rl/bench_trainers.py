"""Benchmarks of the trainers on Shapes: dense vs sparse advantages, critic co-training, throughput and memory.

    python -m rl.bench_trainers                          # CPU-sized: the Shapes world, 2-minute runs, one seed
    python -m rl.bench_trainers --minutes 30 --seeds 0 1 2 --throughput-epochs 20 --variance-samples 64 \\
        algo.prompts_per_epoch=32                        # the GPU budget (overrides go to every run)
    python -m rl.bench_trainers --tiny --minutes 0.1     # seconds-long check of this script on tiny random models

Sections (``--sections``):

  dense       For GRPO and DDPO, the advantage estimators under the same wall-clock budget (``--minutes``):
              sparse (--critic terminal), dense lambda = 0 (A_k = V(z_k+1) - V(z_k)) and dense lambda = 1
              (A_k = R - V(z_k)) with the value critic (``--dense-critic``). Reports the final held-out evaluation
              (ShapesEval on the test split), the epochs done in the budget, and the variance of the policy-gradient
              estimate: per-sample gradients g_i = sum_k A_ik grad log pi of the *same* rollout of the initial policy
              under each estimator (paired), advantages scaled to unit RMS, var = tr Cov(g_i) / n and
              SNR = (||g_bar||^2 - var) / var (rl/policy_gradient.py ``gradient_variance``).
  cotrain     GRPO, dense lambda = 0, with critic.cotrain off vs on: the critic's error on the current policy's
              trajectories (critic/value_mse, overall and per sigma bucket, logged before each update) in the first
              epoch and averaged over the last quarter of the run, and the final evaluation.
  throughput  Every trainer (nft, grpo, ddpo, draft) x critic (terminal, the value critic) for
              ``--throughput-epochs`` epochs: seconds per epoch, its split (rollout / value / update / ...),
              and peak GPU memory.

Writes ``<out>/results.json`` (every row, with the per-seed numbers) and prints one table per section.
A run that fails (e.g. DRaFT with a non-differentiable reward) is recorded with its error, not fatal.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import shutil
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from rl.checkpoint import atomic_write_bytes

TINY_CONFIG = str(Path(__file__).resolve().parent.parent / "tests" / "rl" / "tiny.yaml")
# tests/rl/tiny.yaml's algo node is DiffusionNFT's: the keys other trainers lack
TINY_DROP = {"nft": [], "grpo": ["~algo.tau_min", "~algo.tau_max"], "ddpo": ["~algo.tau_min", "~algo.tau_max"],
             "draft": ["~algo.group_size", "~algo.rollout_batch_size"]}
TINY_CRITIC = ["critic._component_=tests.rl.test_cotrain.tiny_stitchvm_critic"]  # on top of --critic terminal
ESTIMATORS = {"sparse": ("sparse", 0.0), "dense-l0": ("dense", 0.0), "dense-l1": ("dense", 1.0)}
# the recorded figures' dense estimators, before session 15 changed the defaults (group_step, batch calibration)
DENSE_AS_RECORDED = {"dense_norm": "global", "dense_calibration": "none"}
DENSE_AS_RECORDED_ARGS = [f"algo.{k}={v}" for k, v in DENSE_AS_RECORDED.items()]
# the dense estimators follow the run's algo.exact_ode (on since session 8; off in the session 3-4 figures, which
# used configs without a Fast window, where it changes nothing)
VARIANCE_ESTIMATORS = {"sparse": ("sparse", 0.0), "dense-l0": ("dense", 0.0), "dense-l0.5": ("dense", 0.5),
                       "dense-l1": ("dense", 1.0), "dense-shipped": ("dense", 1.0), "dense-l1-cal": ("dense", 1.0)}
# the variance section's estimators as recorded (sessions 3-5) but: "dense-shipped", the defaults since session 15;
# "dense-l1-cal" (session 16), calibrated with the global scale, which keeps the steps' relative weight where a
# per-(group, step) std would blow a late step's small residual R - V up to unit scale (whole-trajectory SDE)
VARIANCE_OVERRIDES = {"dense-shipped": {"dense_norm": "group_step", "dense_calibration": "batch"},
                      "dense-l1-cal": {"dense_norm": "global", "dense_calibration": "batch"}}
UNLIMITED = 10**9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rl.bench_trainers", description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", nargs="+", default=["dense", "cotrain", "throughput"],
                   choices=["dense", "cotrain", "throughput"])
    p.add_argument("--algos", nargs="+", default=["grpo", "ddpo"], choices=["grpo", "ddpo"], help="dense section")
    p.add_argument("--minutes", type=float, default=2.0, help="wall-clock budget of each training run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--dense-critic", default="stitchvm", help="critic config name of the dense / co-training runs")
    p.add_argument("--variance-samples", type=int, default=16, help="samples in the gradient-variance estimate")
    p.add_argument("--throughput-epochs", type=int, default=3)
    p.add_argument("--config", action="append", default=[], help="extra YAML merged into every run")
    p.add_argument("--tiny", action="store_true", help="tiny random models (tests/rl/tiny.yaml): checks the script")
    p.add_argument("--out", default="runs/bench_trainers")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ runs
def critic_args(args, dense: bool) -> list[str]:
    """(--critic NAME, overrides) for a sparse (terminal) or dense run."""
    if not dense:
        return ["--critic", "terminal"]
    if args.tiny:
        return ["--critic", "terminal", *TINY_CRITIC]
    return ["--critic", args.dense_critic]


def train_argv(args, algo: str, critic: list[str], name: str, extra: list[str]) -> list[str]:
    configs = ([TINY_CONFIG] if args.tiny else []) + args.config
    drop = TINY_DROP[algo] if args.tiny else []
    return ["--algo", algo, critic[0], critic[1], *[x for c in configs for x in ("--config", c)], *drop,
            f"run.output_dir={Path(args.out) / name}", *critic[2:], *args.overrides, *extra]


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def train_once(args, algo: str, critic: list[str], name: str, extra: list[str]) -> dict:
    """One in-process run through rl/train.py; returns its summary (or its error)."""
    from rl import train

    run_dir = Path(args.out) / name
    shutil.rmtree(run_dir, ignore_errors=True)
    gc.collect()  # the previous run's models
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        rc = train.main(train_argv(args, algo, critic, name, extra))
        error = None if rc == 0 else f"exit status {rc}"
    except Exception as e:  # noqa: BLE001 (a benchmark row records the failure and goes on)
        traceback.print_exc()
        error = f"{type(e).__name__}: {e}"
    wall = time.perf_counter() - start
    rows = read_metrics(run_dir)
    epochs = max((r.get("train/epoch", 0) for r in rows), default=0)
    final = next((r for r in reversed(rows) if any(k.startswith("eval/") for k in r)), {})
    train_rows = [r for r in rows if "train/epoch" in r and r.get("step", 0) > 0]
    # steady state: epochs 2.. (the first one pays lazy initialisation, allocator growth, first-call compilation)
    steady_rows = [r for r in train_rows if r["step"] > 1] or train_rows
    times = {k: float(np.mean([r[k] for r in steady_rows if k in r])) for k in
             sorted({k for r in steady_rows for k in r if k.startswith("time/")})}
    ends = {r["step"]: r["wall_time"] for r in train_rows if "wall_time" in r}  # an epoch's row is logged at its end
    gaps = [ends[e] - ends[e - 1] for e in sorted(ends) if e > 1 and e - 1 in ends]
    return {"name": name, "algo": algo, "error": error, "wall_s": wall, "epochs": epochs,
            "sec_per_epoch": wall / epochs if epochs else math.nan,
            "steady_sec_per_epoch": float(np.mean(gaps)) if gaps else math.nan,
            "eval": {k: v for k, v in final.items() if k.startswith("eval/")}, "time": times,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else math.nan,
            "critic_curve": [{k: v for k, v in r.items() if k.startswith("critic/value_mse")} for r in train_rows
                             if "critic/value_mse" in r],
            "reward_curve": [r.get("reward/mean", math.nan) for r in train_rows]}


def budget(args) -> list[str]:
    return [f"run.max_minutes={args.minutes}", f"run.max_epochs={UNLIMITED}", "run.eval_every=0",
            f"run.ckpt_every={UNLIMITED}"]


# ------------------------------------------------------------------------------------------------ variance
def initial_rollout(args, seed: int, name: str):
    """One rollout of the initial GRPO policy (the run's config, ``--variance-samples`` rows in whole groups) and
    V at every latent: (run, cfg, LoRA params, rollout, values (B, N+1)). Close ``run.logger`` when done."""
    from policies import lora
    from rl import common, cotrain, train
    from rl import policy_gradient as pg

    argv = train_argv(args, "grpo", critic_args(args, dense=True), name, [f"run.seed={seed}"])
    composed = train.compose_config(train.parse_args(argv))
    run = train.build_run(composed)
    cfg = composed.algo_cfg
    spec = lora.LoraSpec(r=cfg.lora_rank, alpha=cfg.lora_alpha, target_modules=cfg.lora_targets)
    params, _ = common.setup_lora(run, spec, cfg.lr, cfg.weight_decay)
    cotrain.freeze(run.critic, cotrain.shared_parameters(run))
    prompts = run.train_prompts[: max(1, math.ceil(args.variance_samples / cfg.group_size))]
    rows = [p for p in prompts for _ in range(cfg.group_size)]
    rng, generator = pg.epoch_generator(run, 0, 1)
    # with the config's group noise (z_T shared by a prompt's samples); the records before session 16's fix
    # (pg_variance_session15_cpu.json, the "per-sample z_T" part of pg_variance_session16_cpu.json) drew z_T per sample
    rollout = pg.collect(run, rows, cfg.num_steps, cfg.eta, cfg.guidance_scale, cfg.rollout_batch_size,
                         cfg.sde_window, cfg.sde_window_start, rng, generator, None,
                         cfg.group_size if cfg.group_noise else 1, cfg.sde_type)
    values = cotrain.trajectory_values(run.critic, rollout.latents, rollout.sigmas, rows, cfg.value_batch_size)
    return run, cfg, params, rollout, values


def gradient_variance_at_init(args, seed: int) -> dict[str, float]:
    """Paired per-sample policy-gradient variance of the estimators on one rollout of the initial GRPO policy."""
    from rl import grpo
    from rl import policy_gradient as pg

    run, cfg, params, rollout, values = initial_rollout(args, seed, f"variance-seed{seed}")
    advs = {est: grpo.grpo_advantages(rollout.rewards, values, rollout.sde_mask,
                                      dataclasses.replace(cfg, advantages=mode, gae_lambda=lam,
                                                          **VARIANCE_OVERRIDES.get(est, DENSE_AS_RECORDED)))
            for est, (mode, lam) in VARIANCE_ESTIMATORS.items()}
    out = pg.gradient_variance(run.policy, rollout, advs, params, cfg.eta, cfg.guidance_scale, args.variance_samples)
    run.logger.close()
    return out


# ------------------------------------------------------------------------------------------------ sections
def mean_std(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return "n/a"
    return f"{np.mean(xs):.4g}" + (f" ± {np.std(xs):.2g}" if len(xs) > 1 else "")


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def section_dense(args) -> dict:
    runs, variance = [], [gradient_variance_at_init(args, s) for s in args.seeds]
    for algo in args.algos:
        for est, (mode, lam) in ESTIMATORS.items():
            for seed in args.seeds:
                extra = [f"algo.advantages={mode}", f"algo.gae_lambda={lam}", *DENSE_AS_RECORDED_ARGS,
                         f"run.seed={seed}", *budget(args)]
                runs.append({**train_once(args, algo, critic_args(args, mode == "dense"), f"dense/{algo}-{est}-s{seed}",
                                          extra), "estimator": est, "seed": seed})
    eval_keys = sorted({k for r in runs for k in r["eval"]})
    rows = []
    for algo in args.algos:
        for est in ESTIMATORS:
            sel = [r for r in runs if r["algo"] == algo and r["estimator"] == est]
            rows.append([algo, est, *[mean_std([r["eval"].get(k) for r in sel]) for k in eval_keys],
                         mean_std([r["epochs"] for r in sel]), "; ".join(r["error"] for r in sel if r["error"])[:80]])
    print_table(f"dense vs sparse: final held-out evaluation after {args.minutes} min (seeds {args.seeds})",
                ["algo", "estimator", *eval_keys, "epochs", "error"], rows)
    print_table(f"policy-gradient variance at the initial policy (GRPO, {args.variance_samples} samples, paired, "
                f"advantages at unit RMS)", ["estimator", "var", "SNR"],
                [[est, mean_std([v[f"pg/{est}/var"] for v in variance]),
                  mean_std([v[f"pg/{est}/snr"] for v in variance])] for est in VARIANCE_ESTIMATORS])
    return {"runs": runs, "variance": variance}


def section_cotrain(args) -> dict:
    runs = []
    for on in (False, True):
        for seed in args.seeds:
            extra = ["algo.advantages=dense", "algo.gae_lambda=0", *DENSE_AS_RECORDED_ARGS, f"run.seed={seed}",
                     *budget(args),
                     f"+critic.cotrain.enabled={str(on).lower()}"]
            runs.append({**train_once(args, "grpo", critic_args(args, True), f"cotrain/{'on' if on else 'off'}-s{seed}",
                                      extra), "cotrain": on, "seed": seed})
    keys = sorted({k for r in runs for row in r["critic_curve"] for k in row})
    eval_keys = sorted({k for r in runs for k in r["eval"]})

    def first_last(r: dict, key: str) -> tuple[float, float]:
        curve = r["critic_curve"]
        if not curve:
            return math.nan, math.nan
        last = curve[-max(1, len(curve) // 4):]
        return curve[0].get(key, math.nan), float(np.nanmean([c.get(key, math.nan) for c in last]))

    rows = []
    for on in (False, True):
        sel = [r for r in runs if r["cotrain"] == on]
        cells = []
        for k in keys:
            pairs = [first_last(r, k) for r in sel]
            cells.append(f"{mean_std([a for a, _ in pairs])} -> {mean_std([b for _, b in pairs])}")
        rows.append(["on" if on else "off", *cells, *[mean_std([r["eval"].get(k) for r in sel]) for k in eval_keys],
                     mean_std([r["epochs"] for r in sel]), "; ".join(r["error"] for r in sel if r["error"])[:80]])
    print_table(f"critic co-training (GRPO dense lambda=0, {args.minutes} min, seeds {args.seeds}): value error on "
                f"the current policy's trajectories, first epoch -> mean of the last quarter",
                ["cotrain", *[k.replace("critic/value_", "") for k in keys], *eval_keys, "epochs", "error"], rows)
    return {"runs": runs}


def section_throughput(args) -> dict:
    runs = []
    # a discarded run first: one-off process costs (imports, allocator, kernels) would land on whichever run came
    # first (the NFT decode-and-score one)
    train_once(args, "nft", critic_args(args, False), "throughput/warmup",
               ["run.max_epochs=2", "run.eval_every=0", f"run.ckpt_every={UNLIMITED}"])
    for algo in ("nft", "grpo", "ddpo", "draft"):
        for dense in (False, True):
            extra = [f"run.max_epochs={args.throughput_epochs}", "run.eval_every=0", f"run.ckpt_every={UNLIMITED}"]
            if algo in ("grpo", "ddpo"):
                extra.append(f"algo.advantages={'dense' if dense else 'sparse'}")
            name = f"throughput/{algo}-{'value' if dense else 'terminal'}"
            row = train_once(args, algo, critic_args(args, dense), name, extra)
            runs.append({**row, "critic": "value" if dense else "terminal"})
    split_keys = sorted({k for r in runs for k in r["time"]})
    print_table(f"throughput ({args.throughput_epochs} epochs after a discarded warm-up run; s/epoch: the whole "
                f"run over its epochs, initial and final evaluation included; steady: the mean epoch from epoch 2, "
                f"as the time splits)", ["algo", "critic", "s/epoch", "steady s/epoch",
                                        *[k.removeprefix("time/") for k in split_keys], "peak GB", "error"],
                [[r["algo"], r["critic"], f"{r['sec_per_epoch']:.3g}", f"{r['steady_sec_per_epoch']:.3g}",
                  *[f"{r['time'].get(k, math.nan):.3g}" for k in split_keys],
                  f"{r['peak_mem_gb']:.3g}", (r["error"] or "")[:80]] for r in runs])
    return {"runs": runs}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = {"args": vars(args), "device": "cuda" if torch.cuda.is_available() else "cpu"}
    for section in args.sections:
        results[section] = {"dense": section_dense, "cotrain": section_cotrain,
                            "throughput": section_throughput}[section](args)
        atomic_write_bytes(Path(args.out) / "results.json", json.dumps(results, indent=1, default=str).encode())
    print(f"\nwrote {Path(args.out) / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
