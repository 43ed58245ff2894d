#!/usr/bin/env bash
# Session-8 GPU call for issue #6 (two GPUs, one run alone on each, 9 minutes, keep_best on ~600 validation prompts,
# EMA with the optimizer-step clock): the exact value across ODE steps (algo.exact_ode, new this session: after a
# Fast window's last stochastic step V = R, the critic only at the window's two latents), CLIP reward,
# --critic stitchvm (the shipped default) for both trainers:
#   GPU 0  GRPO-Fast, the shipped config (session 7's run, now with exact_ode)
#   GPU 1  DDPO-Fast: DDPO (PPO, 2 inner epochs) with the same 2-step SDE window, group noise, KL 0.04
#   bash benchmarks/gpu_session8_a.sh OUT
set -u
OUT=${1:?out}; MINUTES=${MINUTES:-9}; source benchmarks/session3_lib.sh
K="--config configs/experiments/keep_best.yaml prompts.val.n=${VAL_N:-1000} run.ckpt_every=100000"
W="algo.sde_window=2 algo.sde_window_start=[0,4] algo.timestep_fraction=1.0 algo.prompts_per_epoch=64 algo.group_size=16"
train 0 grpo stitchvm grpo_fast_exact $K algo.ema_decay=0.98
train 1 ddpo stitchvm ddpo_fast_exact $K $W algo.ema_decay=0.98
wait
SESSION=8 finish grpo_fast_exact ddpo_fast_exact
