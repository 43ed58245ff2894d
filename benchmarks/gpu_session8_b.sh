#!/usr/bin/env bash
# Session-8 GPU call for issue #6, DDPO (two GPUs, one run alone on each, 9 minutes, keep_best on ~600 validation
# prompts, EMA 0.98 on the optimizer-step clock, CLIP reward, --critic stitchvm, exact values across ODE steps):
# DDPO-Fast -- DDPO's two importance-sampled PPO passes per batch over Flow-GRPO-Fast's 2-step SDE window, group
# noise, KL 0.04. At GRPO's lr 3e-4 the two passes double the step and the run collapses after ~120 epochs
# (gpu_session8_a.sh), so here the lr is cut:
#   GPU 0  lr 1.5e-4 (two passes ~ one pass at 3e-4)
#   GPU 1  lr 1e-4
#   bash benchmarks/gpu_session8_b.sh OUT
set -u
OUT=${1:?out}; MINUTES=${MINUTES:-9}; source benchmarks/session3_lib.sh
K="--config configs/experiments/keep_best.yaml prompts.val.n=${VAL_N:-1000} run.ckpt_every=100000"
W="algo.sde_window=2 algo.sde_window_start=[0,4] algo.timestep_fraction=1.0 algo.prompts_per_epoch=64 algo.group_size=16"
train 0 ddpo stitchvm ddpo_fast_lr15 $K $W algo.ema_decay=0.98 algo.lr=1.5e-4
train 1 ddpo stitchvm ddpo_fast_lr10 $K $W algo.ema_decay=0.98 algo.lr=1e-4
wait
SESSION=8 finish ddpo_fast_lr15 ddpo_fast_lr10
