#!/usr/bin/env bash
# Session 17's GPU calls for issue #6 (PAIR=all, early and reg ran; results in docs/bench/trainers_session17.md, records
# docs/bench/s17{a,b,c}_*.jsonl.gz). PAIR=all: GRPO on a whole-trajectory SDE, where the critic's dense credit cuts
# the policy-gradient variance, at the Fast window's cost.
# Session 16 (docs/bench/trainers_session16.md): at the Fast window (a 2-step SDE window at sigma 0.71-0.96) the
# calibrated critic's slope is .015 and the dense runs train as sparse ones (four seeds each: GRPO +0.134, DDPO +0.130
# on average, against +0.15). On a whole-trajectory SDE the CPU variance study (pg_variance_session16_cpu.json) finds
# lambda 1 with the global scale and the batch calibration 4-7x less variable than sparse credit (3-7x on the 2 steps
# trained, benchmarks/pg_variance_trained.py), with stitchvm and the experts alike; the group_step scale cuts nothing.
# The runs add configs/experiments/whole_trajectory_grpo.yaml; the twins also algo.advantages=sparse
# algo.values_at=stochastic. algo.values_at=trained draws each group's 2 trained
# steps of 10 (timestep_fraction 0.2) before the value pass, so the critic is asked at 2 latents per sample, as in a
# Fast window, and the update trains 2 steps per sample, as Fast does.
# A prior against it: session 3's whole-trajectory dense GRPO (critic at every latent, no group noise, before the Fast
# settings) trained no better than sparse despite the same variance cut (0.426 vs 0.459, docs/bench/trainers_history.md).
# One difference besides the credit: the dense runs train each group's 2 steps (values_at: trained draws per group, so
# that each latent is centred and calibrated within groups); the sparse twins, Flow-GRPO's, draw 2 per sample.
#   PAIR=all (four GPUs): seeds 0 and 1 of {dense stitchvm, its sparse twin (--critic terminal)}
#   PAIR=x (two GPUs): seeds 0 and 1 with --critic stitchvm_experts
#   PAIR=d (two GPUs): DDPO-Fast's config on the whole-trajectory SDE, dense stitchvm against its sparse twin, seed 0
#          (replay on docs/bench/s13b_ddpo_fast_kl0.01.jsonl.gz's clock)
#   PAIR=xd (four GPUs): PAIR=x and PAIR=d in one call
#   PAIR=s23 (four GPUs): seeds 2 and 3 of PAIR=all
#   PAIR=reg (four GPUs): GRPO-Fast as shipped, seeds 0 and 1, with a slower EMA (0.995: the plateau's held-out
#          swings of +-0.04 between evaluations averaged over ~70 epochs) or LoRA rank 8 (alpha 16, same scale)
#   (the CFG runs prepared here moved to benchmarks/gpu_session18_a.sh)
#   PAIR=early (four GPUs): after PAIR=all (the whole trajectory trained worse than the Fast window, with either credit),
#          the shipped Fast configs with the window moved the other way, to start at U{0..2} (sigma 0.8-0.96 instead
#          of 0.71-0.96): GRPO and DDPO, seeds 0 and 1 (shipped window: GRPO .537 / .510, DDPO .559 / .521)
# Replay an H200 run at the H100's epochs:
#   benchmarks/compare_runs.py RUN --clock RUN=docs/bench/s13b_grpo_fast_kl0.01.jsonl.gz
# (an H100 run of the Fast config: same work per epoch here, 2 trained steps and 2 values per sample)
#   PAIR=all bash benchmarks/gpu_session17_a.sh OUT
set -u
OUT=${1:?out}; MINUTES=${MINUTES:-8.5}; source benchmarks/session3_lib.sh
K="--config configs/experiments/keep_best.yaml run.ckpt_every=100000"
SDE=(--config configs/experiments/whole_trajectory_grpo.yaml)  # dense credit, values_at: trained (its header)
TWIN=(algo.advantages=sparse algo.values_at=stochastic)  # the sparse twin on the same whole-trajectory SDE
NAMES=""
# seeds01 GPU ALGO CRITIC NAME [overrides...]: NAME with seed 0 on GPU and NAME_s1 with seed 1 on GPU + 1
seeds01() {
  local g=$1 a=$2 c=$3 n=$4; shift 4
  train $g $a $c $n $K "$@"; train $((g + 1)) $a $c ${n}_s1 $K "$@" run.seed=1
  NAMES="$NAMES $n ${n}_s1"
}
case ${PAIR:-all} in
  all) train 0 grpo stitchvm grpo_sde $K "${SDE[@]}"
       train 1 grpo terminal grpo_sde_terminal $K "${SDE[@]}" "${TWIN[@]}"
       train 2 grpo stitchvm grpo_sde_s1 $K "${SDE[@]}" run.seed=1
       train 3 grpo terminal grpo_sde_terminal_s1 $K "${SDE[@]}" "${TWIN[@]}" run.seed=1
       NAMES="grpo_sde grpo_sde_terminal grpo_sde_s1 grpo_sde_terminal_s1";;
  x) seeds01 0 grpo stitchvm_experts grpo_sde_experts "${SDE[@]}";;
  d) train 0 ddpo stitchvm ddpo_sde $K "${SDE[@]}"
     train 1 ddpo terminal ddpo_sde_terminal $K "${SDE[@]}" "${TWIN[@]}"
     NAMES="ddpo_sde ddpo_sde_terminal";;
  xd) seeds01 0 grpo stitchvm_experts grpo_sde_experts "${SDE[@]}"
      train 2 ddpo stitchvm ddpo_sde $K "${SDE[@]}"
      train 3 ddpo terminal ddpo_sde_terminal $K "${SDE[@]}" "${TWIN[@]}"
      NAMES="$NAMES ddpo_sde ddpo_sde_terminal";;
  s23) train 0 grpo stitchvm grpo_sde_s2 $K "${SDE[@]}" run.seed=2
       train 1 grpo terminal grpo_sde_terminal_s2 $K "${SDE[@]}" "${TWIN[@]}" run.seed=2
       train 2 grpo stitchvm grpo_sde_s3 $K "${SDE[@]}" run.seed=3
       train 3 grpo terminal grpo_sde_terminal_s3 $K "${SDE[@]}" "${TWIN[@]}" run.seed=3
       NAMES="grpo_sde_s2 grpo_sde_terminal_s2 grpo_sde_s3 grpo_sde_terminal_s3";;
  early) seeds01 0 grpo stitchvm grpo_early "algo.sde_window_start=[0,2]"
         seeds01 2 ddpo stitchvm ddpo_early "algo.sde_window_start=[0,2]";;
  reg) seeds01 0 grpo stitchvm grpo_ema995 algo.ema_decay=0.995
       seeds01 2 grpo stitchvm grpo_r8 algo.lora_rank=8 algo.lora_alpha=16;;
  *) echo "error: PAIR must be all, x, d, xd, s23, early or reg, got '$PAIR'" >&2; exit 2;;
esac
end_call 17 $NAMES
