"""DiffusionNFT on Shapes on 1 and 2 GPUs under DDP, DeepSpeed ZeRO-2 and ZeRO-3: throughput and equivalence.

For each backend the same job — ``rl/train.py --algo nft --critic stitchvm --config
configs/experiments/shapes_gpu.yaml`` with one fixed global batch — runs for ``--epochs`` epochs on one GPU, then
on two, each an ``accelerate launch`` subprocess writing its own ``metrics.jsonl``:

    backend  1 GPU                                   2 GPUs
    ddp      configs/accelerate/single.yaml          configs/accelerate/ddp_2gpu.yaml
    zero2    zero2_2gpu.yaml --num_processes 1       zero2_2gpu.yaml
    zero3    zero3_2gpu.yaml --num_processes 1       zero3_2gpu.yaml

Batch sizes are global (rl/distributed.py), so the two runs of a backend train on the same rows, with the same
noise and timesteps: their loss curves agree up to float reduction order, which is what ``max |d loss|`` checks.
Throughput is measured in the steady state, from the epochs' wall-clock in metrics.jsonl, leaving out epoch 1
(CUDA context, allocator and kernel warm-up); start-up and the evaluations before and after are not counted.
The Shapes transformer is tiny (8 blocks, width 128), so per-pass launch and Python overhead is a large share of
an epoch; the default batch (128 prompts x 8 = 1024 rows, one rollout round, 2 optimizer steps of 512) keeps each
GPU busy; ``--prompts`` scales it.

    python -m benchmarks.multi_gpu --out $OUT/mg --epochs 6            # 2 GPUs, ~5 minutes
    python -m benchmarks.multi_gpu --out runs/mg_cpu --cpu            # CPU smoke test of this script (tiny model)

Prints a markdown table and writes ``multi_gpu.json`` + ``multi_gpu.md`` (and every run's directory and log) under
``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ACCEL = ROOT / "configs" / "accelerate"
BACKENDS = ("ddp", "zero2", "zero3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(backend: str, gpus: int, cpu: bool) -> tuple[list[str], dict[str, str]]:
    """(command prefix up to the script, extra environment) that starts ``gpus`` processes of ``backend``."""
    if cpu:  # torchrun: accelerate's launcher runs one CPU process only (tests/rl/test_distributed.py)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus)]
        if backend == "ddp":
            return cmd + ["rl/train.py"], {"ACCELERATE_USE_CPU": "true"}
        return cmd + ["tests/rl/train_gloo.py"], {"ACCELERATE_USE_DEEPSPEED": "true",
                                                  "ACCELERATE_DEEPSPEED_ZERO_STAGE": backend[-1],
                                                  "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false"}
    config = "single.yaml" if backend == "ddp" and gpus == 1 else f"{backend}_2gpu.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCEL / config),
           "--main_process_port", str(_free_port())]
    if backend != "ddp" and gpus == 1:
        cmd += ["--num_processes", "1"]
    return cmd + ["rl/train.py"], {}


def job_args(args, out_dir: Path) -> list[str]:
    """The training job's arguments: the same global batch whatever the number of processes."""
    if args.cpu:
        base = ["--critic", "terminal", "--config", "tests/rl/tiny.yaml",
                "reward._component_=tests.rl.test_draft.Redness", "eval_metric._component_=tests.rl.test_draft.Redness"]
    else:
        base = ["--critic", "stitchvm", "--config", "configs/experiments/shapes_gpu.yaml",
                f"algo.prompts_per_epoch={args.prompts}", f"algo.group_size={args.group}",
                f"algo.rollout_batch_size={args.rollout_batch}", f"algo.train_batch_size={args.train_batch}"]
    return ["--algo", "nft", *base, f"run.output_dir={out_dir}", f"run.max_epochs={args.epochs}",
            "run.max_minutes=null", "run.eval_every=0", f"run.ckpt_every={args.epochs}", "run.log_backends=[]",
            f"run.mixed_precision='{args.mixed_precision}'", *args.overrides]


