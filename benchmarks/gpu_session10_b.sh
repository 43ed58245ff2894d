#!/usr/bin/env bash
# Session-10 GPU call for issue #6 on four H100s (nvidia-h100-x4), one run alone per card, 8.5 minutes of training,
# keep_best.yaml with 2858 validation prompts of the evaluation's kind mix, validated (and evaluated) every 20 epochs.
#   GPU 0: GRPO-Fast, --critic stitchvm (the shipped command)      GPU 1: its twin, --critic terminal algo.advantages=sparse
#   GPU 2: DDPO-Fast, --critic stitchvm, lr 1.5e-4                  GPU 3: its twin
#   bash benchmarks/gpu_session10_b.sh OUT
set -u
OUT=${1:?out}; MINUTES=${MINUTES:-8.5}; source benchmarks/session3_lib.sh
K="--config configs/experiments/keep_best.yaml run.ckpt_every=100000"
train 0 grpo stitchvm grpo_fast $K
train 1 grpo terminal grpo_fast_terminal $K algo.advantages=sparse
train 2 ddpo stitchvm ddpo_fast $K algo.lr=1.5e-4
train 3 ddpo terminal ddpo_fast_terminal $K algo.lr=1.5e-4 algo.advantages=sparse
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
wait
SESSION=10 finish grpo_fast grpo_fast_terminal ddpo_fast ddpo_fast_terminal
