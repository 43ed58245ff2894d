"""Steer the Shapes policy with its StitchVM critic: DPS (value-guided SDE) and FK steering, one image grid each.

    python examples/steer.py                  # shipped Shapes weights (shapes/weights, incl. shapes/weights/stitchvm)
    python examples/steer.py --tiny           # random tiny models: runs anywhere in seconds, pictures are noise

The full command-line tool with ShapesEval scoring is ``python -m rl.steer`` (rl/steer.py).
"""

import argparse
import sys
from pathlib import Path

import torch
from torchvision.utils import save_image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rl.steering import DPSConfig, FKConfig, SharedHeadGuide, dps_sample, fk_sample  # noqa: E402

PROMPTS = ["a red circle to the left of two blue squares", "three yellow stars", "a purple diamond above a green "
           "triangle", "two orange circles and a blue star"]


def load(tiny: bool):
    """(policy, StitchVM critic, steps, CFG scale)."""
    if tiny:
        from rl.steering.testing import tiny_world

        world = tiny_world()
        return world.policy, world.stitchvm, 10, 4.5
    from critics.load import stitchvm
    from shapes.models import load_shapes_policy, load_shapes_reward, policy_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy, reward = load_shapes_policy(device), load_shapes_reward(device)
    policy.transformer.requires_grad_(False)  # inference: no weight gradients
    critic = stitchvm(policy, reward, "shapes/weights/stitchvm")  # head = policy.transformer's first i blocks
    cfg = policy_config()
    return policy, critic.to(device).eval().requires_grad_(False), cfg.num_steps, cfg.guidance_scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default="runs/examples/steer")
    args = parser.parse_args()
    policy, critic, num_steps, cfg_scale = load(args.tiny)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # One guide serves both: CFG velocity + V + ∇V, with the StitchVM head computed by CFG's unconditional branch.
    guide = SharedHeadGuide(policy, critic, cfg_scale)
    cond, sigmas = policy.encode_prompts(PROMPTS), policy.sigmas(num_steps)

    dps = DPSConfig(eta=0.7, guidance_scale=1.0, grad_norm="score", sigma_max=0.95)
    z_T = policy.noise(len(PROMPTS), torch.Generator(policy.device).manual_seed(0))
    result = dps_sample(guide, z_T, sigmas, cond, PROMPTS, dps, torch.Generator(policy.device).manual_seed(1))
    # NaN marks the unguided steps (sigma_i > sigma_max): DPS asks the critic only where it guides
    print(f"DPS: V along the trajectory (first prompt; nan = unguided step, sigma > {dps.sigma_max}):",
          [f"{v:.3f}" for v in result.values[0].tolist()])
    with torch.no_grad():
        save_image(policy.decode(result.z_0), out / "dps.png", nrow=len(PROMPTS))

    fk = FKConfig(num_particles=4, num_proposals=2, lam=30.0, eta=0.7)
    z_T = policy.noise(len(PROMPTS) * fk.num_particles, torch.Generator(policy.device).manual_seed(0))
    result = fk_sample(guide, z_T, sigmas, cond, PROMPTS, fk, torch.Generator(policy.device).manual_seed(1))
    print(f"FK: {result.num_resampled} resampling events; final V per particle:\n{result.values}")
    with torch.no_grad():
        save_image(policy.decode(result.z_0), out / "fk.png", nrow=len(PROMPTS))
    print(f"wrote {out / 'dps.png'} and {out / 'fk.png'}")


if __name__ == "__main__":
    main()
