"""Flow-GRPO: the clipped ratio and KL term against hand-derived values, sparse / dense advantages, re-scoring a
rollout with the unchanged policy gives ratio 1, config errors, smoke runs through rl/train.py."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from policies import samplers
from policies.testing import tiny_policy
from rl import grpo, train
from rl import policy_gradient as pg
from rl.advantages import (calibrate_values, calibration_slope, dense_advantages, dense_step_advantages, gae_advantages,
                           normalize_step_advantages, ode_values, value_steps)

TINY = str(Path(__file__).with_name("tiny.yaml"))
# tiny.yaml's algo node is DiffusionNFT's; these are the keys each trainer does not have
DROP = {"grpo": ["~algo.tau_min", "~algo.tau_max"], "ddpo": ["~algo.tau_min", "~algo.tau_max"],
        "draft": ["~algo.group_size", "~algo.rollout_batch_size"]}


def run_tiny(tmp_path, algo, critic, *overrides, name=None):
    """A 2-epoch run of the tiny policy through rl/train.py; returns the run directory."""
    out = tmp_path / (name or f"{algo}-{critic}")
    rc = train.main(["--algo", algo, "--critic", critic, "--config", TINY, *DROP[algo], f"run.output_dir={out}",
                     *overrides])
    assert rc == 0
    return out


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def lora_moved(run_dir):
    sd = load_file(run_dir / "lora" / "pytorch_lora_weights.safetensors")
    b = [v for k, v in sd.items() if "lora_B" in k]
    return bool(b) and max(v.abs().max().item() for v in b) > 0  # B starts at 0


# ------------------------------------------------------------------------------------------------ loss
def test_clipped_ratio_and_kl_hand_derived():
    log_old = torch.zeros(3)
    log_new = torch.log(torch.tensor([1.5, 0.5, 1.0])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 2.0])
    mean, mean_ref, std = torch.full((3, 2), 2.0), torch.zeros(3, 2), torch.full((3, 1), 0.5)
    out = pg.clipped_pg_loss(log_new, log_old, adv, 0.2, mean, mean_ref, std, kl_beta=0.1)
    # rho = [1.5, 0.5, 1]; max(-A rho, -A clip(rho, .8, 1.2)) = [max(-1.5, -1.2), max(.5, .8), -2] = [-1.2, .8, -2]
    assert out.policy_loss.item() == pytest.approx(-0.8)
    assert out.kl.item() == pytest.approx(8.0)  # (2 - 0)^2 / (2 * 0.5^2)
    assert out.loss.item() == pytest.approx(-0.8 + 0.1 * 8.0)
    assert out.clipfrac.item() == pytest.approx(2 / 3)
    assert out.approx_kl.item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3)
    out.policy_loss.backward()
    # clipped rows carry no gradient; row 3: d(-A rho)/d log pi = -A rho / 3
    torch.testing.assert_close(log_new.grad, torch.tensor([0.0, 0.0, -2 / 3]))


# ------------------------------------------------------------------------------------------------ advantages
def test_sparse_group_advantages_zero_mean_shared_over_steps():
    cfg = grpo.GRPOConfig(group_size=3, rollout_batch_size=6, adv_clip=100.0)
    rewards = torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0, 5.0])
    mask = torch.tensor([[True, True, False, True]]).expand(6, -1)
    adv = grpo.grpo_advantages(rewards, None, mask, cfg)
    torch.testing.assert_close(adv.view(2, 3, 4).sum(1), torch.zeros(2, 4), atol=1e-5, rtol=0)
    assert (adv[:, 2] == 0).all() and (adv[3:] == 0).all()  # ODE step; a constant group has no signal
    torch.testing.assert_close(adv[:, 0], adv[:, 1])
    std = rewards[:3].std(unbiased=False)
    torch.testing.assert_close(adv[:3, 0], (rewards[:3] - 3.0) / (std + 1e-4))
    assert grpo.grpo_advantages(rewards, None, mask, grpo.GRPOConfig(group_size=3, rollout_batch_size=6,
                                                                      adv_clip=0.5)).abs().max() == 0.5


def test_dense_advantages_telescope():
    values = torch.tensor([[0.2, 0.5, 0.4, 0.9], [1.0, 0.0, -1.0, 3.0]])
    lam0 = gae_advantages(values, 0.0)
    torch.testing.assert_close(lam0.sum(1), values[:, -1] - values[:, 0])  # sum of value gains = R - V(z_0)
    torch.testing.assert_close(lam0, dense_step_advantages(values))
    torch.testing.assert_close(gae_advantages(values, 1.0), values[:, -1:] - values[:, :-1])  # R - V(z_k)
    # lambda = 1/2 by hand on [0, 1, 3]: delta = [1, 2]; A_1 = 2, A_0 = 1 + 2 / 2 = 2
    torch.testing.assert_close(gae_advantages(torch.tensor([[0.0, 1.0, 3.0]]), 0.5), torch.tensor([[2.0, 2.0]]))


def test_ode_values_carry_V_exactly_across_deterministic_steps():
    """V(z_N) = R and V(z_k) = V(z_k+1) across ODE steps; the critic is read only where a stochastic step begins
    (NaN elsewhere is never read), so a Fast window's advantages sum to R - V(z_window start)."""
    nan = math.nan
    values = torch.tensor([[nan, 0.2, 0.5, nan, nan], [nan, 1.0, -1.0, nan, 7.0]])  # (B, N+1), N = 4
    mask = torch.tensor([False, True, True, False]).expand(2, -1)                   # window = steps 1, 2
    rewards = torch.tensor([0.9, 3.0])
    v = ode_values(values, rewards, mask)
    torch.testing.assert_close(v, torch.tensor([[0.2, 0.2, 0.5, 0.9, 0.9], [1.0, 1.0, -1.0, 3.0, 3.0]]))
    assert value_steps(mask) == [1, 2]
    adv = gae_advantages(v, 0.0)  # window: [V(z_2) - V(z_1), R - V(z_2)], ODE steps 0
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.3, 0.4, 0.0], [0.0, -2.0, 4.0, 0.0]]))
    torch.testing.assert_close(adv.sum(1), rewards - values[:, 1])
    # every step stochastic: only the last latent changes (V(z_N) = R), as before exact_ode existed
    full = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5]])
    torch.testing.assert_close(ode_values(full, torch.tensor([2.0]), torch.ones(1, 4, dtype=torch.bool)),
                               torch.tensor([[0.1, 0.2, 0.3, 0.4, 2.0]]))
    # the critic-everywhere variant reads the ODE tail's values instead of R
    finite = torch.tensor([[0.0, 0.2, 0.5, 0.6, 0.7], [0.0, 1.0, -1.0, 2.0, 7.0]])
    crit = dense_advantages(finite, rewards, mask, 0.0, 2, "none", exact_ode=False)
    torch.testing.assert_close(crit[:, 1:3], torch.tensor([[0.3, 0.1], [-2.0, 3.0]]) - torch.tensor([[-0.85, 1.55]]))  # centred per step
    with pytest.raises(ValueError, match="disagree"):
        ode_values(values, rewards, mask[:, :3])


