#!/usr/bin/env bash
# Session-6 GPU call for issue #4: stage 3 (on-policy value regression onto realised rewards, critics/onpolicy.py)
# from the best stage-2 build of call D (INIT, low-sigma law + policy samples, (7, 1)), with the inserted noise levels
# kept in U(0, 0.6), at lambda_value 1 and 4; then the value benchmark on validation (seed 1) and test (seed 0) prompts.
#   INIT=.s6/ps_low bash benchmarks/gpu_session6_critic_e.sh OUT
set -u
OUT=${1:?out}; source benchmarks/session6_critic_lib.sh
INIT=${INIT:?a stage-2 critic directory}; S=${STEPS:-1500}
S3="init_from=$INIT onpolicy.enabled=true onpolicy.steps=$S onpolicy.sigma_range=[0.0,0.6]"
build s3_v1 $S3 onpolicy.lambda_value=1.0
build s3_v4 $S3 onpolicy.lambda_value=4.0
wait
bench "s3_v1 s3_v4" --variant init=$INIT
