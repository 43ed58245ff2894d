#!/usr/bin/env bash
# Session-5 GPU call B (4 x H100, two runs per GPU): GRPO / DDPO with shared initial noise within each group
# (algo.group_noise, DanceGRPO): rewards within a group then differ only through the SDE steps, the actions the
# policy gradient credits. Large epochs as call A (benchmarks/gpu_session5_a.sh); CLIP reward; start 0.377.
#   bash benchmarks/gpu_session5_b.sh OUT
set -u
OUT=${1:?out}; source benchmarks/session3_lib.sh
M=${MINUTES:-8}
BIG="algo.prompts_per_epoch=64 algo.group_size=16 algo.rollout_batch_size=1024 algo.train_batch_size=512 algo.value_batch_size=1024 algo.group_noise=true"
DBIG="algo.prompts_per_epoch=128 algo.group_size=8 algo.rollout_batch_size=1024 algo.train_batch_size=512 algo.value_batch_size=1024 algo.group_noise=true algo.kl_beta=0.04"
FULL="algo.sde_window=0 algo.timestep_fraction=0.6"
FAST="algo.sde_window=2 algo.sde_window_start=[0,4] algo.timestep_fraction=1.0"
train 0 grpo stitchvm grpo_gn_dense $BIG $FULL algo.advantages=dense algo.gae_lambda=1.0
train 0 grpo terminal grpo_gn_sparse $BIG $FULL algo.advantages=sparse
train 1 grpo stitchvm grpo_gn_fast_dense $BIG $FAST algo.advantages=dense algo.gae_lambda=1.0
train 1 grpo terminal grpo_gn_fast_sparse $BIG $FAST algo.advantages=sparse
train 2 ddpo stitchvm ddpo_gn_dense $DBIG algo.advantages=dense algo.gae_lambda=1.0
train 2 ddpo terminal ddpo_gn_sparse $DBIG algo.advantages=sparse
train 3 grpo stitchvm grpo_gn_dense0 $BIG $FULL algo.advantages=dense algo.gae_lambda=0.0
train 3 ddpo stitchvm ddpo_gn_dense0 $DBIG algo.advantages=dense algo.gae_lambda=0.0
wait
report