def test_value_calibration_recovers_a_planted_slope_and_keeps_the_telescope():
    """calibrate_values: V's within-group deviations times the within-group LS slope of R on V, per latent."""
    torch.manual_seed(0)
    P, G = 400, 8
    v_star = torch.randn(P * G)                                   # E[R | z_1] within groups
    shift = torch.randn(P).repeat_interleave(G)                   # per-group offsets: removed by centring
    noisy = 3.0 * v_star + 0.5 * torch.randn(P * G) + 5.0 + shift  # a critic on another scale
    # latents z_0..z_4 of a 3-step window at steps 1-3: z_1 is shared within a group (group noise), the critic is
    # read at z_1..z_3, and z_4's entry is replaced by R
    values = torch.stack([torch.full((P * G,), math.nan), shift, noisy, -noisy, torch.full((P * G,), 9.0)], 1)
    rewards = v_star + 0.5 * torch.randn(P * G)
    out, beta = calibrate_values(values, rewards, G)
    assert math.isnan(beta[0]) and bool(out[:, 0].isnan().all())  # not valued: left alone
    assert beta[2].item() == pytest.approx(3.0 / 9.25, rel=0.05)    # cov(V, R) / var(V) = 3 / (9 + 0.25)
    assert beta[1].item() == 0.0 and beta[3].item() == 0.0 and beta[4].item() == 0.0  # no spread; negative; constant
    dev = lambda x: (x.view(P, G) - x.view(P, G).mean(1, keepdim=True)).flatten()  # noqa: E731
    torch.testing.assert_close(dev(out[:, 2]), beta[2] * dev(noisy))
    torch.testing.assert_close(out[:, 2].view(P, G).mean(1), noisy.view(P, G).mean(1))  # group means kept
    torch.testing.assert_close(out[:, 1], shift)
    # through dense_advantages: the window's advantages still sum to R - mean_group R, the step-1 share shrinks
    mask = torch.tensor([False, True, True, True]).expand(P * G, -1)
    plain = dense_advantages(values, rewards, mask, 0.0, G, "none")
    calibrated = dense_advantages(values, rewards, mask, 0.0, G, "none", calibrate=True)
    for adv in (plain, calibrated):
        torch.testing.assert_close(adv.sum(1), dev(rewards))
    torch.testing.assert_close(calibrated[:, 1], beta[2] * dev(noisy))
    assert calibration_slope(values, rewards, G) == pytest.approx(beta[1:].mean().item())
    with pytest.raises(ValueError, match="groups of >= 2"):
        calibrate_values(values, rewards, 1)


def test_calibration_of_a_latent_asked_in_some_groups_uses_those_groups():
    """values_at: trained asks a latent in some groups only: its slope is the one of those groups alone, and the
    other groups' entries stay NaN."""
    torch.manual_seed(1)
    P, G = 300, 4
    v = torch.randn(P * G, 3)
    rewards = 2.0 * v[:, 1] + torch.randn(P * G)
    partial = v.clone()
    holes = torch.rand(P) < 0.5
    partial[holes.repeat_interleave(G), 1] = math.nan  # column 1 not asked in half of the groups
    out, beta = calibrate_values(partial, rewards, G)
    keep = (~holes).repeat_interleave(G)
    sub_out, sub_beta = calibrate_values(v[keep], rewards[keep], G)
    assert beta[1].item() == pytest.approx(sub_beta[1].item(), rel=1e-5)
    torch.testing.assert_close(out[keep, 1], sub_out[:, 1])
    assert bool(out[~keep, 1].isnan().all())
    torch.testing.assert_close(beta[[0, 2]], calibrate_values(v, rewards, G)[1][[0, 2]])  # whole columns unchanged


