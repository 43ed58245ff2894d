"""DDPO: the per-prompt history buffer against hand-derived values, dense advantages, smoke runs through
rl/train.py, and resume (history buffer included) reproducing an uninterrupted run."""

import pytest
import torch
from safetensors.torch import load_file

from rl import ddpo, train
from tests.rl.test_grpo import (DROP, TINY, assert_trains_exactly, lora_moved, metrics, run_tiny,
                                spy_asked_and_trained)


def test_per_prompt_stat_tracker_hand_derived():
    tracker = ddpo.PerPromptStatTracker(buffer_size=3, min_count=2)
    # buffers hold 1 reward each (< min_count): batch statistics, mean 2, std 1
    adv = tracker.update(["a", "b"], torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0]) / (1 + 1e-6))
    # "a" now holds [1, 2, 4]: mean 7/3, std sqrt(42/27)
    adv = tracker.update(["a", "a"], torch.tensor([2.0, 4.0]))
    std = (42 / 27) ** 0.5
    torch.testing.assert_close(adv, (torch.tensor([2.0, 4.0]) - 7 / 3) / (std + 1e-6))
    tracker.update(["a"], torch.tensor([5.0]))
    assert tracker.state() == {"a": [2.0, 4.0, 5.0], "b": [3.0]}  # the oldest reward left the buffer
    restored = ddpo.PerPromptStatTracker(3, 2)
    restored.load(tracker.state())
    torch.testing.assert_close(restored.update(["b", "b"], torch.tensor([1.0, 2.0])),
                               tracker.update(["b", "b"], torch.tensor([1.0, 2.0])))


def test_dense_advantages_centre_per_step_over_the_batch():
    cfg = ddpo.DDPOConfig(advantages="dense", gae_lambda=1.0, dense_norm="none", dense_calibration="none", group_size=1)
    values = torch.tensor([[0.0, 1.0, 9.0], [2.0, 2.0, 9.0], [1.0, 0.0, 9.0]])
    rewards = torch.tensor([3.0, 1.0, 2.0])
    adv = ddpo.ddpo_advantages(rewards, values, torch.ones(3, 2, dtype=torch.bool), ["p"] * 3, None, cfg)
    raw = rewards.view(-1, 1) - values[:, :2]  # lambda = 1: R - V(z_k)
    torch.testing.assert_close(adv, raw - raw.mean(0))


@pytest.mark.parametrize("critic,overrides", [
    ("terminal", ["algo.inner_epochs=2", "algo.stat_min_count=2"]),
    ("tweedie", ["algo.advantages=dense", "algo.inner_epochs=1", "algo.timestep_fraction=0.5"]),  # dense defaults
    ("tweedie", ["algo.advantages=dense", "algo.sde_type=cps", "algo.eta=1.0"]),  # Flow-CPS steps
])
def test_smoke_run(tmp_path, critic, overrides):
    out = run_tiny(tmp_path, "ddpo", critic, *overrides)
    assert lora_moved(out)
    train_rows = [r for r in metrics(out) if "loss/policy" in r]
    assert len(train_rows) == 2 and all("policy/approx_kl" in r for r in train_rows)
    assert ("critic/value_mse" in train_rows[0]) == (critic == "tweedie")
    assert ("adv/value_slope" in train_rows[0]) == (critic == "tweedie")  # calibration (default) logs it
    assert all(r["loss/kl"] == 0 for r in train_rows)  # DDPO: no KL term by default


def test_kl_anchor_is_optional(tmp_path):
    """kl_beta > 0 adds Flow-GRPO's KL to the reference; it is zero on the first pass (the LoRA starts at the base
    weights) and positive once the adapter has moved; the total is policy + beta * KL."""
    out = run_tiny(tmp_path, "ddpo", "terminal", "algo.kl_beta=0.5", "algo.inner_epochs=2", "algo.stat_min_count=2")
    rows = [r for r in metrics(out) if "loss/policy" in r]
    assert any(r["loss/kl"] > 0 for r in rows)
    for r in rows:
        assert r["loss/total"] == pytest.approx(r["loss/policy"] + 0.5 * r["loss/kl"], rel=1e-4, abs=1e-9)  # float32 sums


