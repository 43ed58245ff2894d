#!/usr/bin/env bash
# Session 21, issue #4 (docs/critic.md, "Session 21"): a teacher that scores D(z0), the image of the student's own
# clean latent (distill.teacher_input=decoded), in the shipped low-sigma expert's recipe (prompt head, (7, 1),
# logit-normal(-2.2, 0.6), stitch_blocks 2, a 32768-sample bank, 4000 steps), one build per card:
#   GPU 0: teacher decoded, the bank's rows from E(D(z0))          GPU 1: teacher decoded, the bank's own latents z0
#   GPU 2: teacher decoded, own latents, stitch_blocks 4           GPU 3: control: the shipped recipe, rebuilt
# then critics.bench_value on 512 validation (seed 1) and 512 test (seed 0) prompts, K = 8: each build as itself and
# as the low expert of stitchvm_experts_denoised ("NAME_dn"), against the shipped ones and Tweedie.
#   bash benchmarks/gpu_session21_a.sh OUT
set -u
OUT=${1:?out}; BUILD_S=${BUILD_S:-380}; BANK=32768; WORKERS=12; LOG_EVERY=500; source benchmarks/critic_call_lib.sh
LOW="distill.sigma_sampling=logit_normal distill.sigma_mean=-2.2 distill.sigma_std=0.6"
crit 0 dec_enc $LOW stitch_blocks=2 distill.teacher_input=decoded &
crit 1 dec_own $LOW stitch_blocks=2 distill.teacher_input=decoded policy_samples.student_latents=own &
crit 2 dec_own_b4 $LOW stitch_blocks=4 distill.teacher_input=decoded policy_samples.student_latents=own &
crit 3 control $LOW stitch_blocks=2 &
NAMES="dec_enc dec_own dec_own_b4 control"
DENOISED=1 DENOISED_SPEC='denoised[sigma_in=0.15,noise_draws=1]' BENCH_S=${BENCH_S:-240} end_builds $NAMES  # the settings shipped then