def test_reward_metrics_separate_the_within_group_spread_from_the_batch():
    # two groups of 3: rewards 0, 1, 2 and 10, 11, 12. Within-group std 1 in each; the batch's std mixes prompts.
    r = torch.tensor([0.0, 1.0, 2.0, 10.0, 11.0, 12.0])
    m = pg.reward_metrics(r, 3)
    assert m["reward/group_std"] == pytest.approx(1.0)
    assert m["reward/std"] == pytest.approx(float(np.std(r.numpy(), ddof=1)))
    assert m["reward/mean"] == pytest.approx(6.0) and m["reward/nonfinite"] == 0
    # a group with a non-finite reward is left out of the group std (and of nothing else but the batch's finite stats)
    r[4] = math.nan
    m = pg.reward_metrics(r, 3)
    assert m["reward/group_std"] == pytest.approx(1.0) and m["reward/nonfinite"] == 1
    assert "reward/group_std" not in pg.reward_metrics(r, 1)  # DDPO without groups


def test_train_steps_shared_within_groups():
    from rl import policy_gradient as pg

    mask = torch.ones(12, 10, dtype=torch.bool)
    steps = pg.train_steps(mask, 0.2, torch.Generator().manual_seed(0), group_size=4)
    assert steps.shape == (12, 2)
    groups = steps.view(3, 4, 2)
    assert all(torch.equal(g[0], g[i]) for g in groups for i in range(4))
    assert not torch.equal(groups[0][0].sort().values, groups[1][0].sort().values) or not torch.equal(
        groups[1][0].sort().values, groups[2][0].sort().values)  # groups draw their own
    window = torch.zeros(8, 10, dtype=torch.bool)
    window[:, 3:5] = True
    assert set(pg.train_steps(window, 0.5, torch.Generator().manual_seed(0), 4).flatten().tolist()) <= {3, 4}
    with pytest.raises(ValueError, match="groups of 4"):
        pg.train_steps(torch.ones(6, 10, dtype=torch.bool), 0.2, torch.Generator(), 4)


