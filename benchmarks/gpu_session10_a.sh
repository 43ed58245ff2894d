#!/usr/bin/env bash
# Session-10 GPU call for issue #6 on four H100s (nvidia-h100-x4), one run alone per card, 8.5 minutes of training each,
# the shipped experiment configs + keep_best.yaml (whose validation set now mirrors the evaluation's prompt kinds).
#   GPU 0: GRPO-Fast, --critic stitchvm (the shipped command; its H100 figure)
#   GPU 1: DDPO-Fast, --critic stitchvm, the shipped lr 1e-4
#   GPU 2: DDPO-Fast, --critic stitchvm, lr 1.5e-4 (session 9, H100: held-out 0.52-0.54 over its last 50 epochs)
#   GPU 3: GPU 2's decode-and-score twin: --critic terminal algo.advantages=sparse
#   bash benchmarks/gpu_session10_a.sh OUT
set -u
OUT=${1:?out}; MINUTES=${MINUTES:-8.5}; source benchmarks/session3_lib.sh
K="--config configs/experiments/keep_best.yaml run.ckpt_every=100000"
train 0 grpo stitchvm grpo_fast $K
train 1 ddpo stitchvm ddpo_fast_lr1e-4 $K
train 2 ddpo stitchvm ddpo_fast_lr1.5e-4 $K algo.lr=1.5e-4
train 3 ddpo terminal ddpo_fast_lr1.5e-4_terminal $K algo.lr=1.5e-4 algo.advantages=sparse
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
wait
SESSION=10 finish grpo_fast ddpo_fast_lr1e-4 ddpo_fast_lr1.5e-4 ddpo_fast_lr1.5e-4_terminal
