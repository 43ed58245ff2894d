#!/usr/bin/env bash
# Session-9 GPU call for issue #6, DDPO on one H100 (one run alone, 8.5 minutes, keep_best, EMA 0.98, CLIP reward,
# --critic stitchvm, exact values across ODE steps, DDPO-Fast with 2 importance-sampled PPO passes). gpu_session9_b.sh
# found that a clip range of 1e-3 keeps the second pass (clip fraction ~0 against 0.1-0.4 at 1e-4) and is stable at
# lr 1e-4, still climbing at the end (held-out .518 best, .504 kept, H200). Here lr 1.5e-4: two unclipped passes at
# half GRPO-Fast's lr move the policy about as far per batch as GRPO-Fast's one pass at 3e-4.
#   bash benchmarks/gpu_session9_c.sh OUT
set -u
OUT=${1:?out}; MINUTES=${MINUTES:-8.5}; source benchmarks/session3_lib.sh
K="--config configs/experiments/keep_best.yaml run.ckpt_every=100000 algo.ema_decay=0.98"
W="algo.sde_window=2 algo.sde_window_start=[0,4] algo.timestep_fraction=1.0 algo.prompts_per_epoch=64 algo.group_size=16"
train 0 ddpo stitchvm ddpo_fast_clip1e-3_lr15 $K $W algo.clip_range=1e-3 algo.lr=1.5e-4
wait
SESSION=9 finish ddpo_fast_clip1e-3_lr15
