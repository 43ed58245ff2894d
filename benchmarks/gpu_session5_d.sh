#!/usr/bin/env bash
# Session-5 GPU call D (one H100 shared by two runs): the two best group-noise settings of call B
# (benchmarks/gpu_session5_b.sh) with the per-step critic signal: Flow-GRPO-Fast with dense lambda-0 advantages,
# and DDPO dense lambda 0 with a looser KL anchor (0.01 instead of 0.04). CLIP reward, --critic stitchvm, start 0.377.
#   bash benchmarks/gpu_session5_d.sh OUT
set -u
OUT=${1:?out}; source benchmarks/session3_lib.sh
M=${MINUTES:-8.5}
BIG="algo.prompts_per_epoch=64 algo.group_size=16 algo.rollout_batch_size=1024 algo.train_batch_size=512 algo.value_batch_size=1024 algo.group_noise=true"
DBIG="algo.prompts_per_epoch=128 algo.group_size=8 algo.rollout_batch_size=1024 algo.train_batch_size=512 algo.value_batch_size=1024 algo.group_noise=true"
FAST="algo.sde_window=2 algo.sde_window_start=[0,4] algo.timestep_fraction=1.0"
train 0 grpo stitchvm grpo_gn_fast_dense0 $BIG $FAST algo.advantages=dense algo.gae_lambda=0.0
train 0 ddpo stitchvm ddpo_gn_dense0_kl0.01 $DBIG algo.advantages=dense algo.gae_lambda=0.0 algo.kl_beta=0.01
wait
report
