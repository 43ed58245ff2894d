#!/usr/bin/env bash
# Session 22, fourth call (docs/critic.md, "Session 22"): with sigma_in <= 0.15 the denoised experts' low expert only
# ever values latents at sigma <= 0.15, so its stage-2 sigma law can be narrowed to that band. Two 5000-step builds of
# the session-21 recipe (teacher decoded, own latents, 4 stitch blocks, 75 % of a 98304-sample bank), one per card:
#   GPU 0: logit-normal(-2.9, 0.5) (median sigma 0.052)      GPU 1: logit-normal(-2.6, 0.5) (median 0.069)
# against the shipped law logit-normal(-2.2, 0.6) (median 0.10); then critics.bench_value at sigma 0.1-0.5 on 512
# validation (seed 1) and 512 test (seed 0) prompts, K = 8: each build as itself and in stitchvm_experts_denoised at
# sigma_in 0.15 (NAME_dn), 0.1 with four re-noisings (NAME_dn10x4) and 0.05 (NAME_dn05).
#   bash benchmarks/gpu_session22_d.sh OUT            (two cards)
set -u
OUT=${1:?out}; BUILD_S=${BUILD_S:-450}; BANK=98304; WORKERS=12; LOG_EVERY=1000; source benchmarks/critic_call_lib.sh
SHIP="distill.teacher_input=decoded policy_samples.student_latents=own stitch_blocks=4 policy_samples.fraction=0.75
      distill.max_steps=5000 distill.sigma_sampling=logit_normal distill.sigma_std=0.5"
crit 0 law29 $SHIP distill.sigma_mean=-2.9 & crit 1 law26 $SHIP distill.sigma_mean=-2.6 &
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
wait
grep -h "build:save\|step 5000\|rror" "$OUT"/log/*.txt
BENCH_EXTRA="--critics tweedie,stitchvm_experts_denoised"
for n in law29 law26; do
  for v in dn=sigma_in=0.15,noise_draws=1 dn10x4=sigma_in=0.1,noise_draws=4 dn05=sigma_in=0.05,noise_draws=1; do
    [ -f $OUT/$n/stitchvm.json ] && BENCH_EXTRA+=" --variant ${n}_${v%%=*}=denoised[${v#*=}]:$OUT/$n"; done
done
SIGMAS=0.1,0.25,0.5 BENCH_S=${BENCH_S:-120} bench law29 law26
wait
bench_report
pack law29 law26
