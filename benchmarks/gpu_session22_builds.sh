# Session 22's builds (sourced by benchmarks/gpu_session22_{a,b}.sh after critic_call_lib.sh; needs KEEP, OUT).
# NAME CARD [overrides...]: one build into $KEEP/NAME, checkpointed with its training state every 250 steps, so that
# `NAME CARD resume=true` goes on from it in a later call on the same machine.
SHIP="distill.sigma_sampling=logit_normal distill.sigma_mean=-2.2 distill.sigma_std=0.6 distill.teacher_input=decoded
      policy_samples.student_latents=own stitch_blocks=4 policy_samples.fraction=0.75 distill.ckpt_every=250"
NAMES="L10k L10k6 tail_lr head4"
L10k() { local g=$1; shift; crit $g L10k $SHIP distill.max_steps=10000 output_dir=$KEEP/L10k "$@"; }
L10k6() { local g=$1; shift; crit $g L10k6 $SHIP distill.max_steps=10000 stitch_blocks=6 output_dir=$KEEP/L10k6 "$@"; }
tail_lr() { local g=$1; shift; crit $g tail_lr $SHIP distill.max_steps=5000 distill.lr=1e-4 distill.stitch_lr_mult=15 \
  output_dir=$KEEP/tail_lr "$@"; }
head4() { local g=$1; shift; crit $g head4 $SHIP distill.max_steps=5000 'search.pinned=[4,1]' output_dir=$KEEP/head4 "$@"; }
# stateless SRC DST: a copy of the critic in SRC without its training state (the manifest rewritten to match), so that
# it comes back from the device within the size limits and loads as a critic
stateless() {
  [ -f "$1/stitchvm.json" ] || return 0
  python - "$1" "$2" <<'PY'
import json, shutil, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
state = {"distill_state.safetensors", "distill_state.json"}
shutil.rmtree(dst, ignore_errors=True)
dst.mkdir(parents=True)
manifest = json.loads((src / "manifest.json").read_text())
for name in list(manifest["files"]):
    if name in state:
        del manifest["files"][name]
    else:
        shutil.copy2(src / name, dst / name)
(dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
step = json.loads((src / "distill_state.json").read_text())["step"] if (src / "distill_state.json").is_file() else \
    json.loads((src / "build.json").read_text()).get("distill_steps")
print(f"{dst}: {src} at step {step} ({'a checkpoint' if (src / 'distill_state.json').is_file() else 'finished'})")
PY
}
