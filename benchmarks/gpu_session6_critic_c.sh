#!/usr/bin/env bash
# Session-6 GPU call for issue #4: which noise-level law for stage 2, with all six CLIP blocks trained ((7, 1))?
# Call B found that a low-sigma specialist ranks better at every sigma up to 0.5 than the uniform law. Three builds
# at once (4000 steps), sigma = sigmoid(N(m, 0.8)) for m = -1.4, -0.8, -0.3 (medians 0.20, 0.31, 0.43), then the
# value benchmark on validation (seed 1) and test (seed 0) prompts, with PREV=DIR an earlier build alongside.
#   PREV=.s6/low_7_1 bash benchmarks/gpu_session6_critic_c.sh OUT
set -u
OUT=${1:?out}; mkdir -p $OUT/log
S=${STEPS:-4000}
B() { local n=$1 m=$2; shift 2; timeout ${BUILD_S:-400} env OMP_NUM_THREADS=4 python -m critics.build --config configs/critic/build_shapes.yaml \
  device=cuda num_workers=4 distill.progress=false distill.max_steps=$S distill.log_every=500 \
  distill.sigma_sampling=logit_normal distill.sigma_mean=$m distill.sigma_std=0.8 'search.pinned=[7,1]' \
  output_dir=$OUT/$n heatmap=$OUT/$n.png "$@" > $OUT/log/$n.txt 2>&1 & }
B ln14 -1.4; B ln08 -0.8; B ln03 -0.3
wait
grep -h "build:save\|step $S\|rror" $OUT/log/*.txt
V="python -m critics.bench_value --device cuda --n-prompts 128 --batch-size 256 --critics stitchvm,tweedie"
[ -n "${PREV:-}" ] && V="$V --variant prev=$PREV"
for n in ln14 ln08 ln03; do [ -f $OUT/$n/stitchvm.json ] && V="$V --variant $n=$OUT/$n"; done
$V --prompt-seed 1 --retrieval-images 256 --out "" --json $OUT/bench_val.json > $OUT/bench_val.md 2>$OUT/log/bench_val.err
cat $OUT/bench_val.md
timeout ${TEST_S:-150} $V --prompt-seed 0 --retrieval-images 0 --out "" --json $OUT/bench_test.json > $OUT/bench_test.md 2>$OUT/log/bench_test.err
cat $OUT/bench_test.md
