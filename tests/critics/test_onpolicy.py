"""Stage 3 (critics/onpolicy.py): the loss against hand values, the schedule with inserted noise levels, the
build with init_from, and that on-policy regression lowers the value error on the policy's own trajectories."""

from __future__ import annotations

import json

import pytest
import torch

from critics import load
from critics.build import build, load_config
from critics.onpolicy import (VAR_MOMENTUM, OnPolicyConfig, debiased_ema, onpolicy_loss, sample_rollouts,
                              schedule_with_nodes)
from rl.config import ConfigError
from shapes.models import load_shapes_policy, load_shapes_reward
from tests.critics.tiny_world import BUILD_YAML, tiny_overrides

ONPOLICY = ["onpolicy.enabled=true", "onpolicy.steps=3", "onpolicy.trajectories=4", "onpolicy.latents_per_trajectory=2",
            "onpolicy.num_steps=[3,4]", "onpolicy.warmup_steps=1", "onpolicy.log_every=1", "onpolicy.ckpt_every=2",
            "onpolicy.progress=false"]


def test_loss_matches_hand_computation():
    cfg = OnPolicyConfig(lambda_value=2.0, lambda_embed=0.5, lambda_tok=3.0)
    value, reward = torch.tensor([0.5, 1.0, 0.0]), torch.tensor([1.0, 1.0, 1.0 - 3.0])
    s_emb, t_emb = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]), torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 5.0]])
    s_tok, t_tok = torch.zeros(3, 2, 2), torch.ones(3, 2, 2)
    out = onpolicy_loss(value, reward, s_emb, s_tok, t_emb, t_tok, 0.5, cfg)
    assert out.value_loss.item() == pytest.approx((0.25 + 0 + 4) / 3 / 0.5)
    assert out.embed_loss.item() == pytest.approx((0 + 2 + 0) / 3)  # ‖(1,0)−(0,1)‖² = 2
    assert out.token_loss.item() == pytest.approx(1.0)
    assert out.loss.item() == pytest.approx(2 * out.value_loss.item() + 0.5 * 2 / 3 + 3.0)


def test_schedule_keeps_the_base_nodes_and_hits_the_inserted_levels():
    base = torch.linspace(1, 0, 5)
    nodes = torch.tensor([0.6, 0.1, 0.75])  # 0.75 is already a node: not duplicated
    schedule, index = schedule_with_nodes(base, nodes)
    assert torch.all(schedule[1:] < schedule[:-1]) and schedule[0] == 1 and schedule[-1] == 0
    assert schedule.numel() == 7
    torch.testing.assert_close(schedule[index], nodes)


def test_rollouts_pair_each_latent_with_its_own_trajectory(world):
    policy = load_shapes_policy(weights_dir=world)
    g = torch.Generator().manual_seed(0)
    roll = sample_rollouts(policy, ["a red circle", "two blue squares"], 4, 1.0, 0.0, torch.tensor([0.5, 0.2]), g)
    assert roll.z_t.shape == (4, 4, 8, 8) and roll.images.shape[0] == 2
    assert roll.index.tolist() == [0, 0, 1, 1] and roll.prompts == ["a red circle"] * 2 + ["two blue squares"] * 2
    torch.testing.assert_close(roll.sigma.cpu(), torch.tensor([0.5, 0.2, 0.5, 0.2]))
    # eta = 0: the ODE from z_t at sigma 0.2 lands on the same x0 as the whole trajectory
    from critics.onpolicy import schedule_with_nodes as swn
    from policies import samplers

    schedule, idx = swn(policy.sigmas(4, "cpu"), torch.tensor([0.5, 0.2]))
    tail = schedule[int(idx[1]):]
    with torch.no_grad():
        z0 = samplers.sample(policy.velocity_fn(policy.encode_prompts(roll.prompts_x0), 1.0), roll.z_t[1::2],
                             tail).z_tau
    torch.testing.assert_close(policy.decode(z0), roll.images, rtol=1e-4, atol=1e-4)


def test_build_stage3_from_a_saved_critic(built, world, tmp_path):
    svm, _ = built
    out = tmp_path / "svm3"
    before = {k: v.clone() for k, v in svm.model.state_dict().items()}
    result = build(load_config(BUILD_YAML, tiny_overrides(world, out, f"init_from={svm.output_dir}", *ONPOLICY)))
    record = json.loads((out / "build.json").read_text())
    assert record["onpolicy_steps"] == 3 and record["init_from"]["path"] == str(svm.output_dir)
    assert "onpolicy/value_loss" in record["final"] and "distill_s" not in record["times"]
    assert (out / "interface.json").read_bytes() == (svm.output_dir / "interface.json").read_bytes()
    policy, reward = load_shapes_policy(weights_dir=world), load_shapes_reward(weights_dir=world)
    critic = load.stitchvm(policy, reward, out)
    after = result.model.state_dict()
    changed = {k for k in after if not torch.equal(after[k].cpu(), before[k].cpu())}
    assert changed and all(k.startswith(("stitch.", "tail.", "class_token")) for k in changed)  # head frozen
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(critic.value(z, 0.4, ["a red circle"] * 2), result.model.value(z, 0.4,
                                   ["a red circle"] * 2))