def test_lambda_one_group_step_gives_the_first_shared_step_the_sparse_credit():
    """gae_lambda 1, dense_norm group_step, group noise: the window's first latent is shared within a group, so its
    step gets exactly GRPO's sparse (R - mean) / std for any critic, calibrated or not; the second step gets R minus
    the (calibrated) V(z_k+1), centred (docs/bench/trainers_session14.md)."""
    torch.manual_seed(1)
    P, G = 50, 8
    rewards = torch.rand(P * G)
    shared = torch.randn(P).repeat_interleave(G)           # V(z_1): z_1 is the same for the G samples of a prompt
    second = torch.randn(P * G)                             # V(z_2): any critic, here an uninformative one
    nan = torch.full((P * G,), math.nan)
    values = torch.stack([nan, shared, second, nan], 1)     # window = steps 1, 2 of N = 3
    mask = torch.tensor([False, True, True]).expand(P * G, -1)
    sparse = grpo.grpo_advantages(rewards, None, mask, grpo.GRPOConfig(advantages="sparse", group_size=G, adv_clip=1e9))
    for calibrate in (False, True):
        adv = dense_advantages(values, rewards, mask, 1.0, G, "group_step", eps=1e-4, calibrate=calibrate)
        torch.testing.assert_close(adv[:, 1], sparse[:, 1], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(adv[:, 2], sparse[:, 2])  # the second step's baseline is the critic's
    beta = calibrate_values(values, rewards, G)[1][2]
    assert 0 <= beta.item() < 0.5  # uninformative: the calibrated baseline is nearly the group mean


def test_dense_fast_window_calls_the_critic_only_in_the_window(tmp_path, monkeypatch):
    from rl import cotrain

    asked = []
    real = cotrain.trajectory_values

    def spy(critic, latents, sigmas, prompts, batch_size, steps=None):
        asked.append(steps)
        return real(critic, latents, sigmas, prompts, batch_size, steps)

    monkeypatch.setattr(cotrain, "trajectory_values", spy)
    out = run_tiny(tmp_path, "grpo", "tweedie", "algo.advantages=dense", "algo.sde_window=2",
                   "algo.sde_window_start=[0,2]", "algo.group_noise=true")
    assert lora_moved(out) and len(asked) == 2
    assert all(len(s) == 2 and s[1] == s[0] + 1 for s in asked)  # the window's two latents, not all N + 1
    rows = [r for r in metrics(out) if "loss/policy" in r]
    assert all(math.isfinite(r["adv/abs_mean"]) and r["adv/abs_mean"] > 0 for r in rows)


def test_resume_with_other_algo_settings_is_a_clear_error():
    from rl.common import check_same_settings
    from rl.config import ConfigError

    saved = {"lr": 0.0003, "sde_window_start": [0, 4], "advantages": "dense"}
    same_after_json = {"lr": 3e-4, "sde_window_start": (0, 4), "advantages": "dense"}
    check_same_settings(saved, same_after_json, "ckpt")
    check_same_settings(None, {"lr": 1.0}, "ckpt")  # nothing recorded: nothing to compare
    with pytest.raises(ConfigError, match=r"algo.exact_ode \(saved '<absent>', now True\), algo.lr \(saved 0.0003, "
                                          r"now 0.0001\)"):
        check_same_settings(saved, {"lr": 1e-4, "sde_window_start": [0, 4], "advantages": "dense", "exact_ode": True},
                            "ckpt")


def test_resume_of_a_run_saved_before_values_at():
    """values_at (session 16) at its default runs as runs saved before it did: they resume; 'trained' is a change."""
    from rl.common import check_same_settings
    from rl.config import ConfigError

    saved = {"lr": 3e-4, "advantages": "dense", "gae_lambda": 1.0}
    check_same_settings(saved, {**saved, "values_at": "stochastic"}, "ckpt")
    with pytest.raises(ConfigError, match=r"algo.values_at \(saved '<absent>', now 'trained'\)"):
        check_same_settings(saved, {**saved, "values_at": "trained"}, "ckpt")
    with pytest.raises(ConfigError, match="values_at"):  # recorded and changed
        check_same_settings({**saved, "values_at": "trained"}, {**saved, "values_at": "stochastic"}, "ckpt")


def test_resume_across_the_session_15_dense_defaults():
    """A sparse run saved before the dense defaults changed resumes (the sparse estimator never reads them); a dense
    one is refused with the overrides that restore its settings."""
    from rl.common import check_same_settings
    from rl.config import ConfigError

    old = {"lr": 3e-4, "gae_lambda": 0.0, "dense_norm": "global", "dense_calibration": "none", "exact_ode": True}
    new = {"lr": 3e-4, "gae_lambda": 1.0, "dense_norm": "group_step", "dense_calibration": "batch", "exact_ode": True}
    check_same_settings({**old, "advantages": "sparse"}, {**new, "advantages": "sparse"}, "ckpt")
    with pytest.raises(ConfigError, match=r"algo.gae_lambda \(saved 0.0, now 1.0\).*add algo.gae_lambda=0.0 "
                                          r"algo.dense_norm=global algo.dense_calibration=none to resume it"):
        check_same_settings({**old, "advantages": "dense"}, {**new, "advantages": "dense"}, "ckpt")
    with pytest.raises(ConfigError, match="algo.lr") as err:  # a sparse run still checks every other key
        check_same_settings({**old, "advantages": "sparse"}, {**new, "advantages": "sparse", "lr": 1e-4}, "ckpt")
    assert "gae_lambda" not in str(err.value) and "session 15" not in str(err.value)


def test_resume_with_another_algo_names_the_cause():
    from rl.common import check_same_settings
    from rl.config import ConfigError

    nft_like, grpo_like = {"lr": 1e-4, "nft_beta": 1.0, "tau_min": 2}, {"lr": 3e-4, "clip_range": 1e-4, "kl_beta": 0.04}
    with pytest.raises(ConfigError, match=r"trained with another --algo: .*lacks \(nft_beta, tau_min\) and lack "
                                          r"\(clip_range, kl_beta\)"):
        check_same_settings(nft_like, grpo_like, "ckpt")
    with pytest.raises(ConfigError, match="other algo settings: algo.kl_beta"):  # a key added since: not another algo
        check_same_settings({"lr": 3e-4}, {"lr": 3e-4, "kl_beta": 0.04}, "ckpt")


def test_resume_checks_the_critic_reward_model_prompts_and_seed():
    from rl.common import check_same_run
    from rl.config import ConfigError

    saved = {"algo": {"lr": 1e-4}, "critic": {"_component_": "critics.baselines.TerminalCritic"},
             "reward": {"_component_": "r"}, "model": {"_component_": "m"},
             "prompts": {"train": {"n": 8}, "eval": {"n": 4}}, "run": {"seed": 0, "max_epochs": 10}}
    same = json.loads(json.dumps(saved))
    same["run"]["max_epochs"] = 20  # budgets, evaluation and logging may change
    same["prompts"]["eval"] = {"n": 512}
    check_same_run(saved, same, "ckpt")
    check_same_run(None, same, "ckpt")
    check_same_run({"algo": {"lr": 1e-4}}, same, "ckpt")  # a checkpoint that recorded less: only what it has
    for path, value, message in (
            (("critic", "_component_"), "critics.load.stitchvm", r"other critic settings: critic._component_ \(saved"),
            (("critic", "cotrain"), {"enabled": True}, r"critic.cotrain \(saved '<absent>'"),
            (("prompts", "train", "n"), 16, r"other prompts.train settings: prompts.train.n"),
            (("run", "seed"), 7, r"other run.seed settings: run.seed \(saved 0, now 7\)")):
        changed = json.loads(json.dumps(saved))
        node = changed
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(ConfigError, match=message):
            check_same_run(saved, changed, "ckpt")


def test_normalize_step_advantages():
    adv = torch.tensor([[1.0, 5.0, 9.0], [3.0, 1.0, 9.0], [0.0, 2.0, 9.0], [4.0, 2.0, 9.0]])
    mask = torch.tensor([True, True, False]).expand(4, -1)
    out = normalize_step_advantages(adv, mask, group_size=2, scale="none")
    torch.testing.assert_close(out, torch.tensor([[-1.0, 2, 0], [1, -2, 0], [-2, 0, 0], [2, 0, 0]]))
    glob = normalize_step_advantages(adv, mask, 2, "global", eps=0.0)
    assert (glob[mask] ** 2).mean().item() == pytest.approx(1.0)
    torch.testing.assert_close(glob, out / (out[mask] ** 2).mean().sqrt())
    per = normalize_step_advantages(adv, mask, 2, "group_step", eps=1e-4)  # each (group, step): +-1, or 0 if constant
    torch.testing.assert_close(per[:, :2].abs(), torch.tensor([[1.0, 1], [1, 1], [1, 0], [1, 0]]), rtol=0, atol=2e-4)
    with pytest.raises(ValueError, match="same stochastic steps"):
        normalize_step_advantages(adv, torch.tensor([[True] * 3, [False] * 3, [True] * 3, [True] * 3]), 2)


# ------------------------------------------------------------------------------------------------ re-scoring
@pytest.mark.parametrize("guidance_scale,window,sde_type", [(1.0, None, "flow"), (2.5, [1, 2], "flow"),
                                                            (1.0, None, "cps"), (2.5, [1, 2], "cps")])
def test_rescore_unchanged_policy_gives_ratio_one(guidance_scale, window, sde_type):
    policy = tiny_policy()
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    g = torch.Generator().manual_seed(0)
    sigmas = policy.sigmas(4, "cpu")
    with torch.no_grad():
        cond = policy.encode_prompts(prompts)
        traj = samplers.sample(policy.velocity_fn(cond, guidance_scale), policy.noise(3, g), sigmas, eta=0.7,
                               sde_steps=window, generator=g, sde_type=sde_type)
    mask = traj.sde_mask.expand(3, -1)
    assert int(mask[0].sum()) == (2 if window else 4 - (sde_type == "cps"))  # CPS: the step into sigma 0 is an ODE step
    rollout = pg.SDERollout(prompts, traj.latents, sigmas, traj.log_probs, mask, torch.zeros(3), sde_type)
    for k in mask[0].nonzero().flatten().tolist():
        for rows in ([2, 0, 1], [1]):  # another batch composition than the rollout's
            idx = torch.tensor(rows)
            with torch.no_grad():
                out = pg.rescore(policy, rollout, idx, torch.full((len(rows),), k), policy.encode_prompts(
                    [prompts[i] for i in rows]), 0.7, guidance_scale)
            torch.testing.assert_close(out.log_prob, traj.log_probs[idx, k], rtol=0, atol=1e-5)
            ratio = torch.exp(out.log_prob - traj.log_probs[idx, k])
            torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)
    assert (traj.log_probs[:, ~traj.sde_mask] == 0).all()


