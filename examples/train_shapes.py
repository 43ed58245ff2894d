"""Train the Shapes policy with DiffusionNFT and a critic, then export the LoRA (what the README's main job does).

    python examples/train_shapes.py                      # shipped Shapes world, StitchVM critic, 10 epochs
    python examples/train_shapes.py --tiny --out runs/tiny  # random tiny models, decode-and-score, seconds

The LoRA lands in <out>/lora (diffusers format); examples/load_lora.py samples with it. Each run replaces the
previous one in <out> (run.overwrite=true; the main job refuses to, see the README).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rl import train  # noqa: E402

TINY = ["--critic", "terminal", "model._component_=policies.testing.tiny_policy",
        "reward._component_=critics.rewards.jpeg.JPEGCompressibility",
        "eval_metric._component_=critics.rewards.jpeg.JPEGCompressibility", "prompts.train.n=16", "prompts.eval.n=4",
        "algo.num_steps=4", "algo.tau_min=2", "algo.tau_max=3", "algo.prompts_per_epoch=2", "algo.group_size=2",
        "algo.rollout_batch_size=4", "algo.train_batch_size=2", "algo.lora_rank=4", "algo.lora_alpha=8",
        "run.max_epochs=2", "run.eval_every=1", "run.log_backends=[]", "eval.num_steps=3", "eval.batch_size=4"]

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default="runs/example_shapes")
    args = parser.parse_args()
    argv = ["--algo", "nft", f"run.output_dir={args.out}", "run.overwrite=true"]
    argv += TINY if args.tiny else ["--critic", "stitchvm", "run.max_epochs=10"]
    sys.exit(train.main(argv))