def test_resume_reproduces_uninterrupted_run(tmp_path):
    # two training prompts, so every epoch revisits them and epoch 3 normalises by the restored history buffer
    common = ["run.eval_every=0", "prompts.train.n=2", "algo.stat_min_count=3", "algo.timestep_fraction=0.5"]
    full = run_tiny(tmp_path, "ddpo", "terminal", "run.max_epochs=3", *common, name="full")
    part = run_tiny(tmp_path, "ddpo", "terminal", "run.max_epochs=2", *common, name="part")
    assert train.main(["--algo", "ddpo", "--critic", "terminal", "--config", TINY, *DROP["ddpo"],
                       f"run.output_dir={part}", "run.max_epochs=3", *common, "--resume", "latest"]) == 0
    a = load_file(full / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(part / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    last = {name: [r for r in metrics(d) if r.get("step") == 3 and "loss/policy" in r][-1]["loss/policy"]
            for name, d in (("full", full), ("part", part))}
    assert last["full"] == last["part"]


def test_resume_on_a_host_with_another_gpu_count(tmp_path, monkeypatch):
    # the checkpoint was written where two CUDA devices were visible; resuming here (none or one) repeats the run:
    # the trainers' randomness comes from (seed, epoch, stream) generators, not from the per-device CUDA streams
    from rl import checkpoint

    capture = checkpoint.capture_rng
    fake_cuda = checkpoint._b64(torch.zeros(16, dtype=torch.uint8))
    monkeypatch.setattr(checkpoint, "capture_rng", lambda: {**capture(), "torch_cuda": [fake_cuda, fake_cuda]})
    common = ["run.eval_every=0", "prompts.train.n=2", "algo.stat_min_count=3", "algo.timestep_fraction=0.5"]
    full = run_tiny(tmp_path, "ddpo", "terminal", "run.max_epochs=3", *common, name="full")
    part = run_tiny(tmp_path, "ddpo", "terminal", "run.max_epochs=2", *common, name="part")
    assert len(checkpoint.load_checkpoint(str(part)).state["rng"]["torch_cuda"]) == 2
    assert train.main(["--algo", "ddpo", "--critic", "terminal", "--config", TINY, *DROP["ddpo"],
                       f"run.output_dir={part}", "run.max_epochs=3", *common, "--resume", "latest"]) == 0
    a = load_file(full / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(part / "lora" / "pytorch_lora_weights.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("precision", [[], ["run.mixed_precision=bf16"]], ids=["fp32", "bf16"])
def test_clip_fraction_is_logged_per_pass(tmp_path, precision, fresh_accelerate_state):
    # one minibatch per pass: the first pass scores the rollout's own policy (ratio 1, nothing clipped), the second
    # the policy after that pass's step, whose ratios leave a clip range far below one step's change. Under bf16
    # autocast too: the update encodes the prompts as the rollout did (autocast embeddings differ by ~0.03).
    out = run_tiny(tmp_path, "ddpo", "terminal",
                   "algo.inner_epochs=2", "algo.train_batch_size=4", "algo.stat_min_count=2", "algo.clip_range=1e-9",
                   "run.max_epochs=1", *precision)
    row = [r for r in metrics(out) if "loss/policy" in r][-1]
    assert row["policy/clipfrac_pass1"] == 0.0
    assert row["policy/clipfrac_pass2"] > 0.5
    assert row["policy/clipfrac"] == pytest.approx((row["policy/clipfrac_pass1"] + row["policy/clipfrac_pass2"]) / 2)


def test_window_config_errors(capsys):
    assert train.main(["--algo", "ddpo", "--critic", "terminal", "--config", TINY, *DROP["ddpo"],
                       "algo.sde_window=2", "algo.sde_window_start=[1,3]"]) == 2
    assert "num_steps - sde_window (2)" in capsys.readouterr().err
    # group_size 1 centres dense advantages over the batch: its rounds must share one window
    assert train.main(["--algo", "ddpo", "--critic", "tweedie", "--config", TINY, *DROP["ddpo"], "algo.group_size=1",
                       "algo.prompts_per_epoch=4", "algo.rollout_batch_size=2", "algo.advantages=dense",
                       "algo.sde_window=2", "algo.sde_window_start=[0,2]"]) == 2
    assert "draw different windows" in capsys.readouterr().err


def test_window_trains_only_the_window_and_asks_the_critic_there(tmp_path, monkeypatch):
    from rl import cotrain
    from rl import policy_gradient as pg

    asked, masks = [], []
    real_values, real_update = cotrain.trajectory_values, pg.ppo_update

    def spy_values(critic, latents, sigmas, prompts, batch_size, steps=None):
        asked.append(steps)
        return real_values(critic, latents, sigmas, prompts, batch_size, steps)

    def spy_update(run, rollout, adv, *args, **kwargs):
        masks.append(rollout.sde_mask.clone())
        assert (adv[~rollout.sde_mask] == 0).all()  # ODE steps carry no advantage
        return real_update(run, rollout, adv, *args, **kwargs)

    monkeypatch.setattr(cotrain, "trajectory_values", spy_values)
    monkeypatch.setattr(pg, "ppo_update", spy_update)
    out = run_tiny(tmp_path, "ddpo", "tweedie", "algo.advantages=dense", "algo.sde_window=2",
                   "algo.sde_window_start=[0,2]", "algo.group_noise=true")
    assert lora_moved(out) and len(masks) == 2
    for steps, mask in zip(asked, masks):
        window = torch.nonzero(mask[0]).flatten().tolist()
        assert len(window) == 2 and window[1] == window[0] + 1 and (mask == mask[:1]).all()
        assert steps == window  # the critic only where a stochastic step begins


def test_group_noise_needs_groups(capsys):
    assert train.main(["--algo", "ddpo", "--critic", "terminal", "--config", TINY, *DROP["ddpo"], "algo.group_size=1",
                       "algo.rollout_batch_size=4", "algo.group_noise=true"]) == 2
    assert "group_noise" in capsys.readouterr().err


def test_values_at_trained_with_group_size_one_shares_one_draw(tmp_path, monkeypatch):
    """DDPO's group_size 1 centres per step over the whole batch, so values_at: trained draws one set of steps for
    the batch; the critic is asked at exactly their latents and only they are trained, in every inner epoch."""
    asked, trained = spy_asked_and_trained(monkeypatch)
    out = run_tiny(tmp_path, "ddpo", "tweedie", "algo.advantages=dense", "algo.values_at=trained",
                   "algo.timestep_fraction=0.5", "algo.dense_norm=global", "algo.group_size=1",
                   "algo.dense_calibration=none")  # 2 samples: the batch slope would fit R exactly, all advantages 0
    assert lora_moved(out) and len(asked) == len(trained) == 2
    for mask, (steps, adv, inner, rescored) in zip(asked, trained):
        assert inner >= 2 and bool((mask == mask[:1]).all()) and not mask[:, -1].any()
        assert_trains_exactly(steps, rescored, inner)
        expected = torch.zeros_like(mask).scatter_(1, steps, True)
        assert torch.equal(mask, expected)
        assert (adv[~expected[:, :-1]] == 0).all() and adv[expected[:, :-1]].abs().sum() > 0