@pytest.mark.parametrize("window", [0, 2])
def test_group_noise_shares_z_T_within_groups_only(window):
    """shared_noise_group = G: a group's rows start from one z_T and then differ only through the SDE noise; with a
    Fast window starting at step 1 they stay identical up to the window (the ODE steps before it are deterministic)."""
    from types import SimpleNamespace

    from accelerate import Accelerator
    from rl.metrics import Timer

    policy = tiny_policy()
    run = SimpleNamespace(policy=policy, accelerator=Accelerator(cpu=True), device=torch.device("cpu"),
                          timer=Timer(), reward=lambda images, prompts: images.mean(dim=(1, 2, 3)))
    rows = [p for p in ["a red circle", "two blue squares", "a green triangle"] for _ in range(2)]
    out = {}
    for G in (1, 2):
        rng = np.random.default_rng(0)
        rollout = pg.collect(run, rows, 4, 0.7, 1.0, 6, window, (1, 1), rng, torch.Generator().manual_seed(0),
                             shared_noise_group=G)
        out[G] = rollout
    z = out[2].latents  # (6, 5, C, h, w)
    first_sde = 1 if window else 0
    for g in range(3):
        a, b = z[2 * g], z[2 * g + 1]
        torch.testing.assert_close(a[:first_sde + 1], b[:first_sde + 1], rtol=0, atol=0)  # same z_T (and ODE steps)
        assert (a[-1] - b[-1]).abs().max() > 1e-2  # the SDE steps separate them
    assert (z[0, 0] - z[2, 0]).abs().max() > 0.5  # other groups: other noise
    assert (out[1].latents[0, 0] - out[1].latents[1, 0]).abs().max() > 0.5  # G = 1: every row its own z_T
    torch.testing.assert_close(out[2].rewards, run.reward(policy.decode(z[:, -1]), rows))
    with pytest.raises(ValueError, match="whole groups of 4"):
        pg.collect(run, rows, 4, 0.7, 1.0, 6, 0, (0, 0), np.random.default_rng(0),
                   torch.Generator().manual_seed(0), shared_noise_group=4)


def test_group_noise_is_the_same_on_every_process():
    """Under 2 processes, rank 1 samples rows 3-5 of each round from the z_T a single process gives those rows (the
    round's noise is drawn whole on every rank, then sliced), so a group split over ranks still shares z_T."""
    import contextlib
    from types import SimpleNamespace

    from rl.metrics import Timer

    policy = tiny_policy()
    reward = lambda images, prompts: images.mean(dim=(1, 2, 3))  # noqa: E731
    rows = [p for p in ["a red circle", "two blue squares", "a green triangle"] for _ in range(2)]
    z_0 = {}
    for num, rank in ((1, 0), (2, 1)):
        accel = SimpleNamespace(num_processes=num, process_index=rank, autocast=contextlib.nullcontext)
        run = SimpleNamespace(policy=policy, accelerator=accel, device=torch.device("cpu"), timer=Timer(),
                              reward=reward)
        rollout = pg.collect(run, rows, 3, 0.7, 1.0, 6, 0, (0, 0), np.random.default_rng(0),
                             torch.Generator().manual_seed(0), shared_noise_group=2)
        z_0[num] = rollout.latents[:, 0]
    torch.testing.assert_close(z_0[2], z_0[1][3:], rtol=0, atol=0)
    torch.testing.assert_close(z_0[1][2], z_0[1][3], rtol=0, atol=0)  # the group straddling the ranks


