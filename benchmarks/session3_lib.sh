# Shared by benchmarks/gpu_session3_*.sh (sourced; needs OUT set, writes $OUT/runs/NAME and $OUT/log/NAME.txt).
#   train GPU ALGO CRITIC NAME [overrides...]  one Shapes GPU-config run in the background; a NAME with "_chk_"
#                                              optimises the ShapesEval checker (configs/experiments/shapes_checker.yaml)
#   cpu NAME [overrides...]                    the CPU main job's settings (64-sample epochs) for $E epochs, evaluated
#                                              every $EVAL_EVERY epochs on 512 held-out prompts
# configs/experiments/shapes_gpu_{grpo,ddpo}.yaml changed in session 5 (group noise, Fast window, 1024-sample epochs);
# the session-3 and session-4 scripts ran the earlier ones: `git checkout 55e2c91 -- configs/experiments` reruns them
# as they were. The session-5 scripts pin every changed key. Since session 6 algo.ema_decay (DRaFT's runs here) warms up
# as min(d, (1+s)/(10+s)) over optimizer steps s; it was a constant d before. Since session 8 dense GRPO / DDPO carry
# V exactly across ODE steps (algo.exact_ode, default on; the session 5-7 runs had the critic at every latent: add
# algo.exact_ode=false to rerun them as they were), shapes_gpu_grpo.yaml sets algo.ema_decay 0.98 and keep_best.yaml
# draws 1000 validation prompts (400 before). Since session 9 shapes_gpu_ddpo.yaml is DDPO-Fast (2-step window, clip 1e-3,
# lr 1e-4, EMA 0.98; full-SDE DDPO before): `git checkout 7241c74 -- configs/experiments/shapes_gpu_ddpo.yaml` reruns
# the session 5-8 DDPO runs that did not pin those keys as they were.
# Since session 10 keep_best.yaml validates on 2858 prompts of the evaluation's kind mix every 20 epochs (1000 test
# prompts, 601 left, every 10 before), shapes_gpu_ddpo.yaml has lr 1.5e-4, shapes_gpu_draft.yaml EMA 0.99 and the GPU
# configs score with 8 checker processes (the same scores, faster): `git checkout 6402d9f -- configs/experiments`
# reruns session 9's scripts as they were.
case "$OUT" in *[[:space:]]*|"") echo "error: OUT must be a directory path without spaces, got '$OUT'" >&2; exit 2;; esac
mkdir -p "$OUT/runs" "$OUT/log"
M=${MINUTES:-8.5}
E=${EPOCHS:-50}
EVAL_EVERY=${EVAL_EVERY:-25}
train() {
  local g=$1 a=$2 c=$3 n=$4; shift 4
  local exp=configs/experiments/shapes_gpu_$a.yaml; [ $a = nft ] && exp=configs/experiments/shapes_gpu.yaml
  local chk=""; case $n in *_chk_*) chk="--config configs/experiments/shapes_checker.yaml";; esac
  rm -f "$OUT/log/$n.rc"  # an OUT used before keeps no stale status
  (CUDA_VISIBLE_DEVICES=$g OMP_NUM_THREADS=4 python rl/train.py --algo $a --critic $c --config $exp $chk \
    run.output_dir=$OUT/runs/$n run.max_minutes=$M run.export_lora=false "$@" > $OUT/log/$n.txt 2>&1
   echo $? > $OUT/log/$n.rc) &  # the exit status, for finish (a plain `wait` discards it)
}
cpu() {
  local n=$1; shift
  rm -f "$OUT/log/$n.rc"
  (OMP_NUM_THREADS=2 python rl/train.py --algo nft --critic stitchvm run.output_dir=$OUT/runs/$n run.max_epochs=$E \
    run.eval_every=$EVAL_EVERY run.ckpt_every=1000 run.export_lora=false prompts.eval.n=512 eval.batch_size=512 "$@" \
    > $OUT/log/$n.txt 2>&1
   echo $? > $OUT/log/$n.rc) &
}
report() { for f in $OUT/log/*.txt; do echo "== $f"; grep -a "eval/overall" $f | sed 's/.*eval\/overall=/overall=/' | tr '\n' ' '; echo; done; }
# finish NAME...: after `wait`, each run's held-out evaluations and final line, then keep only its metrics.jsonl
# ($OUT/sN_NAME.jsonl with N = $SESSION) -- the run directories (checkpoints) would push the call's archive over the
# transfer limit. Keep them in docs/bench gzipped (`gzip -n`): the device tool uploads the working tree (64 MiB at most).
finish() {
  local rc
  for n in "$@"; do
    echo "== $n"
    rc=$(cat "$OUT/log/$n.rc" 2>/dev/null || echo "unknown (no $n.rc: still running, or never started)")
    [ "$rc" = 0 ] || echo "== $n: EXIT STATUS $rc (log/$n.txt)"
    grep -a "eval/overall" $OUT/log/$n.txt | grep -o "eval/overall=[0-9.]*" | sed 's/eval.overall=//' | tr '\n' ' '; echo
    grep -a "^final\|best\|rror" $OUT/log/$n.txt | tail -4
    cp "$OUT/runs/$n/metrics.jsonl" "$OUT/s${SESSION:-8}_$n.jsonl" 2>/dev/null \
      || echo "== $n: NO metrics.jsonl -- the run failed or never started (log/$n.txt)"
  done
  rm -rf "$OUT/runs"
}
# end_call SESSION NAME...: the end of a training call (since session 16's scripts): the card's name, wait for the
# runs, `finish` them as sSESSION_NAME.jsonl, and pack the logs into one tar (the device tool returns at most 8 files)
end_call() {
  local session=$1; shift
  nvidia-smi --query-gpu=name --format=csv,noheader | head -1
  wait
  SESSION=$session finish "$@"
  (cd "$OUT" && tar -cf logs.tar log && rm -rf log)
  ls "$OUT"
}
