"""Load an exported LoRA into diffusers' StableDiffusion3Pipeline and sample, exactly as a diffusers user would.

    python examples/load_lora.py runs/shapes/lora                         # the main job's export (or any Shapes LoRA)
    python examples/load_lora.py runs/tiny/lora --tiny --out runs/tiny/grid.png   # on the tiny random policy

The Shapes world's text tower is not one of SD3's three encoders, so the prompt embeddings come from the policy's
own text encoder and go to the pipeline as ``prompt_embeds``; with SD3.5 weights, pass prompts directly.
"""

import argparse
import sys
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from torchvision.utils import save_image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = ["a red circle to the left of a blue square", "three yellow stars", "two green triangles",
           "a purple diamond above an orange circle"]

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lora", type=Path)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/examples/lora_samples.png"))
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if not (args.lora / "pytorch_lora_weights.safetensors").is_file():  # diffusers would look it up on the Hub
        parser.error(f"no pytorch_lora_weights.safetensors in {args.lora} (a run's export: <run.output_dir>/lora)")
    if args.tiny:
        from policies.testing import tiny_policy

        policy = tiny_policy()
    else:
        from shapes.models import load_shapes_policy

        policy = load_shapes_policy()
    pipe = StableDiffusion3Pipeline(transformer=policy.transformer, vae=policy.vae,
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=policy.shift), text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None)
    pipe.load_lora_weights(args.lora)
    with torch.no_grad():
        cond = policy.encode_prompts(PROMPTS)
        images = pipe(prompt_embeds=cond.embeds, pooled_prompt_embeds=cond.pooled, guidance_scale=1.0,
                      num_inference_steps=args.steps, height=policy.image_size, width=policy.image_size,
                      generator=torch.Generator().manual_seed(0), output_type="pt").images
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, args.out, nrow=len(PROMPTS))
    print(f"wrote {args.out} ({len(PROMPTS)} samples with the LoRA from {args.lora})")