def test_gradient_variance_of_identical_samples_is_zero():
    policy = tiny_policy()
    from peft import LoraConfig

    policy.transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], init_lora_weights="gaussian"))
    params = [p for n, p in policy.transformer.named_parameters() if "lora_" in n]
    g = torch.Generator().manual_seed(0)
    sigmas = policy.sigmas(2, "cpu")
    with torch.no_grad():
        traj = samplers.sample(policy.velocity_fn(policy.encode_prompts(["a red circle"])), policy.noise(1, g),
                               sigmas, eta=0.7, generator=g)
    rollout = pg.SDERollout(["a red circle"] * 3, traj.latents.expand(3, -1, -1, -1, -1), sigmas,
                            traj.log_probs.expand(3, -1), torch.ones(3, 2, dtype=torch.bool), torch.zeros(3))

    adv = torch.tensor([[1.0, -0.5]]).expand(3, -1)
    out = pg.gradient_variance(policy, rollout, {"a": adv, "b": 2 * adv}, params, 0.7, 1.0)
    assert out["pg/a/grad_sq"] > 0
    assert out["pg/a/var"] <= 1e-6 * out["pg/a/grad_sq"]  # identical samples: no variance
    assert out["pg/b/grad_sq"] == pytest.approx(out["pg/a/grad_sq"])  # scale-free after RMS normalisation
    # two different samples: positive variance
    rollout2 = rollout._replace(latents=torch.cat([traj.latents, traj.latents.flip(2), traj.latents.flip(3)]))
    out2 = pg.gradient_variance(policy, rollout2, {"a": adv}, params, 0.7, 1.0)
    assert out2["pg/a/var"] > 1e-3 * out2["pg/a/grad_sq"]


# ------------------------------------------------------------------------------------------------ runs
@pytest.mark.parametrize("algo", ["grpo", "ddpo", "draft"])
def test_shipped_algo_config_composes(algo, capsys):
    assert train.main(["--algo", algo, "--critic", "terminal", "--print-config"]) == 0
    assert "advantages" in capsys.readouterr().out or algo == "draft"


def spy_asked_and_trained(monkeypatch) -> tuple[list, list]:
    """Record each epoch's (row, latent) mask the critic is asked at, and the update's (steps, adv, inner_epochs,
    rescored): rescored holds the (row, step) pairs the update's log-prob re-scoring visits, per call."""
    from rl import cotrain
    from rl import policy_gradient as pg

    asked, trained = [], []
    real_values, real_update, real_rescore = cotrain.trajectory_values, pg.ppo_update, pg.rescore
    rescored: list[tuple[int, int]] = []

    def spy_rescore(policy, rollout, idx, steps, *args, **kwargs):
        rescored.extend(zip(idx.tolist(), steps.tolist()))
        return real_rescore(policy, rollout, idx, steps, *args, **kwargs)

    def spy_values(critic, latents, sigmas, prompts, batch_size, steps=None):
        asked.append(steps.clone())
        return real_values(critic, latents, sigmas, prompts, batch_size, steps)

    def spy_update(run, rollout, adv, optimizer, params, s, generator, steps=None):
        rescored.clear()
        out = real_update(run, rollout, adv, optimizer, params, s, generator, steps)
        trained.append((steps.clone(), adv.clone(), s.inner_epochs, list(rescored)))
        return out

    monkeypatch.setattr(cotrain, "trajectory_values", spy_values)
    monkeypatch.setattr(pg, "ppo_update", spy_update)
    monkeypatch.setattr(pg, "rescore", spy_rescore)
    return asked, trained


def assert_trains_exactly(steps, rescored, inner_epochs):
    """Every inner epoch re-scores each row at exactly its given steps (the KL reference may re-score them again)."""
    from collections import Counter

    want = Counter((row, int(k)) for row in range(steps.shape[0]) for k in steps[row].tolist())
    got = Counter(rescored)
    assert set(got) == set(want)
    per_pair = {got[p] for p in want}
    assert per_pair <= {inner_epochs, 2 * inner_epochs} and len(per_pair) == 1  # each pair once (or twice) per pass


def test_values_at_trained_asks_the_critic_only_where_each_group_trains(tmp_path, monkeypatch):
    """values_at: trained on a whole-trajectory SDE: the critic sees only the latents that begin each group's drawn
    steps (timestep_fraction of them, shared by the group's rows), and the update trains exactly those steps."""
    asked, trained = spy_asked_and_trained(monkeypatch)
    out = run_tiny(tmp_path, "grpo", "tweedie", "algo.advantages=dense", "algo.values_at=trained",
                   "algo.timestep_fraction=0.5", "algo.dense_norm=global", "algo.inner_epochs=2")
    assert lora_moved(out) and len(asked) == len(trained) == 2
    cfg = train.compose_config(train.parse_args(["--algo", "grpo", "--critic", "tweedie", "--config", TINY,
                                                 *DROP["grpo"]])).algo_cfg
    G, N = cfg.group_size, cfg.num_steps
    for mask, (steps, adv, inner, rescored) in zip(asked, trained):
        assert inner == 2
        assert_trains_exactly(steps, rescored, inner)
        assert mask.shape == (steps.shape[0], N + 1) and not mask[:, -1].any()
        assert steps.shape[1] == round(0.5 * N)
        expected = torch.zeros(steps.shape[0], N + 1, dtype=torch.bool).scatter_(1, steps.cpu(), True)
        assert torch.equal(mask.cpu(), expected)  # the critic's latents are exactly the trained steps'
        assert all(torch.equal(g[0], g[i]) for g in mask.view(-1, G, N + 1) for i in range(G))  # shared by a group
        untrained = torch.ones_like(adv, dtype=torch.bool).scatter_(1, steps, False)
        assert (adv[untrained] == 0).all() and adv[~untrained].abs().sum() > 0


