#!/usr/bin/env bash
# Session-7 GPU call for issue #4: a prompt-conditioned StitchVM head (head_conditioning=prompt: the DiT head runs on
# each image's caption / each policy sample's prompt, 10 % dropped to ""), (7, 1), train-split renders + the policy's
# samples on train prompts, at three noise-level laws; then the value benchmark on validation (seed 1) and test
# (seed 0) prompts against the shipped StitchVM, its low-sigma expert and Tweedie.
#   bash benchmarks/gpu_session7_critic_b.sh OUT
# It compares with session 6's low-sigma expert shapes/weights/stitchvm_low, retired in session 7: restore it first
# with `git checkout 68a9538 -- shapes/weights/stitchvm_low`.
set -u
OUT=${1:?out}; source benchmarks/session6_critic_lib.sh
S=${STEPS:-4000}
PS="head_conditioning=prompt distill.max_steps=$S policy_samples.n=32768 policy_samples.batch_size=1024 search.pinned=[7,1]"
PSP='policy_samples.prompts={_component_: shapes.data.prompts, split: train, n: 65536, seed: 5}'
build pr_low $PS "$PSP" distill.sigma_sampling=logit_normal distill.sigma_mean=-2.2 distill.sigma_std=0.6
build pr_ln14 $PS "$PSP" distill.sigma_sampling=logit_normal distill.sigma_mean=-1.4 distill.sigma_std=0.8
build pr_unif $PS "$PSP" distill.sigma_sampling=uniform
wait
bench "pr_low pr_ln14 pr_unif" --variant low=shapes/weights/stitchvm_low
