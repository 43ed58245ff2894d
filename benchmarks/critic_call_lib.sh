# Shared by benchmarks/gpu_session11_c.sh and later critic calls (bench / bench_report since session 12's) on several cards (sourced; needs OUT set).
#   crit GPU NAME [overrides...]  one `critics.build` of configs/critic/build_shapes.yaml with the prompt experts'
#                                 settings (prompt head, (7, 1), a bank of $BANK policy samples) on card GPU, into
#                                 $OUT/NAME (log: $OUT/log/NAME.txt), stopped after $BUILD_S seconds; run it with &;
#                                 a non-zero exit status is printed
#   bench NAMES                   critics.bench_value of the builds that saved, the shipped experts and Tweedie, 512
#                                 prompts, K = 8, sigma 0.1-0.9: validation (seed 1) on card 1, test (seed 0) on card
#                                 0, in the background (`wait`, then `bench_report`); $BENCH_EXTRA: more arguments;
#                                 $BENCH_CARDS (since session 22): the cards of seeds 1 and 0 ("1 0"); $BENCH_TAG: a
#                                 suffix of the output names; $BUILDS: where the builds are ($OUT); $SIGMAS (0.1-0.9)
#   pack NAMES                    after the benchmark: one tar per build (NAME.tar) and one for the logs, tables and
#                                 JSON (results.tar). The device tool returns at most 8 files from $OUT, 16 MiB each:
#                                 session 11's builds came back file by file and were lost.
case "$OUT" in *[[:space:]]*|"") echo "error: OUT must be a directory path without spaces, got '$OUT'" >&2; exit 2;; esac
mkdir -p "$OUT/log"
crit() {
  local g=$1 n=$2; shift 2
  CUDA_VISIBLE_DEVICES=$g timeout ${BUILD_S:-330} env OMP_NUM_THREADS=8 python -m critics.build \
    --config configs/critic/build_shapes.yaml device=cuda num_workers=${WORKERS:-8} distill.progress=false \
    distill.log_every=${LOG_EVERY:-500} onpolicy.progress=false onpolicy.log_every=100 head_conditioning=prompt \
    'search.pinned=[7,1]' policy_samples.n=${BANK:-98304} policy_samples.batch_size=2048 \
    'policy_samples.prompts={_component_: shapes.data.prompts, split: train, n: 65536, seed: 5}' \
    output_dir=$OUT/$n heatmap=$OUT/$n.png "$@" > $OUT/log/$n.txt 2>&1
  local rc=$?  # 124: stopped by BUILD_S (the benchmark then takes the build's last checkpoint)
  [ $rc = 0 ] || echo "== build $n: exit status $rc$([ $rc = 124 ] && echo ' (stopped after BUILD_S)') (log/$n.txt)"
}
bench() {
  local V=(python -m critics.bench_value --device cuda --n-prompts 512 --batch-size 512 --sigmas ${SIGMAS:-0.1,0.25,0.5,0.75,0.9}
           --critics tweedie --variant prompt_low=shapes/weights/stitchvm_prompt_low
           --variant prompt_unif=shapes/weights/stitchvm_prompt --retrieval-images 0 --out "")
  local n seed cards=(${BENCH_CARDS:-1 0}) t=${BENCH_TAG:-} b=${BUILDS:-$OUT}
  for n in "$@"; do [ -f $b/$n/stitchvm.json ] && V+=(--variant $n=$b/$n); done
  set -f; V+=(${BENCH_EXTRA:-}); set +f  # more arguments (a later --critics replaces the one above); -f: a
  # variant's denoised[...] is no glob pattern
  for seed in 1 0; do  # one card each, at once
    CUDA_VISIBLE_DEVICES=${cards[1-seed]} timeout ${BENCH_S:-150} "${V[@]}" --prompt-seed $seed \
      --json $OUT/bench${t}_seed$seed.json > $OUT/bench${t}_seed$seed.md 2>$OUT/log/bench${t}_seed$seed.err &
  done
}
bench_report() {
  local seed t=${BENCH_TAG:-}
  for seed in 1 0; do echo "== bench${t} prompt seed $seed"; cat $OUT/bench${t}_seed$seed.md; tail -2 $OUT/log/bench${t}_seed$seed.err; done
}
pack() {
  for n in "$@"; do
    rm -rf "$OUT/$n/checkpoints" "$OUT/$n"/ckpt*; [ -d "$OUT/$n" ] && tar -cf "$OUT/$n.tar" -C "$OUT" "$n" && rm -rf "$OUT/$n"; done
  (cd "$OUT" && shopt -s nullglob && f=(log *.json *.md *.png) && tar -cf results.tar "${f[@]}" && rm -rf "${f[@]}")
  ls -la $OUT
}
# end_builds NAME...: the end of a build call (since session 16's scripts): the card's name, wait for the builds, their
# save lines and errors, the value benchmark of those that saved, and the packed results. DENOISED=1 (session 21):
# the benchmark also values each build as the low expert of stitchvm_experts_denoised (NAME_dn) and runs the shipped one
end_builds() {
  nvidia-smi --query-gpu=name --format=csv,noheader | head -1
  wait
  grep -h "policy samples\|build:save\|step 4000\|step 600\|rror" "$OUT"/log/*.txt
  bench_denoised "$@"
  wait
  bench_report
  pack "$@"
}
# bench_denoised NAME...: bench, and with DENOISED=1 each build also as the denoised experts' low expert (NAME_dn), at
# the shipped config's settings or at $DENOISED_SPEC's (e.g. 'denoised[sigma_in=0.15,noise_draws=1]', sessions 21-22)
bench_denoised() {
  if [ -n "${DENOISED:-}" ]; then
    local n b=${BUILDS:-$OUT}; BENCH_EXTRA="--critics tweedie,stitchvm_experts_denoised"
    for n in "$@"; do [ -f $b/$n/stitchvm.json ] && BENCH_EXTRA+=" --variant ${n}_dn=${DENOISED_SPEC:-denoised}:$b/$n"; done
  fi
  bench "$@"
}
