#!/usr/bin/env bash
# Session-11 GPU call for issue #4 (written in session 10, not run then; the blend band added in session 11) on four
# H100s (nvidia-h100-x4): four critic builds at once, one per card, then the value benchmark (512 prompts, sigma
# 0.1 / 0.25 / 0.5 / 0.75, validation prompts (seed 1), then test (seed 0)).
#   GPU 0: the low-sigma prompt expert's recipe (shapes/weights/stitchvm_prompt_low/build.json) with a 3x larger bank
#          of policy samples (98304; each seen ~2.6x in 4000 steps instead of ~8x), student from E(D(z0)) (as shipped)
#   GPU 1: the same with policy_samples.student_latents=own (the student starts from the policy's own z0)
#   GPU 2: stage 3 (on-policy value regression, critics/onpolicy.py) from the shipped low-sigma expert, noise levels
#          U(0, 0.5) (the ones it serves), run to the end of a 600-step schedule (sessions 2 and 6 stopped it halfway)
#   GPU 3: the uniform prompt expert's recipe (shapes/weights/stitchvm_prompt) with the 98304 bank
# While GPU 0 runs the value benchmark, GPU 1 measures the mean of the two shipped prompt experts at sigma 0.4 / 0.5 / 0.6
# (benchmarks/expert_blend.py; session 10 measured 0.5 only, on the CPU), the band a blend would serve.
# Run in session 11 with BUILD_S=320: the three stage-2 builds stopped near step 2500 of 4000 (the sample bank took 64 s,
# and 4000 steps took 359 s for the shipped build), so they were benchmarked from a checkpoint; only stage 3 finished.
# A build to its end needs BUILD_S ~480, which leaves no time in one call for the benchmark after it.
#   bash benchmarks/gpu_session11_c.sh OUT
set -u
OUT=${1:?out}; source benchmarks/critic_call_lib.sh  # crit GPU NAME overrides..., pack NAMES
LOW="distill.sigma_sampling=logit_normal distill.sigma_mean=-2.2 distill.sigma_std=0.6"
crit 0 low_bank98k $LOW &
crit 1 low_bank98k_own $LOW policy_samples.student_latents=own &
crit 2 low_stage3 init_from=shapes/weights/stitchvm_prompt_low onpolicy.enabled=true onpolicy.steps=600 \
  'onpolicy.sigma_range=[0.0,0.5]' &
crit 3 unif_bank98k distill.sigma_sampling=uniform &
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
wait
grep -h "policy samples\|build:save\|step 4000\|step 600\|rror" $OUT/log/*.txt
V=(python -m critics.bench_value --device cuda --n-prompts 512 --batch-size 512 --sigmas 0.1,0.25,0.5,0.75
   --critics tweedie --variant prompt_low=shapes/weights/stitchvm_prompt_low
   --variant prompt_unif=shapes/weights/stitchvm_prompt --retrieval-images 0 --out "")
for n in low_bank98k low_bank98k_own low_stage3 unif_bank98k; do
  [ -f $OUT/$n/stitchvm.json ] && V+=(--variant $n=$OUT/$n); done
CUDA_VISIBLE_DEVICES=1 timeout ${BLEND_S:-200} python benchmarks/expert_blend.py --device cuda --batch-size 512 \
  --sigmas 0.4,0.5,0.6 > $OUT/blend.md 2> $OUT/log/blend.err &
export CUDA_VISIBLE_DEVICES=0
for seed in 1 0; do
  timeout ${BENCH_S:-90} "${V[@]}" --prompt-seed $seed --json $OUT/bench_seed$seed.json > $OUT/bench_seed$seed.md \
    2>$OUT/log/bench_seed$seed.err
  echo "== bench prompt seed $seed"; cat $OUT/bench_seed$seed.md; tail -2 $OUT/log/bench_seed$seed.err
done
wait; echo "== blend"; cat $OUT/blend.md; tail -2 $OUT/log/blend.err
pack low_bank98k low_bank98k_own low_stage3 unif_bank98k  # (added after the session-11 run: its builds were lost)
