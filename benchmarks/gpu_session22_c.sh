#!/usr/bin/env bash
# Session 22, third call (docs/critic.md, "Session 22"): the value benchmark of the shipped critics after the 10000-step
# low-sigma expert (call B's L10k) replaced shapes/weights/stitchvm_prompt_low, on 512 validation (seed 1, card 1) and
# 512 test (seed 0, card 0) prompts, K = 8, sigma 0.1-0.9, with stitchvm_experts_denoised at other settings
# (critics.bench_value --variant NAME=denoised[sigma_in=S,noise_draws=K]:DIR): sigma_in 0.05 / 0.1 / 0.15, one or
# four re-noisings averaged. (Run before the shipped config took the knots and four draws: rerun now,
# stitchvm_experts_denoised is the knots' critic, not sigma_in 0.15 with one draw.)
#   bash benchmarks/gpu_session22_c.sh OUT            (two cards)
set -u
OUT=${1:?out}; source benchmarks/critic_call_lib.sh
LOW=shapes/weights/stitchvm_prompt_low
BENCH_EXTRA="--critics tweedie,stitchvm_experts_denoised"
for v in dn15x4=sigma_in=0.15,noise_draws=4 dn10=sigma_in=0.1,noise_draws=1 dn10x4=sigma_in=0.1,noise_draws=4 \
         dn05=sigma_in=0.05,noise_draws=1 dn05x4=sigma_in=0.05,noise_draws=4; do BENCH_EXTRA+=" --variant ${v%%=*}=denoised[${v#*=}]:$LOW"; done
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
BENCH_S=${BENCH_S:-400} bench
wait
bench_report
pack
