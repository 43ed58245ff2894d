#!/usr/bin/env bash
# Session-6 GPU call for issue #4: three stage-2 builds with the caption-score term (critics/distill.py,
# distill.lambda_score) on one GPU at once, then the value benchmark of the three against the shipped StitchVM and
# Tweedie on validation prompts (--prompt-seed 1) and, time permitting, on the reported test prompts (seed 0).
#   bash benchmarks/gpu_session6_critic.sh OUT
set -u
OUT=${1:?out}; source benchmarks/session6_critic_lib.sh
S=${STEPS:-3000}
CAP='score_captions={_component_: shapes.data.prompts, split: train, n: 8192, seed: 11}'
build score1 distill.max_steps=$S "$CAP" distill.lambda_score=1 'search.pinned=[7,4]'
build score4 distill.max_steps=$S "$CAP" distill.lambda_score=4 'search.pinned=[7,4]'
build score4_j1 distill.max_steps=$S "$CAP" distill.lambda_score=4 'search.pinned=[7,1]'
wait
bench "score1 score4 score4_j1"