def test_values_at_trained_config_errors(tmp_path, capsys):
    base = ["--algo", "grpo", "--critic", "tweedie", "--config", TINY, *DROP["grpo"], f"run.output_dir={tmp_path}",
            "algo.values_at=trained"]
    assert train.main(base) == 2  # sparse advantages read no values
    assert "algo.advantages=dense" in capsys.readouterr().err
    assert train.main([*base, "algo.advantages=dense", "algo.gae_lambda=0.5"]) == 2
    assert "gae_lambda 1" in capsys.readouterr().err


def test_config_errors(tmp_path, capsys):
    assert train.main(["--algo", "grpo", "--critic", "terminal", "--config", TINY, *DROP["grpo"], "algo.eta=0"]) == 2
    assert "eta > 0" in capsys.readouterr().err
    assert train.main(["--algo", "grpo", "--critic", "terminal", "--config", TINY, *DROP["grpo"],
                       "algo.rollout_batch_size=3"]) == 2
    assert "multiple of group_size" in capsys.readouterr().err
    assert train.main(["--algo", "grpo", "--critic", "terminal", "--config", TINY, *DROP["grpo"],
                       "algo.sde_window=2", "algo.sde_window_start=[1,3]"]) == 2
    assert "sde_window_start" in capsys.readouterr().err
    assert train.main(["--algo", "grpo", "--critic", "terminal", "--config", TINY, *DROP["grpo"],
                       f"run.output_dir={tmp_path}", "algo.advantages=dense"]) == 2
    assert "advantages=dense needs a value critic" in capsys.readouterr().err
    for bad, said in ((["algo.sde_type=cps", "algo.eta=1.3"], "eta must be in (0, 1]"),
                      (["algo.sde_type=ddim"], "sde_type"),
                      (["algo.sde_type=cps", "algo.sde_window=1", "algo.sde_window_start=[0,3]"], "1-step window")):
        assert train.main(["--algo", "grpo", "--critic", "terminal", "--config", TINY, *DROP["grpo"], *bad]) == 2
        assert said in capsys.readouterr().err


@pytest.mark.parametrize("critic,overrides", [
    ("terminal", ["algo.guidance_scale=2.0", "algo.sde_window=2", "algo.sde_window_start=[0,2]", "algo.group_noise=true"]),
    # Flow-CPS steps (the last one deterministic); one optimizer step per epoch: CPS's smaller stds at low sigma turn
    # tiny.yaml's lr-0.01 step into a ratio far from 1 on a second minibatch, so the logged ratio is the pre-update one
    ("terminal", ["algo.sde_type=cps", "algo.eta=0.8", "algo.train_batch_size=4"]),
    ("tweedie", ["algo.advantages=dense", "algo.gae_lambda=0.5", "algo.timestep_fraction=0.5",
                 "algo.dense_calibration=batch"]),
    ("mc", ["algo.advantages=dense", "algo.timestep_fraction=0.25", "critic.num_rollouts=2", "critic.num_steps=2",
            "algo.gae_lambda=0.0", "algo.dense_norm=global", "algo.dense_calibration=none"]),  # the pre-session-15 one
])
def test_smoke_run(tmp_path, critic, overrides):
    out = run_tiny(tmp_path, "grpo", critic, *overrides)
    assert lora_moved(out)
    rows = metrics(out)
    train_rows = [r for r in rows if "loss/policy" in r]
    assert len(train_rows) == 2 and any("eval/score" in r for r in rows)
    assert all(r["policy/ratio"] == pytest.approx(1.0, abs=1e-3) for r in train_rows)
    assert ("critic/value_mse@sigma<=1.00" in train_rows[0]) == (critic != "terminal")
    assert all(r["reward/group_std"] >= 0 for r in train_rows)
    calibrated = critic != "terminal" and "algo.dense_calibration=none" not in overrides  # the dense default: batch
    assert ("adv/value_slope" in train_rows[0]) == calibrated