def run_one(args, backend: str, gpus: int, timeout: float) -> dict:
    name = f"{backend}_{gpus}gpu"
    out_dir = args.out / "runs" / name
    if timeout < 30:
        print(f"[{name}] skipped: the --budget is spent", flush=True)
        return {"backend": backend, "gpus": gpus, "rc": "skipped", "log": "", "run_dir": f"runs/{name}"}
    cmd, env = launch_command(backend, gpus, args.cpu)
    cmd += job_args(args, out_dir)
    log = args.out / "logs" / f"{name}.txt"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    start = time.time()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, stdout=f,
                                stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    # paths relative to --out: the records carry no machine paths
    result = {"backend": backend, "gpus": gpus, "rc": rc, "wall_s": round(time.time() - start, 1),
              "log": f"logs/{name}.txt", "run_dir": f"runs/{name}", **summarise(out_dir / "metrics.jsonl", args)}
    print(f"[{name}] rc={rc} wall {result['wall_s']} s, steady {result.get('epoch_s', math.nan):.3f} s/epoch",
          flush=True)
    return result


def summarise(metrics_path: Path, args) -> dict:
    """Per-epoch losses and wall-clock from metrics.jsonl; the steady-state epoch time leaves out epoch 1."""
    if not metrics_path.is_file():
        return {}
    rows = [json.loads(x) for x in metrics_path.read_text().splitlines()]
    epochs = {}
    for r in rows:
        if "loss/total" in r and r["step"] not in epochs:
            epochs[r["step"]] = r
    ends = [epochs[e]["wall_time"] for e in sorted(epochs)]
    start = next((r["wall_time"] for r in rows if r["step"] == 0), None)  # after the initial evaluation
    durations = [b - a for a, b in zip([start, *ends[:-1]], ends)] if start is not None else []
    steady = durations[1:] if len(durations) > 1 else durations
    epoch_s = sum(steady) / len(steady) if steady else math.nan
    final = [r for r in rows if r["step"] == max(epochs, default=0) and "loss/total" not in r]
    evals = {k: v for r in final for k, v in r.items() if k.startswith("eval/")}
    rows_per_epoch = 4 if args.cpu else args.prompts * args.group  # tests/rl/tiny.yaml: 2 prompts x 2
    steady_rows = [epochs[e] for e in sorted(epochs)][1:] or [epochs[e] for e in sorted(epochs)]
    split_keys = sorted({k for r in steady_rows for k in r if k.startswith("time/") and k != "time/eval"})
    split = {k.removeprefix("time/"): sum(r.get(k, 0.0) for r in steady_rows) / len(steady_rows) for k in split_keys}
    return {"epochs": len(epochs), "epoch_durations_s": durations, "epoch_s": epoch_s, "time_split_s": split,
            "samples_per_s": rows_per_epoch / epoch_s if epoch_s == epoch_s else math.nan,
            "loss": [epochs[e]["loss/total"] for e in sorted(epochs)],
            "grad_norm": [epochs[e]["policy/grad_norm"] for e in sorted(epochs)],
            "reward": [epochs[e]["reward/mean"] for e in sorted(epochs)], "final_eval": evals}


def compare(one: dict, two: dict) -> dict:
    """2-GPU vs 1-GPU: speed-up and how far the loss curves and final evaluations are apart."""
    n = min(len(one.get("loss", [])), len(two.get("loss", [])))
    d_loss = [abs(a - b) for a, b in zip(one["loss"][:n], two["loss"][:n])] if n else []
    rel = [d / max(abs(a), 1e-12) for d, a in zip(d_loss, one.get("loss", []))]
    key = "eval/overall" if "eval/overall" in one.get("final_eval", {}) else next(iter(one.get("final_eval", {})), None)
    return {"speedup": one.get("epoch_s", math.nan) / two.get("epoch_s", math.nan) if two.get("epoch_s") else math.nan,
            "max_abs_dloss": max(d_loss) if d_loss else math.nan, "max_rel_dloss": max(rel) if rel else math.nan,
            "eval_key": key, "eval_1gpu": one.get("final_eval", {}).get(key, math.nan),
            "eval_2gpu": two.get("final_eval", {}).get(key, math.nan)}


