#!/usr/bin/env bash
# Session-6 GPU call for issue #4: which noise-level law for stage 2, with all six CLIP blocks trained ((7, 1))?
# Call B found that a low-sigma specialist ranks better at every sigma up to 0.5 than the uniform law. Three builds
# at once (4000 steps), sigma = sigmoid(N(m, 0.8)) for m = -1.4, -0.8, -0.3 (medians 0.20, 0.31, 0.43), then the
# value benchmark on validation (seed 1) and test (seed 0) prompts, with PREV=DIR an earlier build alongside.
#   PREV=.s6/low_7_1 bash benchmarks/gpu_session6_critic_c.sh OUT
set -u
OUT=${1:?out}; source benchmarks/session6_critic_lib.sh
S=${STEPS:-4000}
for m in -1.4 -0.8 -0.3; do
  build ln$(echo $m | tr -d '.-') distill.max_steps=$S distill.sigma_sampling=logit_normal distill.sigma_mean=$m \
    distill.sigma_std=0.8 'search.pinned=[7,1]'
done
wait
bench "ln14 ln08 ln03" ${PREV:+--variant prev=$PREV}
