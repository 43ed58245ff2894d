#!/usr/bin/env bash
# Session-7 GPU call for issue #4: stage 2 on the Shapes CLIP's own image mix (shapes.data.ShapesMixture, 70 % train-
# and 30 % test-split renders: the reward knows the held-out colour-shape pairs, so its student should too) plus the
# policy's samples on train prompts, (7, 1), at three noise-level laws; then the value benchmark on validation
# (seed 1) and test (seed 0) prompts against the shipped StitchVM, its low-sigma expert and Tweedie.
#   bash benchmarks/gpu_session7_critic.sh OUT
# It compares with session 6's low-sigma expert shapes/weights/stitchvm_low, retired in session 7: restore it first
# with `git checkout 68a9538 -- shapes/weights/stitchvm_low`.
set -u
OUT=${1:?out}; source benchmarks/session6_critic_lib.sh
S=${STEPS:-4000}
MIX='data={_component_: shapes.data.ShapesMixture, splits: {train: 0.7, test: 0.3}, num_samples: 1048576, seed: 7}'
PS="distill.max_steps=$S policy_samples.n=32768 policy_samples.batch_size=1024 search.pinned=[7,1]"
PSP='policy_samples.prompts={_component_: shapes.data.prompts, split: train, n: 65536, seed: 5}'
build mix_low "$MIX" $PS "$PSP" distill.sigma_sampling=logit_normal distill.sigma_mean=-2.2 distill.sigma_std=0.6
build mix_ln14 "$MIX" $PS "$PSP" distill.sigma_sampling=logit_normal distill.sigma_mean=-1.4 distill.sigma_std=0.8
build mix_unif "$MIX" $PS "$PSP" distill.sigma_sampling=uniform
wait
bench "mix_low mix_ln14 mix_unif" --variant low=shapes/weights/stitchvm_low
