#!/usr/bin/env bash
# Session-11 GPU call B for issue #6, four H100s (nvidia-h100-x4), one run alone per card, shipped configs +
# keep_best.yaml, 8.5 minutes. Call A (gpu_session11_a.sh, docs/bench/trainers_session11.md): GRPO-Fast with
# algo.dense_calibration=batch gave the best GRPO final so far (0.525); runs are deterministic, so its check is another
# seed. The decode-and-score twins at today's settings (8 checker workers, keep_best) complete the wall-clock figures:
# DDPO's is s10d_ddpo_fast_terminal_w8; GRPO's (s10b) used the single-process checker; DRaFT's is from session 3.
#   GPU 0: GRPO-Fast twin (--critic terminal, sparse)     GPU 1: GRPO-Fast stitchvm calibrated, run.seed=1
#   GPU 2: DDPO-Fast stitchvm calibrated                  GPU 3: DRaFT-1 twin (--critic terminal: decode, score, backprop)
#   bash benchmarks/gpu_session11_b.sh OUT
set -u
OUT=${1:?out}; MINUTES=${MINUTES:-8.5}; source benchmarks/session3_lib.sh
K="--config configs/experiments/keep_best.yaml run.ckpt_every=100000"
train 0 grpo terminal grpo_fast_terminal_w8 $K algo.advantages=sparse
train 1 grpo stitchvm grpo_fast_calibrated_seed1 $K algo.dense_calibration=batch run.seed=1
train 2 ddpo stitchvm ddpo_fast_calibrated $K algo.dense_calibration=batch
train 3 draft terminal draft_terminal $K
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
wait
SESSION=11 finish grpo_fast_terminal_w8 grpo_fast_calibrated_seed1 ddpo_fast_calibrated draft_terminal
