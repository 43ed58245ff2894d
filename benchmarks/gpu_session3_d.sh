#!/usr/bin/env bash
# Session-3 GPU calls D and E (one GPU each): the CPU main job's settings swept on a GPU — the same 64-sample epochs
# and about the epoch count a 2-core CPU fits in 10 minutes, evaluated on 512 held-out prompts (the CPU's
# 128-prompt evaluation has a ±0.04 standard error, larger than the +0.05 target).
#   EPOCHS=50 EVAL_EVERY=15 GMIN=5 bash benchmarks/gpu_session3_d.sh OUT sweep   # call D: settings, plus GRPO with a
#                                  larger step and DDPO with a prompt pool small enough for per-prompt statistics
#   EPOCHS=50 bash benchmarks/gpu_session3_d.sh OUT seeds                        # call E: seeds
set -u
OUT=${1:?out}; source benchmarks/session3_lib.sh
case ${2:?sweep or seeds} in
  sweep)
    cpu cpu_default
    cpu cpu_nocrn algo.group_noise=false
    cpu cpu_lr3e-4 algo.lr=3e-4
    cpu cpu_lr3e-4_kl0 algo.lr=3e-4 algo.kl_beta=0
    cpu cpu_lr2e-4_tb64 algo.lr=2e-4 algo.train_batch_size=64
    cpu cpu_p16g4 algo.prompts_per_epoch=16 algo.group_size=4
    cpu cpu_terminal --critic terminal
    M=${GMIN:-5}
    train 0 grpo stitchvm grpo_lr1e-3 algo.lr=1e-3 algo.kl_beta=0.01 algo.gae_lambda=1.0
    train 0 ddpo stitchvm ddpo_pool256 prompts.train.n=256 algo.gae_lambda=1.0 ;;
  seeds)
    P="algo.prompts_per_epoch=16 algo.group_size=4"
    for s in 0 1 2; do cpu p16g4_lr3e-4_s$s $P algo.lr=3e-4 run.seed=$s; done
    for s in 1 2; do cpu p16g4_lr1e-4_s$s $P run.seed=$s; done
    cpu p16g4_lr2e-4_s0 $P algo.lr=2e-4
    cpu default_s1 run.seed=1
    cpu p16g4_lr3e-4_tf0.9_s0 $P algo.lr=3e-4 algo.timestep_fraction=0.9 ;;
  *) echo "second argument: sweep or seeds" >&2; exit 2 ;;
esac
wait
report
