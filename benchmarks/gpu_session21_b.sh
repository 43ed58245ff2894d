#!/usr/bin/env bash
# Session 21, second call (docs/critic.md, "Session 21"): call A's best build (teacher decoded, the bank's own latents,
# stitch_blocks 4) with more of the serving domain in stage 2, one build per card:
#   GPU 0: policy_samples.fraction 0.75          GPU 1: a bank of 98304 policy samples (3x)
#   GPU 2: both                                  GPU 3: both, and stitch_blocks 6
# then critics.bench_value as call A (each build as itself and as the denoised experts' low expert, "NAME_dn").
#   bash benchmarks/gpu_session21_b.sh OUT
set -u
OUT=${1:?out}; BUILD_S=${BUILD_S:-420}; BANK=32768; WORKERS=12; LOG_EVERY=500; source benchmarks/critic_call_lib.sh
DEC="distill.sigma_sampling=logit_normal distill.sigma_mean=-2.2 distill.sigma_std=0.6 distill.teacher_input=decoded policy_samples.student_latents=own"
crit 0 f75 $DEC stitch_blocks=4 policy_samples.fraction=0.75 &
crit 1 bank3 $DEC stitch_blocks=4 policy_samples.n=98304 &
crit 2 f75_bank3 $DEC stitch_blocks=4 policy_samples.fraction=0.75 policy_samples.n=98304 &
crit 3 f75_bank3_b6 $DEC stitch_blocks=6 policy_samples.fraction=0.75 policy_samples.n=98304 &
NAMES="f75 bank3 f75_bank3 f75_bank3_b6"
DENOISED=1 DENOISED_SPEC='denoised[sigma_in=0.15,noise_draws=1]' BENCH_S=${BENCH_S:-240} end_builds $NAMES  # the settings shipped then