def test_stage3_from_a_saved_critic_keeps_its_stitch(built, world, tmp_path):
    svm, _ = built  # built with the default stitch (no blocks, ratio 8)
    for extra, message in (("stitch_blocks=2", "stitch_blocks: the critic at .* has stitch_blocks=0"),
                           ("bottleneck_ratio=4", "bottleneck_ratio: the critic at .* has bottleneck_ratio=8")):
        with pytest.raises(ConfigError, match=message):
            build(load_config(BUILD_YAML, tiny_overrides(world, tmp_path / "x", f"init_from={svm.output_dir}",
                                                         *ONPOLICY, extra)))
    assert not (tmp_path / "x").exists()


def test_init_from_needs_stage3_and_another_directory(world, tmp_path):
    with pytest.raises(ConfigError, match="onpolicy.enabled=true"):
        load_config(BUILD_YAML, tiny_overrides(world, tmp_path / "a", f"init_from={tmp_path}"))
    with pytest.raises(ConfigError, match="differ from output_dir"):
        load_config(BUILD_YAML, tiny_overrides(world, tmp_path / "a", f"init_from={tmp_path / 'a'}", *ONPOLICY))
    with pytest.raises(ConfigError, match="trajectories"):
        load_config(BUILD_YAML, tiny_overrides(world, tmp_path / "a", "onpolicy.trajectories=1"))


def test_regression_lowers_the_value_error_on_policy_trajectories(built, world, tmp_path):
    """A planted target the critic can reach: after stage 3 its values on fresh trajectories (held-out seed) are
    closer to the realised rewards than before."""
    from critics.onpolicy import onpolicy_finetune

    svm, _ = built
    policy, reward = load_shapes_policy(weights_dir=world), load_shapes_reward(weights_dir=world)
    critic = load.stitchvm(policy, reward, svm.output_dir)
    from shapes.data import prompts as shape_prompts

    train, held = shape_prompts("train", 256, 0), shape_prompts("train", 64, 99)

    def value_error() -> float:
        g = torch.Generator().manual_seed(123)
        roll = sample_rollouts(policy, held, 4, 1.0, 0.0, torch.tensor([0.3, 0.05]), g)
        with torch.no_grad():
            v = critic.value(roll.z_t, roll.sigma, roll.prompts)
            r = reward(roll.images, roll.prompts_x0)[roll.index]
        return (v - r).pow(2).mean().item()

    err0 = value_error()
    cfg = OnPolicyConfig(steps=40, trajectories=16, latents_per_trajectory=2, num_steps=[4], guidance_scales=[1.0],
                         eta=0.0, lr=3e-3, warmup_steps=2, lambda_embed=0.0, lambda_tok=0.0, progress=False)
    onpolicy_finetune(critic, policy, reward, train, cfg)
    err1 = value_error()
    assert err1 < 0.5 * err0, (err0, err1)


class _Brightness(torch.nn.Module):
    """A planted non-network target: the mean pixel of the finished image (what a checker-style reward is to the
    critic: a function of x0 with no tower to stitch onto)."""

    differentiable = False

    def forward(self, images, prompts):
        return images.float().mean((1, 2, 3)) * 4.0


def test_regression_onto_another_target_reward(built, world, tmp_path):
    """onpolicy.target: V regresses onto a reward that is not the stitched tower's; the tower stays the scorer."""
    from critics.onpolicy import onpolicy_finetune
    from shapes.data import prompts as shape_prompts

    svm, _ = built
    policy, reward = load_shapes_policy(weights_dir=world), load_shapes_reward(weights_dir=world)
    critic, target = load.stitchvm(policy, reward, svm.output_dir), _Brightness()
    train, held = shape_prompts("train", 256, 0), shape_prompts("train", 64, 99)

    def target_error() -> float:
        g = torch.Generator().manual_seed(123)
        roll = sample_rollouts(policy, held, 4, 1.0, 0.0, torch.tensor([0.3, 0.05]), g)
        with torch.no_grad():
            return (critic.value(roll.z_t, roll.sigma, roll.prompts) - target(roll.images, roll.prompts_x0)
                    [roll.index]).pow(2).mean().item()

    err0 = target_error()
    cfg = OnPolicyConfig(steps=40, trajectories=16, latents_per_trajectory=2, num_steps=[4], guidance_scales=[1.0],
                         eta=0.0, lr=3e-3, warmup_steps=2, lambda_embed=0.0, lambda_tok=0.0, progress=False)
    onpolicy_finetune(critic, policy, reward, train, cfg, target=target)
    assert target_error() < 0.5 * err0


