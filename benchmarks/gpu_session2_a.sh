#!/usr/bin/env bash
# Session-2 GPU call A (one GPU, concurrent): GRPO/DDPO/DRaFT + stitchvm (issue #6), two stage-2 critic rebuilds with a
# wider stitch bottleneck (issue #4), then the value benchmark of those and the Shapes steering demo (issue #7).
set -u
OUT=${1:?out}; mkdir -p $OUT/runs $OUT/c $OUT/log $OUT/steer
M=${MINUTES:-9}
for a in grpo ddpo draft; do
  python rl/train.py --algo $a --critic stitchvm --config configs/experiments/shapes_gpu_$a.yaml \
    run.output_dir=$OUT/runs/${a}_stitchvm run.max_minutes=$M run.export_lora=false > $OUT/log/${a}_stitchvm.txt 2>&1 &
done
B="python -m critics.build --config configs/critic/build_shapes.yaml device=cuda heatmap=null onpolicy.enabled=false num_workers=4 search.pinned=[7,4] search.i_values=[7] distill.progress=false"
( timeout 420 $B bottleneck_ratio=1 output_dir=$OUT/c/R1 > $OUT/log/R1.txt 2>&1
  for s in 1 0; do timeout 100 python -m critics.bench_value --device cuda --prompt-seed $s --critics stitchvm,tweedie --stitchvm $OUT/c/R1 --retrieval-images 512 --out $OUT/c/bench_R1_seed$s.png > $OUT/log/bench_R1_seed$s.txt 2>&1; done ) &
( timeout 420 $B bottleneck_ratio=2 output_dir=$OUT/c/R2 > $OUT/log/R2.txt 2>&1
  for s in 1 0; do timeout 100 python -m critics.bench_value --device cuda --prompt-seed $s --critics stitchvm,tweedie --stitchvm $OUT/c/R2 --retrieval-images 512 --out $OUT/c/bench_R2_seed$s.png > $OUT/log/bench_R2_seed$s.txt 2>&1; done ) &
( for m in none dps fk; do for c in stitchvm tweedie; do
    [ $m = none ] && [ $c = tweedie ] && continue
    timeout 120 python -m rl.steer --method $m --critic $c --n 256 --prompts test --device cuda --out $OUT/steer/${m}_$c > $OUT/log/steer_${m}_$c.txt 2>&1
  done; done ) &
wait
for f in $OUT/log/*.txt; do echo "== $f"; tail -n 4 $f; done
