#!/usr/bin/env bash
# Session-6 GPU call for issue #4: stage 2 on the policy's own samples as well as renders (policy_samples, half of
# every batch: 32768 decoded samples of train-split prompts, CFG 1 / 4.5, ODE / SDE eta 0.7), (7, 1), 4000 steps, at
# three noise-level laws; then the value benchmark on validation (seed 1) and test (seed 0) prompts.
#   bash benchmarks/gpu_session6_critic_d.sh OUT
set -u
OUT=${1:?out}; source benchmarks/session6_critic_lib.sh
S=${STEPS:-4000}
PS="distill.max_steps=$S policy_samples.n=32768 policy_samples.batch_size=1024 search.pinned=[7,1]"
PSP='policy_samples.prompts={_component_: shapes.data.prompts, split: train, n: 65536, seed: 5}'
build ps_low $PS "$PSP" distill.sigma_sampling=logit_normal distill.sigma_mean=-2.2 distill.sigma_std=0.6
build ps_ln14 $PS "$PSP" distill.sigma_sampling=logit_normal distill.sigma_mean=-1.4 distill.sigma_std=0.8
build ps_unif $PS "$PSP" distill.sigma_sampling=uniform
wait
bench "ps_low ps_ln14 ps_unif"
