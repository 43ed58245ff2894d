"""Rebuild every shipped Shapes model and its figures: VAE, CLIP reward, text tower + flow transformer, bench.

    python -m shapes.train_all --device cuda                        # shapes/weights/ (about 13 minutes on one H200)
    python -m shapes.train_all --device cuda --stages vae,clip      # the same in two parts
    python -m shapes.train_all --device cuda --stages flow,bench

Order: the VAE and the CLIP reward are independent and, with ``--parallel`` (default on CUDA), train at the
same time on the one GPU (each is too small to fill it); the flow model needs the trained VAE's latents; the
bench (shapes.bench_world) measures what was saved and writes <out_dir>/logs/bench.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from shapes import bench_world, models, train_clip, train_flow, train_vae

STAGES = ("vae", "clip", "flow", "bench")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out_dir", default=str(models.WEIGHTS_DIR))
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {STAGES}")
    parser.add_argument("--parallel", choices=("auto", "yes", "no"), default="auto",
                        help="train the CLIP in a second process while the VAE trains (auto: on CUDA)")
    parser.add_argument("--max_minutes", type=float, default=0.0, help="wall-clock guard per stage (0 = none)")
    parser.add_argument("--figure", default="docs/img/shapes_samples.png", help="the bench's sample grid ('' = none)")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise SystemExit(f"unknown stages {unknown}; valid: {list(STAGES)}")
    common = ["--device", args.device, "--out_dir", args.out_dir, "--max_minutes", str(args.max_minutes)]
    parallel = args.parallel == "yes" or (args.parallel == "auto" and args.device.startswith("cuda"))
    times = {}

    clip_proc = None
    if "clip" in stages and "vae" in stages and parallel:
        log = Path(args.out_dir) / "logs" / "clip_stdout.txt"
        log.parent.mkdir(parents=True, exist_ok=True)
        clip_proc = subprocess.Popen([sys.executable, "-m", "shapes.train_clip", *common],
                                     stdout=log.open("w"), stderr=subprocess.STDOUT)
        print(f"train_all: CLIP training in process {clip_proc.pid}, log {log}")
    start = time.perf_counter()
    if "vae" in stages:
        train_vae.main(common)
        times["vae"] = time.perf_counter() - start
    if clip_proc is not None:
        if clip_proc.wait() != 0:
            raise SystemExit(f"CLIP training failed (exit {clip_proc.returncode}); see {log}")
        times["vae+clip (parallel)"] = time.perf_counter() - start
    elif "clip" in stages:
        t = time.perf_counter()
        train_clip.main(common)
        times["clip"] = time.perf_counter() - t
    if "flow" in stages:
        t = time.perf_counter()
        train_flow.main(common)
        times["flow"] = time.perf_counter() - t
    if "bench" in stages:
        t = time.perf_counter()
        bench_world.main(["--device", args.device, "--weights_dir", args.out_dir, "--figure", args.figure,
                          "--out", str(Path(args.out_dir) / "logs" / "bench.json")])
        times["bench"] = time.perf_counter() - t
    print("train_all: wall-clock seconds " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))


if __name__ == "__main__":
    main()
