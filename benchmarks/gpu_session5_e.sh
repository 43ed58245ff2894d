#!/usr/bin/env bash
# Session-5 GPU call E: the best GRPO-with-critic setting of calls B and D (Flow-GRPO-Fast, group noise, dense
# lambda-0 advantages from --critic stitchvm) alone on one H100 for the 10-minute budget (9 minutes here).
#   bash benchmarks/gpu_session5_e.sh OUT
set -u
OUT=${1:?out}; source benchmarks/session3_lib.sh
M=${MINUTES:-9}
BIG="algo.prompts_per_epoch=64 algo.group_size=16 algo.rollout_batch_size=1024 algo.train_batch_size=512 algo.value_batch_size=1024 algo.group_noise=true"
FAST="algo.sde_window=2 algo.sde_window_start=[0,4] algo.timestep_fraction=1.0"
train 0 grpo stitchvm grpo_gn_fast_dense0_alone $BIG $FAST algo.advantages=dense algo.gae_lambda=0.0
wait
report