def table(results: dict, args, device: str) -> str:
    lines = [f"DiffusionNFT on Shapes (critic {'terminal, tiny CPU model' if args.cpu else 'stitchvm'}), "
             f"{args.prompts} x {args.group} rows per epoch, rollout batch {args.rollout_batch}, train batch "
             f"{args.train_batch} (global), {args.epochs} epochs, mixed precision {args.mixed_precision}, "
             f"{device}; steady state = epochs 2..{args.epochs}.", "",
             "| backend | 1 GPU s/epoch | 2 GPU s/epoch | speed-up | 2 GPU samples/s | max abs d loss | max rel d loss "
             "| final eval 1 GPU | final eval 2 GPU |", "|---|---|---|---|---|---|---|---|---|"]
    for backend, r in results.items():
        one, two, c = r["1gpu"], r["2gpu"], r["compare"]
        lines.append(f"| {backend} | {one.get('epoch_s', math.nan):.3f} | {two.get('epoch_s', math.nan):.3f} | "
                     f"{c['speedup']:.2f}x | {two.get('samples_per_s', math.nan):.0f} | {c['max_abs_dloss']:.2e} | "
                     f"{c['max_rel_dloss']:.2e} | {c['eval_1gpu']:.4f} | {c['eval_2gpu']:.4f} |")
    # where a steady epoch goes (rl/common.py timers, main process): the time breakdown a speed-up is read against
    parts = sorted({k for r in results.values() for g in ("1gpu", "2gpu") for k in r[g].get("time_split_s", {})})
    if parts:
        lines += ["", "Steady-epoch time split (s, main process): " + ", ".join(parts), "",
                  "| backend | GPUs | " + " | ".join(parts) + " |", "|---|---|" + "---|" * len(parts)]
        for backend, r in results.items():
            for g in ("1gpu", "2gpu"):
                split = r[g].get("time_split_s", {})
                lines.append(f"| {backend} | {r[g].get('gpus', g[0])} | "
                             + " | ".join(f"{split.get(k, math.nan):.3f}" for k in parts) + " |")
    failed = [f"{b} {g}: rc={r[g]['rc']} ({r[g]['log']})" for b, r in results.items() for g in ("1gpu", "2gpu")
              if r[g]["rc"] != 0]
    if failed:
        lines += ["", "Failed runs: " + "; ".join(failed)]
    return "\n".join(lines)


def device_name(cpu: bool) -> str:
    if cpu:
        return "CPU (gloo)"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip().splitlines()
        return f"{len(out)} x {out[0]}" if out else "unknown GPU"
    except (OSError, subprocess.SubprocessError):
        return "unknown GPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (JSON, markdown, runs, logs)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run (epoch 1 is warm-up, not timed)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated subset of {BACKENDS}")
    parser.add_argument("--prompts", type=int, default=128, help="prompts per epoch (global)")
    parser.add_argument("--group", type=int, default=8, help="samples per prompt")
    parser.add_argument("--rollout-batch", type=int, default=1024, help="rows per rollout round (global)")
    parser.add_argument("--train-batch", type=int, default=512, help="rows per optimizer step (global)")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16"))
    parser.add_argument("--timeout", type=int, default=150, help="seconds per run before it is killed")
    parser.add_argument("--budget", type=int, default=540,
                        help="seconds for all runs (later runs are skipped; results are written after each backend)")
    parser.add_argument("--cpu", action="store_true", help="smoke test on CPU: tiny model, torchrun, 2 processes")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = parser.parse_args(argv)
    if args.cpu:
        args.prompts, args.group, args.rollout_batch, args.train_batch = 2, 2, 4, 2  # tests/rl/tiny.yaml
        args.epochs = min(args.epochs, 3)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (epoch 1 is warm-up)")
    backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        parser.error(f"unknown backend(s) {unknown}; choose from {BACKENDS}")
    args.out.mkdir(parents=True, exist_ok=True)
    device = device_name(args.cpu)
    deadline = time.time() + args.budget
    results = {}
    for backend in backends:
        one = run_one(args, backend, 1, min(args.timeout, deadline - time.time()))
        two = run_one(args, backend, 2, min(args.timeout, deadline - time.time()))
        results[backend] = {"1gpu": one, "2gpu": two, "compare": compare(one, two)}
        text = table(results, args, device)  # written after every backend: a cut-off run keeps what it has
        from rl.checkpoint import atomic_write_bytes

        atomic_write_bytes(args.out / "multi_gpu.md", (text + "\n").encode())  # a kill mid-write keeps the last
        atomic_write_bytes(args.out / "multi_gpu.json", json.dumps(
            {"device": device, "args": {k: str(v) for k, v in vars(args).items()}, "results": results},
            indent=2).encode())
    print("\n" + text)
    return 0 if all(r[g]["rc"] == 0 for r in results.values() for g in ("1gpu", "2gpu")) else 1


if __name__ == "__main__":
    sys.exit(main())
