#!/usr/bin/env bash
# Stage-3 (on-policy) variants of the shipped Shapes critics, built in parallel on one GPU, then the value benchmark
# on validation prompts (selection) and on the held-out test prompts (report). Usage: bash benchmarks/gpu_critic_stage3.sh OUT
set -u
OUT=${1:?out dir}; mkdir -p "$OUT/c" "$OUT/log"
B="python -m critics.build --config configs/critic/build_shapes.yaml device=cuda heatmap=null onpolicy.steps=${STEPS:-2000} onpolicy.ckpt_every=250 onpolicy.progress=false"
T=${BUILD_TIMEOUT:-380}
timeout $T $B init_from=shapes/weights/stitchvm output_dir=$OUT/c/A > $OUT/log/A.txt 2>&1 &
timeout $T $B init_from=shapes/weights/stitchvm output_dir=$OUT/c/B onpolicy.lr=3e-4 onpolicy.lambda_tok=0 > $OUT/log/B.txt 2>&1 &
timeout $T $B init_from=shapes/weights/stitchvm output_dir=$OUT/c/C onpolicy.lambda_value=4 > $OUT/log/C.txt 2>&1 &
timeout $T $B init_from=shapes/weights/vae_stitch kind=vae_stitch output_dir=$OUT/c/D > $OUT/log/D.txt 2>&1 &
wait
for v in A B C; do
  for seed in 1 0; do
    timeout 150 python -m critics.bench_value --device cuda --prompt-seed $seed --stitchvm $OUT/c/$v --vae-stitch $OUT/c/D \
      --out $OUT/c/bench_${v}_seed$seed.png > $OUT/log/bench_${v}_seed$seed.txt 2>&1 &
  done
done
wait
tail -n 40 $OUT/log/*.txt
