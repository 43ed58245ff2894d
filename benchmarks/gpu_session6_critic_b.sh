#!/usr/bin/env bash
# Session-6 GPU call for issue #4, diagnostic: is the StitchVM's imprecise fit at low sigma a capacity trade-off
# across noise levels or a limit of the head's features? Three stage-2 builds at once (3000 steps): a low-sigma
# specialist (sigma = sigmoid(N(-2.2, 0.6)), mostly 0.04-0.25) at (7, 4) and at (7, 1) (all six CLIP blocks
# trained), and the full DiT (8 of 8 blocks) as head at sigma ~ U[0, 1]; then rho vs V_MC at sigma 0.1 / 0.5 on
# validation prompts.
#   bash benchmarks/gpu_session6_critic_b.sh OUT
set -u
OUT=${1:?out}; source benchmarks/session6_critic_lib.sh
S=${STEPS:-3000}
LOW="distill.sigma_sampling=logit_normal distill.sigma_mean=-2.2 distill.sigma_std=0.6"
build low_7_4 distill.max_steps=$S $LOW 'search.pinned=[7,4]'
build low_7_1 distill.max_steps=$S $LOW 'search.pinned=[7,1]'
build full_8_4 distill.max_steps=$S 'search.pinned=[8,4]'
wait
VAL_ONLY=1 RETRIEVAL=0 bench "low_7_4 low_7_1 full_8_4" --sigmas 0.1,0.25,0.5
