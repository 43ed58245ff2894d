#!/usr/bin/env bash
# Session-6 GPU call: one shipped Shapes GPU config (GRPO or DDPO) with --critic stitchvm, alone on one GPU for the
# issue's 10-minute budget, with early stopping on validation prompts (configs/experiments/keep_best.yaml) and an
# EMA of the LoRA (algo.ema_decay) evaluated, validated and exported.
#   ALGO=grpo EMA=0.98 bash benchmarks/gpu_session6_a.sh OUT
set -u
OUT=${1:?out}; shift; source benchmarks/session3_lib.sh
M=${MINUTES:-9}; A=${ALGO:-grpo}; EMA=${EMA:-0.98}
n=${A}_keepbest_ema${EMA}
CUDA_VISIBLE_DEVICES=0 OMP_NUM_THREADS=8 python rl/train.py --algo $A --critic stitchvm \
  --config configs/experiments/shapes_gpu_$A.yaml --config configs/experiments/keep_best.yaml \
  run.output_dir=$OUT/runs/$n run.max_minutes=$M run.ckpt_every=100000 prompts.val.n=400 algo.exact_ode=false algo.ema_decay=$EMA "$@" > $OUT/log/$n.txt 2>&1
echo "== $n"; grep -a "eval/overall\|val/overall\|best/" $OUT/log/$n.txt | grep -o "train/epoch=[0-9]*\|eval/overall=[0-9.]*\|val/overall=[0-9.]*\|best/epoch=[0-9.]*" | tr '\n' ' '; echo
grep -a "^final\|rror" $OUT/log/$n.txt | tail -5
