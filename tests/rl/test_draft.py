"""DRaFT-K: truncated back-propagation against hand-derived gradients, the loss (Eq. 64), smoke runs through
rl/train.py, errors."""

import pytest
import torch
from torch import nn

from rl import draft, train
from tests.rl.test_grpo import DROP, TINY, lora_moved, metrics, run_tiny

SIGMAS = torch.tensor([1.0, 0.8, 0.5, 0.3, 0.1, 0.0])  # Delta = [-.2, -.3, -.2, -.2, -.1]


class Redness(nn.Module):
    """A differentiable toy reward: mean(red - blue) of the image."""

    differentiable = True

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (images[:, 0] - images[:, 2]).mean(dim=(1, 2))


@pytest.mark.parametrize("tau,k", [(5, 1), (5, 3), (4, 2), (5, 5)])
def test_truncation_constant_velocity(tau, k):
    # v = theta: z_tau = z_T + theta * sum_i Delta_i, but only the last K steps are on the graph
    theta = torch.tensor(0.7, requires_grad=True)
    z_T = torch.randn(2, 1, 2, 2)
    roll = draft.truncated_rollout(lambda z, s: theta * torch.ones_like(z), z_T, SIGMAS, tau, k)
    deltas = SIGMAS[1:] - SIGMAS[:-1]
    torch.testing.assert_close(roll.z_tau.detach(), z_T + 0.7 * deltas[:tau].sum())  # the sample is the full one
    roll.z_tau.sum().backward()
    torch.testing.assert_close(theta.grad, z_T.numel() * deltas[tau - k:tau].sum())
    assert roll.velocities.shape == (2, k, 1, 2, 2) and roll.sigmas.tolist() == SIGMAS[tau - k:tau].tolist()


def test_truncation_chain_inside_the_window():
    # v = theta z: z_{i+1} = (1 + Delta_i theta) z_i; with K = 2 and tau = 4 the graph starts at z_2 (a constant):
    # d z_4 / d theta = [Delta_3 (1 + Delta_2 theta) + Delta_2 (1 + Delta_3 theta)] z_2
    theta = torch.tensor(0.5, requires_grad=True)
    z_T = torch.randn(1, 1, 2, 2)
    roll = draft.truncated_rollout(lambda z, s: theta * z, z_T, SIGMAS, tau=4, backprop_steps=2)
    d = (SIGMAS[1:] - SIGMAS[:-1]).tolist()
    z_2 = z_T * (1 + d[0] * 0.5) * (1 + d[1] * 0.5)
    torch.testing.assert_close(roll.latents[:, 0], z_2)
    roll.z_tau.sum().backward()
    expected = (d[3] * (1 + d[2] * 0.5) + d[2] * (1 + d[3] * 0.5)) * z_2.sum()
    torch.testing.assert_close(theta.grad, expected)
    with pytest.raises(ValueError, match="K"):
        draft.truncated_rollout(lambda z, s: theta * z, z_T, SIGMAS, tau=2, backprop_steps=3)


def test_draft_loss_hand_derived():
    value = torch.tensor([1.0, 3.0], requires_grad=True)
    out = draft.draft_loss(value, torch.full((2, 1, 3), 2.0), torch.zeros(2, 1, 3), reg_lambda=0.1)
    assert out.value.item() == pytest.approx(2.0)
    assert out.reg.item() == pytest.approx(4.0)
    assert out.loss.item() == pytest.approx(-2.0 + 0.4)
    out.loss.backward()
    torch.testing.assert_close(value.grad, torch.tensor([-0.5, -0.5]))  # ascent on V
    assert draft.draft_loss(value, reg_lambda=1.0).reg.item() == 0.0


@pytest.mark.parametrize("critic,overrides", [
    ("terminal", ["algo.backprop_steps=2"]),
    ("tweedie", ["algo.backprop_steps=1", "algo.ema_decay=0.5"]),
])
def test_smoke_run(tmp_path, critic, overrides):
    out = run_tiny(tmp_path, "draft", critic, "reward._component_=tests.rl.test_draft.Redness", *overrides)
    assert lora_moved(out)
    rows = [r for r in metrics(out) if "loss/total" in r]
    assert len(rows) == 2 and all(r["loss/reg"] >= 0 for r in rows)
    taus = [r["train/tau"] for r in rows]
    # tiny.yaml: 4 steps, tau ~ U{2..3} with a value critic; the terminal critic finishes the sample
    assert all(t == 4 for t in taus) if critic == "terminal" else all(2 <= t <= 3 for t in taus)


@pytest.mark.parametrize("precision", [[], ["run.mixed_precision=bf16"]], ids=["fp32", "bf16"])
def test_regulariser_is_zero_at_the_reference(tmp_path, precision, fresh_accelerate_state):
    # one optimizer step in the first epoch, taken from the zero-initialised LoRA: theta = theta0, so R = 0 exactly,
    # in bf16 too (the reference velocities run under the same autocast as the rollout's)
    out = run_tiny(tmp_path, "draft", "tweedie", "reward._component_=tests.rl.test_draft.Redness",
                   "algo.prompts_per_epoch=4", "algo.train_batch_size=4", "run.max_epochs=2", *precision)
    rows = [r for r in metrics(out) if "loss/reg" in r]
    assert rows[0]["loss/reg"] == 0.0 and rows[-1]["loss/reg"] > 0.0


def test_errors(tmp_path, capsys):
    assert train.main(["--algo", "draft", "--critic", "terminal", "--config", TINY, *DROP["draft"],
                       f"run.output_dir={tmp_path}"]) == 2
    assert "not differentiable" in capsys.readouterr().err  # tiny.yaml's JPEG reward
    assert train.main(["--algo", "draft", "--critic", "terminal", "--config", TINY, *DROP["draft"],
                       "algo.backprop_steps=3"]) == 2  # K = 3 > tau_min = 2
    assert "backprop_steps" in capsys.readouterr().err
    with pytest.raises(ValueError, match="differentiable in z_tau"):  # Monte-Carlo values carry no gradient
        run_tiny(tmp_path, "draft", "mc", "reward._component_=tests.rl.test_draft.Redness", "critic.num_rollouts=1",
                 "critic.num_steps=2")