def test_build_records_the_value_target_and_the_loader_needs_the_tower(built, world, tmp_path):
    from critics.rewards.shapes_eval import ShapesEvalReward

    svm, _ = built
    out = tmp_path / "svm_target"
    node = "onpolicy.target={_component_: critics.rewards.shapes_eval.ShapesEvalReward, criterion: score}"
    build(load_config(BUILD_YAML, tiny_overrides(world, out, f"init_from={svm.output_dir}", *ONPOLICY, node)))
    info = json.loads((out / "stitchvm.json").read_text())
    assert info["value_target"] == {"_component_": "critics.rewards.shapes_eval.ShapesEvalReward", "criterion": "score"}
    policy, tower = load_shapes_policy(weights_dir=world), load_shapes_reward(weights_dir=world)
    with pytest.raises(ValueError, match="critic.tower"):
        load.stitchvm(policy, ShapesEvalReward("score"), out)  # the run's reward is the checker: name the tower
    critic = load.stitchvm(policy, ShapesEvalReward("score"), out, tower=tower)
    assert critic.value(torch.randn(2, 4, 8, 8), 0.5, ["a red circle"] * 2).shape == (2,)


def test_loader_refuses_a_run_reward_that_is_not_the_critics(built, world, tmp_path):
    from critics.rewards.shapes_eval import ShapesEvalReward

    svm, _ = built
    out = tmp_path / "svm_target2"
    node = "onpolicy.target={_component_: critics.rewards.shapes_eval.ShapesEvalReward, criterion: score}"
    build(load_config(BUILD_YAML, tiny_overrides(world, out, f"init_from={svm.output_dir}", *ONPOLICY, node)))
    policy, tower = load_shapes_policy(weights_dir=world), load_shapes_reward(weights_dir=world)
    with pytest.raises(ValueError, match="predicts critics.rewards.shapes_eval.ShapesEvalReward"):
        load.stitchvm(policy, tower, out)                                         # a checker critic on a CLIP run
    with pytest.raises(ValueError, match="criterion='overall'"):
        load.stitchvm(policy, ShapesEvalReward("overall"), out, tower=tower)      # another criterion
    with pytest.raises(ValueError, match="drop critic.tower"):
        load.stitchvm(policy, ShapesEvalReward("score"), svm.output_dir, tower=tower)  # a CLIP critic on a checker run


def test_a_checker_critic_can_seed_another_build(built, world, tmp_path):
    svm, _ = built
    node = "onpolicy.target={_component_: critics.rewards.shapes_eval.ShapesEvalReward, criterion: score}"
    first, second = tmp_path / "chk1", tmp_path / "chk2"
    build(load_config(BUILD_YAML, tiny_overrides(world, first, f"init_from={svm.output_dir}", *ONPOLICY, node)))
    build(load_config(BUILD_YAML, tiny_overrides(world, second, f"init_from={first}", *ONPOLICY)))  # back to CLIP
    assert "value_target" in json.loads((first / "stitchvm.json").read_text())
    assert "value_target" not in json.loads((second / "stitchvm.json").read_text())  # regressed onto the tower again
    policy, tower = load_shapes_policy(weights_dir=world), load_shapes_reward(weights_dir=world)
    assert load.stitchvm(policy, tower, second).value(torch.randn(1, 4, 8, 8), 0.5, ["a red circle"]).shape == (1,)


def test_sigma_range_bounds_the_inserted_noise_levels(built, world, tmp_path, monkeypatch):
    from critics import onpolicy

    seen, real = [], onpolicy.sample_rollouts

    def recording(policy, prompts, num_steps, guidance, eta, sigmas, generator):
        seen.append(sigmas.clone())
        return real(policy, prompts, num_steps, guidance, eta, sigmas, generator)

    monkeypatch.setattr(onpolicy, "sample_rollouts", recording)
    svm, _ = built
    build(load_config(BUILD_YAML, tiny_overrides(world, tmp_path / "low", f"init_from={svm.output_dir}", *ONPOLICY,
                                                 "onpolicy.sigma_range=[0.2,0.4]")))
    levels = torch.cat(seen)
    assert len(seen) == 3 and levels.numel() == 6 and bool(((levels >= 0.2) & (levels <= 0.4)).all())
    with pytest.raises(ConfigError, match=r"sigma_range: need 0 <= lo < hi <= 1"):
        load_config(BUILD_YAML, tiny_overrides(world, tmp_path / "a", "onpolicy.sigma_range=[0.5,0.5]"))


def test_debiased_ema_is_the_weighted_mean_of_the_batches_so_far():
    # step 0: the first batch itself; step 1: (m·a + b) / (1 + m); a constant input is returned exactly at every step
    m = VAR_MOMENTUM
    ema, est = debiased_ema(0.0, 4.0, 0)
    assert est == pytest.approx(4.0, rel=1e-12)
    ema, est = debiased_ema(ema, 1.0, 1)
    assert est == pytest.approx((m * 4.0 + 1.0) / (1 + m), rel=1e-12)
    ema = 0.0
    for step in range(300):
        ema, est = debiased_ema(ema, 0.25, step)
        assert est == pytest.approx(0.25, rel=1e-9)
