"""Critic co-training: calibration metrics against hand-derived values, which parameters move, the value error on
the policy's trajectories falls, config errors, smoke runs through rl/train.py, and resume restores the critic."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from critics.stitchvm import DiTHead, build_stitchvm
from policies import samplers
from policies.testing import tiny_policy
from rl import cotrain, train
from rl.config import ConfigError
from tests.critics.test_stitchvm import TinyReward, random_fit
from tests.rl.test_grpo import DROP, TINY, metrics, run_tiny

CRITIC = "critic._component_=tests.rl.test_cotrain.tiny_stitchvm_critic"  # on top of --critic terminal's node


def tiny_stitchvm_critic(policy, reward, i: int = 1, seed: int = 0):
    """A StitchVM on the tiny policy's own transformer (head = its first i blocks) and a tiny CLIP tail (random
    stage-1 fit, image score), for runs through rl/train.py; ``reward`` (the run's pixel reward) is not used."""
    null = policy.null_embeds()
    head = DiTHead(policy.transformer, i, null.embeds.float(), null.pooled.float(), policy.latent_size)
    W, b = random_fit(head, 64, seed=seed + 2)
    return build_stitchvm(policy.transformer, TinyReward(seed), i, 1, W, b, null.embeds.float(), null.pooled.float(),
                          "image", latent_size=policy.latent_size)


def trajectories(policy, n: int, seed: int):
    """ODE trajectories (n, 5, 4, 8, 8) of the tiny policy, their sigmas and prompts."""
    prompts = [f"a {c} circle" for c in ("red", "green", "blue", "red")][:n]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        traj = samplers.sample(policy.velocity_fn(policy.encode_prompts(prompts)), policy.noise(n, g),
                               policy.sigmas(4, "cpu"))
    return traj.latents, traj.sigmas, prompts


def snapshot(params):
    return [p.detach().clone() for p in params]


def moved(before, params):
    return any(not torch.equal(a, p.detach()) for a, p in zip(before, params))


# ------------------------------------------------------------------------------------------------ calibration
def test_value_calibration_hand_derived():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    sigmas = torch.tensor([0.1, 0.3, 0.6, 0.9])
    out = cotrain.value_calibration(values, sigmas, torch.ones(4))
    assert out["critic/value_mse"] == pytest.approx((0 + 1 + 4 + 9) / 4)
    assert out["critic/value_bias"] == pytest.approx(1.5)
    assert [out[f"critic/value_mse@{b}"] for b in ("sigma<0.25", "sigma<0.50", "sigma<0.75", "sigma<=1.00")] == \
        pytest.approx([0.0, 1.0, 4.0, 9.0])
    assert "critic/value_corr" not in out  # the reward is constant
    out = cotrain.value_calibration(values, sigmas, torch.tensor([1.0, 2.0, 3.0, 5.0]), edges=(0.5,))
    assert set(k.split("@")[-1] for k in out if "@" in k) == {"sigma<0.50", "sigma<=1.00"}
    assert out["critic/value_corr"] == pytest.approx(torch.corrcoef(torch.tensor([[1.0, 2, 3, 4], [1, 2, 3, 5]]))[0, 1]
                                                     .item())
    # (B, K+1) trajectory layout: each latent is compared with its own trajectory's reward
    traj = cotrain.trajectory_calibration(torch.tensor([[1.0, 1.0], [0.0, 2.0]]), torch.tensor([1.0, 0.0]),
                                          torch.tensor([1.0, 0.0]))
    assert traj["critic/value_mse@sigma<0.25"] == pytest.approx(2.0) and traj["critic/value_mse@sigma<=1.00"] == 0


# ------------------------------------------------------------------------------------------------ parameters
@pytest.mark.parametrize("which", ["stitch", "stitch+tail", "all"])
def test_cotraining_moves_only_what_it_should(which):
    policy = tiny_policy()
    critic = tiny_stitchvm_critic(policy, None)
    latents, sigmas, prompts = trajectories(policy, 3, seed=0)
    stitch, tail = critic.stitch_parameters(), [p for _, p in critic.tail_named_parameters()]
    base = list(policy.parameters())  # includes the head: the transformer's first block
    before = [snapshot(x) for x in (stitch, tail, base)]
    trainer = cotrain.CriticTrainer(critic, cotrain.CotrainConfig(enabled=True, params=which, lr=1e-2,
                                                                  updates_per_epoch=2, batch_size=8), base)
    assert not any(p.requires_grad for p in critic.parameters() if all(p is not q for q in base))  # frozen between
    out = trainer.update(latents, sigmas, torch.full((3,), -0.8), prompts, torch.Generator().manual_seed(0))
    assert out["critic/train_mse"] > 0 and out["critic/skipped_updates"] == 0
    assert moved(before[0], stitch)
    assert moved(before[1], tail) == (which != "stitch")
    assert not moved(before[2], base)  # the policy, head included, never moves
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(5e-2)  # stitch lr x stitch_lr_scale


def test_cotraining_reduces_the_value_error_on_the_policys_trajectories():
    policy = tiny_policy()
    critic = tiny_stitchvm_critic(policy, None)

    def reward(latents):  # a reward of the finished sample that the random critic does not know
        return latents[:, -1].mean(dim=(1, 2, 3)) * 3 - 0.5

    train_lat, sigmas, prompts = trajectories(policy, 4, seed=0)
    held_lat, _, _ = trajectories(policy, 4, seed=1)  # fresh trajectories of the same policy
    trainer = cotrain.CriticTrainer(critic, cotrain.CotrainConfig(enabled=True, lr=3e-3, updates_per_epoch=40,
                                                                  batch_size=20), list(policy.parameters()))

    def held_out_mse():
        values = cotrain.trajectory_values(critic, held_lat, sigmas, prompts, batch_size=32)
        return trainer.calibration(values, sigmas, reward(held_lat))["critic/value_mse"]

    before = held_out_mse()
    trainer.update(train_lat, sigmas, reward(train_lat), prompts, torch.Generator().manual_seed(0))
    assert held_out_mse() < 0.5 * before


def test_generic_module_critic_and_errors():
    policy = tiny_policy()

    class LinearCritic(nn.Module):  # a learned critic that shares a module with the policy
        dense, latent_channels, latent_size = True, 4, 8

        def __init__(self):
            super().__init__()
            self.shared = policy.transformer.pos_embed
            self.head = nn.Linear(4 * 8 * 8, 1)

        def value(self, z_t, sigma, prompts):
            return self.head(z_t.flatten(1)).squeeze(-1)

    critic = LinearCritic()
    stitch, rest = cotrain.select_parameters(critic, "all", policy.parameters())
    assert stitch == [] and {id(p) for p in rest} == {id(p) for p in critic.head.parameters()}
    with pytest.raises(ConfigError, match="needs a StitchVM"):
        cotrain.select_parameters(critic, "stitch", policy.parameters())
    from critics.baselines import TweedieCritic

    reward = TinyReward()
    with pytest.raises(ConfigError, match="no parameters of its own"):  # tweedie = the policy + the reward
        cotrain.select_parameters(TweedieCritic(policy, reward), "all", [*policy.parameters(), *reward.parameters()])
    assert cotrain.cotrain_config(None).enabled is False and cotrain.cotrain_config(True).enabled is True
    assert cotrain.cotrain_config({"enabled": True, "params": "stitch"}).params == "stitch"
    with pytest.raises(ConfigError, match="critic.cotrain.lr"):
        cotrain.cotrain_config({"lr": 0})
    with pytest.raises(ConfigError, match="unknown key 'critic.cotrain.rate'"):
        cotrain.cotrain_config({"rate": 1})


# ------------------------------------------------------------------------------------------------ runs
def test_config_errors_through_train(tmp_path, capsys):
    assert train.main(["--algo", "nft", "--critic", "tweedie", "--config", TINY, "+critic.cotrain=true"]) == 2
    assert "does not co-train its critic" in capsys.readouterr().err
    base = ["--algo", "grpo", "--config", TINY, *DROP["grpo"], "+critic.cotrain=true"]
    assert train.main([*base, "--critic", "terminal", f"run.output_dir={tmp_path / 'terminal'}"]) == 2
    assert "terminal critic has no value to co-train" in capsys.readouterr().err
    assert train.main([*base, "--critic", "tweedie", f"run.output_dir={tmp_path / 'tweedie'}"]) == 2
    assert "no parameters of its own" in capsys.readouterr().err


@pytest.mark.parametrize("algo,overrides", [
    ("grpo", ["algo.advantages=dense", "algo.timestep_fraction=0.5"]),
    ("ddpo", ["algo.timestep_fraction=0.5", "algo.inner_epochs=1"]),
    ("draft", ["reward._component_=tests.rl.test_draft.Redness"]),
])
def test_smoke_run_with_stitchvm_cotraining(tmp_path, algo, overrides):
    out = run_tiny(tmp_path, algo, "terminal", CRITIC, "+critic.cotrain.enabled=true", "+critic.cotrain.lr=1e-3",
                   *overrides)
    rows = [r for r in metrics(out) if "critic/train_mse" in r]
    assert len(rows) == 2 and all("critic/value_mse@sigma<=1.00" in r for r in rows)
    saved = load_file(out / "checkpoints" / "step_00000002" / "critic.safetensors")
    assert any(k.startswith("stitch.") for k in saved) and any(k.startswith("tail.") for k in saved)


def test_resume_restores_the_cotrained_critic(tmp_path):
    common = [CRITIC, "+critic.cotrain.enabled=true", "+critic.cotrain.lr=1e-3", "algo.advantages=dense",
              "algo.timestep_fraction=0.5", "run.eval_every=0"]
    full = run_tiny(tmp_path, "grpo", "terminal", "run.max_epochs=3", *common, name="full")
    part = run_tiny(tmp_path, "grpo", "terminal", "run.max_epochs=2", *common, name="part")
    assert train.main(["--algo", "grpo", "--critic", "terminal", "--config", TINY, *DROP["grpo"],
                       f"run.output_dir={part}", "run.max_epochs=3", *common, "--resume", "latest"]) == 0
    for group in ("critic", "lora_default"):
        a = load_file(full / "checkpoints" / "step_00000003" / f"{group}.safetensors")
        b = load_file(part / "checkpoints" / "step_00000003" / f"{group}.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ several processes
def _cotrain_on_two_processes(rank: int, port: int, out_dir: str):
    """One process of a 2-process gloo group: process 1's rewards are all non-finite, so it holds no row to train on;
    it must still join the step's collectives (before the fix it returned early and process 0 waited forever)."""
    import datetime

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        policy = tiny_policy()
        critic = tiny_stitchvm_critic(policy, None)
        latents, sigmas, prompts = trajectories(policy, 3, seed=0)
        rewards = torch.full((3,), -0.8) if rank == 0 else torch.full((3,), float("nan"))
        trainer = cotrain.CriticTrainer(critic, cotrain.CotrainConfig(enabled=True, lr=1e-2, updates_per_epoch=2,
                                                                      batch_size=8), list(policy.parameters()))
        out = trainer.update(latents, sigmas, rewards, prompts, torch.Generator().manual_seed(rank))
        torch.save({"out": out, "params": [p.detach().clone() for p in trainer.params]}, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_a_process_without_finite_rewards_joins_the_critic_step(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_cotrain_on_two_processes, args=(port, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["out"]["critic/skipped_updates"] == 0 and r0["out"]["critic/train_mse"] > 0
    assert "critic/train_mse" not in r1["out"]  # it had no loss of its own, but took the same steps
    for a, b in zip(r0["params"], r1["params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_trajectory_values_at_a_mask_of_pairs():
    """A (B, K+1) bool mask asks the critic at exactly those (row, latent) pairs, in any batch size."""

    class Probe:
        def value(self, z, sigma, prompts):  # a value that names its input: sum of the latent + 10 * sigma
            return z.flatten(1).sum(1) + 10 * sigma

    latents = torch.randn(5, 4, 2, 3, 3)
    sigmas = torch.tensor([1.0, 0.6, 0.3, 0.0])
    mask = torch.rand(5, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    for batch in (1, 3, 64):
        out = cotrain.trajectory_values(Probe(), latents, sigmas, ["p"] * 5, batch, mask)
        want = latents.flatten(2).sum(2) + 10 * sigmas
        torch.testing.assert_close(out[mask], want[mask])
        assert bool(out[~mask].isnan().all())
    with pytest.raises(ValueError, match="bool"):
        cotrain.trajectory_values(Probe(), latents, sigmas, ["p"] * 5, 8, mask.float())
