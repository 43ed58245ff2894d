#!/usr/bin/env bash
# Next GPU call for issue #6 (written in session 10, not yet run), four H100s (nvidia-h100-x4), one run alone per card,
# shipped configs + keep_best.yaml, 8.5 minutes. benchmarks/window_credit.py (docs/bench/trainers_session10.md) found
# that the shipped `stitchvm` carries almost no within-group information where GRPO-Fast's window is (sigma .7-.96)
# and splits the window's credit worse than sparse GRPO there, while `stitchvm_experts` beats sparse at every window
# start; algo.dense_calibration=batch turns an uninformative critic's share into ~no credit.
#   GPU 0: GRPO-Fast, --critic stitchvm_experts          GPU 1: GRPO-Fast, --critic stitchvm, dense_calibration=batch
#   GPU 2: DDPO-Fast, --critic stitchvm_experts          GPU 3: DRaFT-1, --critic stitchvm_experts
# Compare with docs/bench/s10b_grpo_fast.jsonl.gz (stitchvm) and s10b_grpo_fast_terminal.jsonl.gz / s10b_ddpo_fast*.jsonl.gz.
# Wall-clock against decode-and-score needs twins at the same settings (8 checker workers): s10d_ddpo_fast_terminal_w8
# is DDPO's; GRPO's twin (s10b) ran with the single-process checker (7.7 s per evaluation instead of 4.3 s), so rerun it
# (train N grpo terminal grpo_fast_terminal $K algo.advantages=sparse) next to a run that passes +0.15.
#   bash benchmarks/gpu_session11_a.sh OUT
set -u
OUT=${1:?out}; MINUTES=${MINUTES:-8.5}; source benchmarks/session3_lib.sh
K="--config configs/experiments/keep_best.yaml run.ckpt_every=100000"
train 0 grpo stitchvm_experts grpo_fast_experts $K
train 1 grpo stitchvm grpo_fast_calibrated $K algo.dense_calibration=batch
train 2 ddpo stitchvm_experts ddpo_fast_experts $K
train 3 draft stitchvm_experts draft_experts $K
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
wait
SESSION=11 finish grpo_fast_experts grpo_fast_calibrated ddpo_fast_experts draft_experts
