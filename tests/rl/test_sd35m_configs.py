"""The SD3.5-Medium experiment configs run end to end through rl/train.py with their own loaders
(FlowPolicy, CLIPScore.from_pretrained on a file, prompt files, a StitchVM built by build_sd35m_clip.yaml), with tiny
random models of the same classes in place of the weights and every size scaled down."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from critics.build import build, load_config
from rl import train
from tests.critics.tiny_world import TINY_VIT, write_tiny_open_clip

ROOT = Path(__file__).resolve().parents[2]
TINY_POLICY = "model={_component_: policies.testing.tiny_policy}"
SCALED = {  # each trainer's sizes, scaled to the tiny policy (3 sampler steps) and two epochs
    "grpo": ["algo.num_steps=3", "algo.prompts_per_epoch=2", "algo.group_size=4", "algo.rollout_batch_size=4",
             "algo.train_batch_size=8", "algo.value_batch_size=8", "run.gradient_accumulation_steps=2"],
    "nft": ["algo.num_steps=4", "algo.tau_min=1", "algo.tau_max=2", "algo.prompts_per_epoch=2", "algo.group_size=4",
            "algo.rollout_batch_size=4", "algo.train_batch_size=4"],
}


@pytest.fixture(scope="module")
def sd35m_world(tmp_path_factory):
    """A tiny CLIP ViT file, a StitchVM built for it and the tiny policy by build_sd35m_clip.yaml, prompt files."""
    tmp = tmp_path_factory.mktemp("sd35m")
    weights = write_tiny_open_clip(tmp)
    images = tmp / "images"
    images.mkdir()
    g = torch.Generator().manual_seed(0)
    for k in range(8):
        Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()).save(images / f"{k}.png")
    cfg = load_config(str(ROOT / "configs" / "critic" / "build_sd35m_clip.yaml"), [
        "policy={_component_: policies.testing.tiny_policy}", f"reward.model_name={TINY_VIT}",
        f"reward.pretrained={weights}", f"data.root={images}", "data.resolution=16", f"output_dir={tmp / 'critic'}",
        "probe.n=4", "search.pinned=[1,1]", "search.i_values=[1]", "distill.batch_size=4",
        "distill.micro_batch_size=2", "distill.max_steps=1", "distill.warmup_steps=1", "distill.progress=false",
        "num_workers=0", "device=cpu", "head_dtype=float32"])
    build(cfg)
    (tmp / "train.txt").write_text("a cat on a sofa\na red bicycle\na bowl of fruit\n")
    (tmp / "test.txt").write_text("a blue house\na dog in the snow\n")
    return tmp, weights


@pytest.mark.parametrize("algo", ["grpo", "nft"])
def test_sd35m_experiment_config_trains_on_tiny_models(sd35m_world, tmp_path, algo):
    world, weights = sd35m_world
    out = tmp_path / "run"
    rc = train.main([
        "--algo", algo, "--critic", "stitchvm", "--config", str(ROOT / "configs" / "experiments" / f"sd35m_{algo}.yaml"),
        TINY_POLICY, f"reward.model_name={TINY_VIT}", f"reward.pretrained={weights}",
        f"eval_metric.model_name={TINY_VIT}", f"eval_metric.pretrained={weights}", f"critic.path={world / 'critic'}",
        f"prompts.train.path={world / 'train.txt'}", f"prompts.eval.path={world / 'test.txt'}",
        "run.mixed_precision=no", "run.max_epochs=2", "run.eval_every=2", "run.ckpt_every=2", "eval.num_steps=3",
        "eval.batch_size=2", f"run.output_dir={out}", *SCALED[algo]])
    assert rc == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "loss/total" in r]
    assert len(trained) == 2 and all(torch.isfinite(torch.tensor(r["loss/total"])) for r in trained)
    assert any("eval/score" in r for r in rows)
    if algo == "grpo":  # the config's dense credit: the critic was asked along the trajectories
        assert "critic/value_mse@sigma<=1.00" in trained[0] and trained[0]["reward/group_std"] >= 0
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