@pytest.mark.parametrize("algo", ["grpo", "ddpo"])
def test_ema_adapter_is_the_warmed_up_average_and_is_what_is_exported(tmp_path, monkeypatch, algo):
    """algo.ema_decay: after optimizer step s, ema <- d_s ema + (1 - d_s) default with d_s = min(d, (1+s)/(10+s))
    counted over the run; the checkpoint's "ema" adapter equals that recursion replayed over the recorded "default"
    states, and the exported LoRA is the EMA, not the trained adapter."""
    from policies import lora
    from rl import common
    from rl.checkpoint import load_checkpoint

    calls, real = [], lora.ema_update

    def recording(transformer, src, dst, decay):
        if decay == 0:  # lora.copy_adapter: the EMA starts as a copy of the trained adapter
            return real(transformer, src, dst, decay)
        if not calls:
            calls.append(("init", {k: p.detach().double().clone()
                                   for k, p in lora.adapter_parameters(transformer, dst).items()}))
        calls.append((decay, {k: p.detach().double().clone()
                              for k, p in lora.adapter_parameters(transformer, src).items()}))
        real(transformer, src, dst, decay)

    monkeypatch.setattr(lora, "ema_update", recording)
    extra = ["algo.group_size=2", "algo.group_noise=true"] if algo == "ddpo" else []
    out = run_tiny(tmp_path, algo, "terminal", "algo.ema_decay=0.9", "run.max_epochs=3", *extra)
    per_epoch = (4 // 2) * (2 if algo == "ddpo" else 1)  # 4 rollouts / train batch 2, x inner epochs
    assert pg.steps_per_epoch(4, 2, 2 if algo == "ddpo" else 1) == per_epoch
    assert [d for d, _ in calls[1:]] == pytest.approx([common.ema_decay_at(0.9, s) for s in range(3 * per_epoch)])
    assert [common.ema_decay_at(0.9, s) for s in (0, 1, 80, 1000)] == pytest.approx([0.1, 2 / 11, 0.9, 0.9])
    assert metrics(out)[-2]["train/ema_decay"] == pytest.approx(common.ema_decay_at(0.9, 3 * per_epoch - 1))
    ema = calls[0][1]
    for decay, default in calls[1:]:
        ema = {k: decay * ema[k] + (1 - decay) * default[k] for k in ema}
    ckpt = load_checkpoint(out).tensors
    # adapter_parameters names carry the adapter name; the checkpoint's peft state dict does not
    saved = {k: v.double() for k, v in ckpt["lora_ema"].items()}
    replay = {k.replace(".ema.", ".").replace(".ema", ""): v for k, v in ema.items()}
    assert sorted(saved) == sorted(replay)
    for k in saved:
        torch.testing.assert_close(saved[k], replay[k], rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(ckpt["lora_ema"][k], ckpt["lora_default"][k]) for k in saved if "lora_B" in k)
    exported = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert len(exported) == len(saved)
    for k, v in saved.items():
        torch.testing.assert_close(exported[f"transformer.{k}"].double(), v)


def test_evaluate_checkpoint_scores_the_ema_adapter_the_run_exported(tmp_path, capsys):
    from rl import evaluate

    out = run_tiny(tmp_path, "grpo", "terminal", "algo.ema_decay=0.9", "run.max_epochs=3")
    capsys.readouterr()
    final = metrics(out)[-1]["eval/score"]  # the run evaluated (and exported) its EMA adapter
    assert evaluate.main(["--lora", str(out / "lora"), "--config", TINY]) == 0
    lora_score = json.loads(capsys.readouterr().out)["eval/score"]
    assert evaluate.main(["--checkpoint", str(out), "--config", TINY]) == 0
    captured = capsys.readouterr()
    assert "adapter last (EMA)" in captured.err
    assert json.loads(captured.out)["eval/score"] == pytest.approx(final, abs=1e-6) == pytest.approx(lora_score, abs=1e-6)


def test_resume_with_another_adapter_set_is_a_clear_error(tmp_path, capsys):
    out = run_tiny(tmp_path, "grpo", "terminal", "run.max_epochs=1")
    rc = train.main(["--algo", "grpo", "--critic", "terminal", "--config", TINY, *DROP["grpo"], f"run.output_dir={out}",
                     "algo.ema_decay=0.9", "run.max_epochs=2", "--resume", "latest"])
    err = capsys.readouterr().err
    assert rc == 2 and "other algo settings: algo.ema_decay (saved 0.0, now 0.9)" in err and "Traceback" not in err, err
    # another LoRA rank: the settings check names the key before the adapter load could fail on shapes
    rc = train.main(["--algo", "grpo", "--critic", "terminal", "--config", TINY, *DROP["grpo"], f"run.output_dir={out}",
                     "algo.lora_rank=2", "run.max_epochs=2", "--resume", "latest"])
    err = capsys.readouterr().err
    assert rc == 2 and "lora_rank (saved 4, now 2)" in err and "Traceback" not in err, err
    # the same adapters, another estimator: refused before anything is loaded into the optimizer
    rc = train.main(["--algo", "grpo", "--critic", "terminal", "--config", TINY, *DROP["grpo"], f"run.output_dir={out}",
                     "algo.global_std=true", "run.max_epochs=2", "--resume", "latest"])
    err = capsys.readouterr().err
    assert rc == 2 and "other algo settings: algo.global_std (saved False, now True)" in err and "Traceback" not in err, err
    config_before = (out / "config.yaml").read_text()
    # another --critic (e.g. the README's `--resume latest` without repeating the run's --critic flag)
    rc = train.main(["--algo", "grpo", "--critic", "tweedie", "--config", TINY, *DROP["grpo"], f"run.output_dir={out}",
                     "run.max_epochs=2", "--resume", "latest"])
    err = capsys.readouterr().err
    assert rc == 2 and "other critic settings: critic." in err and "Traceback" not in err, err
    assert (out / "config.yaml").read_text() == config_before  # a refused resume leaves the run's record alone
    # another run's checkpoint resumed into this output_dir would mix the two runs there
    other = tmp_path / "other"
    rc = train.main(["--algo", "grpo", "--critic", "terminal", "--config", TINY, *DROP["grpo"],
                     f"run.output_dir={other}", "run.max_epochs=2", "--resume", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and f"set run.output_dir={out.resolve()} to continue that run" in err, err
    assert not other.exists()
