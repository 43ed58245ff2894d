"""Noise-level experts (critics/routed.py): every latent gets exactly its band's expert, values and gradients; the
shipped configuration loads and trains; bad bands are clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from critics.routed import SigmaRoutedCritic
from rl import train
from rl.config import instantiate, load_yaml
from shapes.models import load_shapes_policy, load_shapes_reward


class Planted(nn.Module):
    """V = scale * mean(z) + sigma: a known value whose gradient in z is scale / numel."""

    dense, latent_channels, latent_size = True, 4, 8

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale
        self.calls = []

    def value(self, z_t, sigma, prompts=None):
        self.calls.append((z_t.shape[0], None if prompts is None else list(prompts)))
        s = torch.as_tensor(sigma, dtype=torch.float32).expand(z_t.shape[0])
        return self.scale * z_t.flatten(1).mean(1) + s


def test_each_latent_gets_its_bands_expert_value_and_gradient():
    low, high = Planted(2.0), Planted(-3.0)
    critic = SigmaRoutedCritic([low, high], [0.5, 1.0])
    z = torch.randn(5, 4, 8, 8, requires_grad=True)
    sigma = torch.tensor([0.1, 0.5, 0.50001, 0.9, 1.0])  # the band is (upper[k-1], upper[k]]: 0.5 is still low's
    prompts = ["a", "b", "c", "d", "e"]
    v = critic.value(z, sigma, prompts)
    m = z.detach().flatten(1).mean(1)
    torch.testing.assert_close(v, torch.stack([2 * m[0] + 0.1, 2 * m[1] + 0.5, -3 * m[2] + 0.50001,
                                               -3 * m[3] + 0.9, -3 * m[4] + 1.0]))
    assert low.calls == [(2, ["a", "b"])] and high.calls == [(3, ["c", "d", "e"])]
    v.sum().backward()
    per_row = z.grad.flatten(1)
    torch.testing.assert_close(per_row, torch.tensor([2.0, 2.0, -3.0, -3.0, -3.0]).view(5, 1).expand_as(per_row) / 256)


def test_one_band_calls_one_expert_on_the_whole_batch():
    low, high = Planted(1.0), Planted(1.0)
    critic = SigmaRoutedCritic([low, high], [0.5, 1.0])
    z = torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(critic.value(z, 0.7, ["x"] * 3), high.value(z, 0.7))
    assert low.calls == [] and high.calls[0] == (3, ["x"] * 3)


@pytest.mark.parametrize("experts,upper,message", [
    (2, [0.5], "one upper sigma per expert"),
    (2, [0.5, 0.4], "upper must increase strictly"),
    (2, [0.5, 0.9], "upper must increase strictly"),
    (1, [0.0], "upper must increase strictly"),
])
def test_bad_bands_are_clear_errors(experts, upper, message):
    with pytest.raises(ValueError, match=message):
        SigmaRoutedCritic([Planted(1.0) for _ in range(experts)], upper)


def test_experts_must_share_a_latent_space_and_be_dense():
    other = Planted(1.0)
    other.latent_size = 16
    with pytest.raises(ValueError, match="different latent spaces"):
        SigmaRoutedCritic([Planted(1.0), other], [0.5, 1.0])
    terminal = Planted(1.0)
    terminal.dense = False
    with pytest.raises(ValueError, match="dense"):
        SigmaRoutedCritic([Planted(1.0), terminal], [0.5, 1.0])
    with pytest.raises(ValueError, match="sigma must be a float or one per latent"):
        SigmaRoutedCritic([Planted(1.0)], [1.0]).value(torch.zeros(2, 4, 8, 8), torch.zeros(3))


def test_shipped_experts_config_equals_its_stitchvms_on_their_rows():
    from critics import load

    policy, reward = load_shapes_policy().eval(), load_shapes_reward()
    node = load_yaml(train.CONFIG_ROOT / "critic" / "stitchvm_experts.yaml")
    critic = instantiate(node, _path="critic", policy=policy, reward=reward)
    low, high = (load.stitchvm(policy, reward, p) for p in node["paths"])
    for path in node["paths"]:  # session 7: both experts have the prompt-conditioned head, (7, 1)
        meta = json.loads((load.resolve_path(path) / "stitchvm.json").read_text())
        assert (meta["i"], meta["j"], meta["head_conditioning"]) == (7, 1, "prompt")
    assert low.head_conditioning == high.head_conditioning == "prompt"
    assert critic.experts[0].head_text is critic.experts[1].head_text  # one text cache for the experts
    z = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma, prompts = torch.tensor([0.2, 0.8, 0.5, 0.95]), ["a red circle", "two blue squares", "a green triangle", "three red squares"]
    with torch.no_grad():
        v = critic.value(z, sigma, prompts)
        torch.testing.assert_close(v[[0, 2]], low.value(z[[0, 2]], sigma[[0, 2]], [prompts[0], prompts[2]]))
        torch.testing.assert_close(v[[1, 3]], high.value(z[[1, 3]], sigma[[1, 3]], [prompts[1], prompts[3]]))


@pytest.mark.parametrize("critic", ["stitchvm_experts", "stitchvm_experts_denoised"])
def test_grpo_with_dense_values_from_the_experts(tmp_path, critic):
    out = tmp_path / "run"
    rc = train.main(["--algo", "grpo", "--critic", critic, "algo.advantages=dense", "algo.num_steps=4",
                     "algo.prompts_per_epoch=2", "algo.group_size=2", "algo.rollout_batch_size=4",
                     "algo.train_batch_size=4", "algo.value_batch_size=8", "run.max_epochs=1", "prompts.eval.n=4",
                     "eval.batch_size=4", "eval.num_steps=2", "run.log_backends=[]", f"run.output_dir={out}"])
    assert rc == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_row = next(r for r in rows if "loss/policy" in r)
    assert "critic/value_mse@sigma<=1.00" in train_row and train_row["adv/abs_mean"] > 0
