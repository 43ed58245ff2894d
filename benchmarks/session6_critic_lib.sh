# Shared by benchmarks/gpu_session6_critic*.sh (sourced; needs OUT set).
#   build NAME [overrides...]    one `critics.build` of configs/critic/build_shapes.yaml on the GPU, in the background,
#                                into $OUT/NAME (log: $OUT/log/NAME.txt), stopped after $BUILD_S seconds (default 400)
#   bench "NAMES" [args...]      after `wait`: the value benchmark of the finished builds NAMES (as --variant) against
#                                the shipped StitchVM and Tweedie, 128 prompts, on validation prompts (seed 1), then on
#                                the test prompts (seed 0, cut at $TEST_S seconds) unless VAL_ONLY is set; args go to
#                                critics.bench_value (e.g. --variant prev=DIR, --sigmas 0.1,0.5)
mkdir -p $OUT/log
build() {
  local n=$1; shift
  timeout ${BUILD_S:-400} env OMP_NUM_THREADS=4 python -m critics.build --config configs/critic/build_shapes.yaml \
    device=cuda num_workers=4 distill.progress=false distill.log_every=500 onpolicy.progress=false \
    onpolicy.log_every=250 output_dir=$OUT/$n heatmap=$OUT/$n.png "$@" > $OUT/log/$n.txt 2>&1 &
}
bench() {
  local names=$1; shift
  grep -h "policy samples\|build:save\|rror" $OUT/log/*.txt
  local v="python -m critics.bench_value --device cuda --n-prompts 128 --batch-size 256 --critics stitchvm,tweedie"
  for n in $names; do [ -f $OUT/$n/stitchvm.json ] && v="$v --variant $n=$OUT/$n"; done
  $v "$@" --prompt-seed 1 --retrieval-images ${RETRIEVAL:-256} --out "" --json $OUT/bench_val.json \
    > $OUT/bench_val.md 2>$OUT/log/bench_val.err
  cat $OUT/bench_val.md
  [ -n "${VAL_ONLY:-}" ] && return
  timeout ${TEST_S:-150} $v "$@" --prompt-seed 0 --retrieval-images 0 --out "" --json $OUT/bench_test.json \
    > $OUT/bench_test.md 2>$OUT/log/bench_test.err
  cat $OUT/bench_test.md
}
