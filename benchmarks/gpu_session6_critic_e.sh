#!/usr/bin/env bash
# Session-6 GPU call for issue #4: stage 3 (on-policy value regression onto realised rewards, critics/onpolicy.py)
# from the best stage-2 build of call D (INIT, low-sigma law + policy samples, (7, 1)), with the inserted noise levels
# kept in U(0, 0.6), at lambda_value 1 and 4; then the value benchmark on validation (seed 1) and test (seed 0) prompts.
#   INIT=.s6/ps_low bash benchmarks/gpu_session6_critic_e.sh OUT
set -u
OUT=${1:?out}; mkdir -p $OUT/log
INIT=${INIT:?a stage-2 critic directory}; S=${STEPS:-1500}
B() { local n=$1; shift; timeout ${BUILD_S:-400} env OMP_NUM_THREADS=4 python -m critics.build --config configs/critic/build_shapes.yaml \
  device=cuda init_from=$INIT onpolicy.enabled=true onpolicy.steps=$S onpolicy.progress=false onpolicy.log_every=250 \
  'onpolicy.sigma_range=[0.0,0.6]' output_dir=$OUT/$n heatmap=$OUT/$n.png "$@" > $OUT/log/$n.txt 2>&1 & }
B s3_v1 onpolicy.lambda_value=1.0
B s3_v4 onpolicy.lambda_value=4.0
wait
grep -h "build:save\|step $S\|rror" $OUT/log/*.txt
V="python -m critics.bench_value --device cuda --n-prompts 128 --batch-size 256 --critics stitchvm,tweedie --variant init=$INIT"
for n in s3_v1 s3_v4; do [ -f $OUT/$n/stitchvm.json ] && V="$V --variant $n=$OUT/$n"; done
$V --prompt-seed 1 --retrieval-images 256 --out "" --json $OUT/bench_val.json > $OUT/bench_val.md 2>$OUT/log/bench_val.err
cat $OUT/bench_val.md
timeout ${TEST_S:-150} $V --prompt-seed 0 --retrieval-images 0 --out "" --json $OUT/bench_test.json > $OUT/bench_test.md 2>$OUT/log/bench_test.err
cat $OUT/bench_test.md
