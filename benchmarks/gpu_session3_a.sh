#!/usr/bin/env bash
# Session-3 GPU call A (4 GPUs of one host): issue #6 figures and one issue-#4 critic experiment.
#   GPU g in 0..2: trainer T_g with --critic stitchvm and with --critic terminal side by side (same contention, so
#   the wall-clock comparison at equal reward is fair; each has half a GPU, so "+0.15 within 10 minutes on one GPU"
#   measured here is a lower bound). GPU 3: rl.bench_trainers (dense-vs-sparse gradient variance, co-training),
#   and a stage-2 critic rebuild with a low-sigma-weighted sigma law, benchmarked on validation prompts.
set -u
OUT=${1:?out}; source benchmarks/session3_lib.sh
train 0 grpo stitchvm grpo_stitchvm algo.advantages=dense algo.gae_lambda=${GRPO_LAMBDA:-1.0}
train 0 grpo terminal grpo_terminal algo.advantages=sparse
train 1 ddpo stitchvm ddpo_stitchvm algo.advantages=dense algo.gae_lambda=${DDPO_LAMBDA:-1.0}
train 1 ddpo terminal ddpo_terminal algo.advantages=sparse
train 2 draft stitchvm draft_stitchvm algo.ema_decay=0.99
train 2 draft terminal draft_terminal algo.ema_decay=0.99
( CUDA_VISIBLE_DEVICES=3 OMP_NUM_THREADS=4 timeout 560 python -m rl.bench_trainers --sections dense cotrain \
    --algos grpo --minutes 1.1 --variance-samples 64 --config configs/experiments/shapes_gpu_grpo.yaml \
    --out $OUT/bt run.export_lora=false > $OUT/log/bench_trainers.txt 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=3 OMP_NUM_THREADS=4
  timeout 400 python -m critics.build --config configs/critic/build_shapes.yaml device=cuda heatmap=null \
    onpolicy.enabled=false num_workers=6 'search.pinned=[7,4]' 'search.i_values=[7]' distill.progress=false \
    distill.sigma_sampling=logit_normal distill.sigma_mean=-0.7 distill.sigma_std=1.2 output_dir=$OUT/crit_lowsig \
    > $OUT/log/crit_lowsig.txt 2>&1
  timeout 110 python -m critics.bench_value --device cuda --prompt-seed 1 --critics stitchvm,tweedie \
    --stitchvm $OUT/crit_lowsig --retrieval-images 512 --out $OUT/crit_lowsig/bench_val.png \
    > $OUT/log/crit_lowsig_bench_val.txt 2>&1 ) &
wait
for f in $OUT/log/*.txt; do echo "== $f"; tail -n 3 $f | cut -c1-400; done
