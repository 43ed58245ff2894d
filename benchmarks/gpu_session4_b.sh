#!/usr/bin/env bash
# Session-4 GPU call B (one GPU, three runs sharing it): Flow-GRPO-Fast on the checker reward — stochastic steps only
# in a 2-step window early in the trajectory, the rest ODE, so the rollouts the update trains on are near the ODE
# sampler the evaluation uses, and the update trains 2 steps instead of 6 (more epochs in the budget).
#   bash benchmarks/gpu_session4_b.sh OUT
set -u
OUT=${1:?out}; source benchmarks/session3_lib.sh
M=${MINUTES:-8.5}
FAST="algo.sde_window=2 algo.sde_window_start=[0,4] algo.timestep_fraction=1.0"
train 0 grpo stitchvm_checker grpo_chk_fast_dense $FAST algo.advantages=dense algo.gae_lambda=1.0
train 0 grpo terminal grpo_chk_fast_terminal $FAST algo.advantages=sparse
train 0 grpo stitchvm_checker grpo_chk_fast_dense_g16 $FAST algo.advantages=dense algo.gae_lambda=1.0 \
  algo.prompts_per_epoch=16 algo.group_size=16
wait
report
