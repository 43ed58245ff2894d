"""critics.bench_value: schedule with exact sigmas, retrieval scoring, target checks, and a --quick run."""

from __future__ import annotations

import json

import pytest
import torch

from critics import bench_value as bv
from policies import samplers
from policies.testing import tiny_policy


def test_schedule_inserts_the_benchmark_sigmas_exactly():
    policy = tiny_policy()
    base = policy.sigmas(6, "cpu")
    schedule = bv.schedule_with(policy, 6, bv.SIGMAS)
    assert (schedule[:-1] > schedule[1:]).all() and schedule[-1] == 0 and schedule[0] == base[0]
    for s in (*bv.SIGMAS, *base.tolist()):
        assert (schedule - s).abs().min() < 1e-7
    assert len(schedule) == len(base) + len(bv.SIGMAS)  # none of them coincides with a node of this schedule


def test_trajectory_latents_are_the_odes_own_states_at_sigma():
    policy = tiny_policy()
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    latents = bv.trajectory_latents(policy, prompts, (0.25, 0.75), num_steps=6, guidance=1.0, batch_size=2)
    schedule = bv.schedule_with(policy, 6, (0.25, 0.75))
    z_T = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(bv.SAMPLE_SEED))
    with torch.no_grad():
        traj = samplers.sample(policy.velocity_fn(policy.encode_prompts(prompts)), z_T, schedule)
    for s in (0.25, 0.75):
        k = int(torch.argmin((schedule - s).abs()))
        assert schedule[k] == pytest.approx(s)
        torch.testing.assert_close(latents[s], traj.latents[:, k], rtol=1e-5, atol=1e-6)  # batching does not matter


def test_top1_in_groups_by_hand():
    txt = torch.eye(4)
    img = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    # image 1 picks caption 2: wrong unless the captions are equal
    assert bv.top1_in_groups(img, txt, ["a", "b", "c", "d"], group=4) == 0.75
    assert bv.top1_in_groups(img, txt, ["a", "b", "b", "d"], group=4) == 1.0
    assert bv.top1_in_groups(img, txt, ["a", "b", "c", "d"], group=2) == 0.75  # two groups of two


def _result(rho: dict[str, list[float]], retrieval: dict | None = None) -> dict:
    rows = {f"{s:g}": {f"{n}/rho": r[k] for n, r in rho.items()} for k, s in enumerate(bv.SIGMAS)}
    return {"critics": list(rho), "value": {"rows": rows}, "retrieval": retrieval}


def test_check_targets():
    good = _result({"stitchvm": [0.97, 0.95, 0.9, 0.8, 0.6], "tweedie": [0.98, 0.96, 0.85, 0.6, 0.3],
                    "vae_stitch": [0.9, 0.8, 0.6, 0.4, 0.2]},
                   {"clean": 0.9, "stitchvm@0.5": 0.8})
    checks = bv.check_targets(good)
    assert len(checks) == 7 and all(ok for _, ok in checks), checks
    bad = _result({"stitchvm": [0.9, 0.95, 0.79, 0.8, 0.6], "tweedie": [0.98, 0.96, 0.85, 0.6, 0.3]},
                  {"clean": 0.9, "stitchvm@0.5": 0.7})
    failed = [text for text, ok in bv.check_targets(bad) if not ok]
    assert len(failed) == 4  # σ=0.1 (0.08 behind), σ=0.5 (beaten), ρ < 0.8 at 0.5, retrieval 78%
    assert any("σ=0.1" in t for t in failed) and any("retrieval keeps 77.8%" in t for t in failed)


def test_quick_run_prints_table_and_writes_json_and_plot(built, world, tmp_path, capsys):
    svm, vae = built
    out = tmp_path / "bench.png"
    result = bv.main(["--quick", "--weights-dir", str(world), "--stitchvm", str(svm.output_dir), "--vae-stitch",
                      str(vae.output_dir), "--out", str(out), "--sigmas", "0.25,0.5,0.9"])
    text = capsys.readouterr().out
    assert "| σ | stitchvm ρ | tweedie ρ | vae_stitch ρ |" in text and "| 0.5 |" in text and "Targets:" in text
    assert out.read_bytes()[:4] == b"\x89PNG"
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["n_prompts"] == 4 and saved["rollouts"] == 2 and list(saved["value"]["rows"]) == ["0.25", "0.5", "0.9"]
    for row in saved["value"]["rows"].values():
        assert all(-1 <= row[f"{n}/rho"] <= 1 and row[f"{n}/mse"] >= 0 for n in bv.CRITICS)
    assert set(saved["value"]["cost_ms_per_value"]) == {"mc", *bv.CRITICS}
    assert 0 <= saved["retrieval"]["stitchvm@0.5"] <= 1 and saved["retrieval"]["n_images"] == 32
    assert result["value"] == saved["value"]


def test_quick_run_writes_no_file_by_default(built, world, tmp_path, monkeypatch):
    # --quick's 4-prompt smoke figures must not replace the reported docs/img/value_bench.{png,json}
    svm, _ = built
    monkeypatch.chdir(tmp_path)
    bv.main(["--quick", "--weights-dir", str(world), "--stitchvm", str(svm.output_dir), "--critics", "stitchvm",
             "--sigmas", "0.5", "--retrieval-images", "0"])
    assert list(tmp_path.rglob("*")) == []


@pytest.mark.parametrize("args,message", [
    (["--sigmas", "1.5"], "strictly between 0 (clean) and 1"),
    (["--sigmas", "0.5,x"], "comma-separated numbers"),
    (["--n-prompts", "0"], "--n-prompts must be >= 1"),
    (["--rollouts", "3"], "--rollouts must be even"),
    (["--critics", "foo"], "unknown critics ['foo']"),
    (["--variant", "foo"], "--variant must look like NAME=DIR"),
])
def test_cli_input_errors_are_one_line_and_exit_2(built, world, capsys, args, message):
    svm, _ = built
    try:
        rc = bv.cli(["--quick", "--weights-dir", str(world), "--stitchvm", str(svm.output_dir), "--critics",
                     "stitchvm", *args])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_a_vae_stitch_directory_given_as_stitchvm_is_named(built, world, capsys):
    svm, vae = built
    assert bv.cli(["--quick", "--weights-dir", str(world), "--stitchvm", str(vae.output_dir), "--critics",
                   "stitchvm"]) == 2
    assert "holds a vae_stitch critic (vae_stitch.json), not a stitchvm one" in capsys.readouterr().err


def test_odd_rollouts_are_refused(built, world):
    svm, vae = built
    with pytest.raises(ValueError, match="--rollouts must be even"):
        bv.main(["--quick", "--rollouts", "3", "--weights-dir", str(world), "--stitchvm", str(svm.output_dir),
                 "--critics", "stitchvm", "--out", ""])


def test_a_variant_is_benchmarked_on_the_same_trajectories(built, world, capsys):
    """--variant NAME=DIR: the same StitchVM under another name gets exactly the shipped one's numbers."""
    svm, _ = built
    result = bv.main(["--quick", "--weights-dir", str(world), "--stitchvm", str(svm.output_dir), "--critics",
                      "stitchvm", "--variant", f"again={svm.output_dir}", "--sigmas", "0.5", "--out", ""])
    row = result["value"]["rows"]["0.5"]
    assert row["again/rho"] == row["stitchvm/rho"] and row["again/mse"] == row["stitchvm/mse"]
    assert result["retrieval"]["again@0.5"] == result["retrieval"]["stitchvm@0.5"]
    assert "again ρ" in capsys.readouterr().out
    assert not any("> others" in t["check"] for t in result["targets"])  # a variant is compared, not a competitor
    for bad in ("again", "=dir", "a/b=dir", "a@b=dir"):
        with pytest.raises(ValueError, match="--variant must look like NAME=DIR"):
            bv.parse_variants([bad])
    with pytest.raises(ValueError, match="given twice"):
        bv.parse_variants(["a=x", "a=y"])
    with pytest.raises(ValueError, match="taken by a critic"):
        bv.main(["--quick", "--weights-dir", str(world), "--stitchvm", str(svm.output_dir), "--critics", "stitchvm",
                 "--variant", f"stitchvm={svm.output_dir}", "--out", ""])


def test_value_quality_of_planted_critics_against_a_planted_truth(monkeypatch):
    # V_MC := mean(z) (both halves agree: split-half rho 1); critics m, m + 0.5 and -m then have rho 1, 1, -1 and
    # MSE 0, 0.25 and 4 E[m^2]
    from types import SimpleNamespace

    import critics.baselines

    class Truth:
        def __init__(self, *args, **kwargs):
            pass

        def value(self, z, sigma, prompts):
            return z.flatten(1).mean(1)

    def planted(f):
        return SimpleNamespace(value=lambda z, sigma, prompts: f(z.flatten(1).mean(1)))

    monkeypatch.setattr(critics.baselines, "MonteCarloCritic", Truth)
    z = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    m = z.flatten(1).mean(1)
    result = bv.value_quality(SimpleNamespace(device=torch.device("cpu")), None,
                              {"same": planted(lambda v: v), "shifted": planted(lambda v: v + 0.5),
                               "flipped": planted(lambda v: -v)},
                              [f"p{k}" for k in range(16)], {0.5: z}, rollouts=2, num_steps=2, guidance=1.0,
                              batch_size=8)
    row = result["rows"]["0.5"]
    assert row["mc/split_half_rho"] == pytest.approx(1.0)
    assert (row["same/rho"], row["shifted/rho"], row["flipped/rho"]) == pytest.approx((1.0, 1.0, -1.0))
    assert (row["same/mse"], row["shifted/mse"]) == pytest.approx((0.0, 0.25))
    assert row["flipped/mse"] == pytest.approx(float((2 * m).pow(2).mean()))
    assert row["mc/mean"] == pytest.approx(float(m.mean())) and set(result["cost_ms_per_value"]) >= {"mc", "same"}


def test_a_denoised_variant_is_the_denoised_experts_with_its_low_expert():
    """--variant NAME=denoised:DIR: stitchvm_experts_denoised with DIR as its low expert, so the shipped low expert's
    directory gives back the shipped critic's numbers on the same trajectories (and no retrieval row: it has no tail
    of its own)."""
    result = bv.main(["--quick", "--critics", "stitchvm_experts_denoised", "--variant",
                      "again=denoised:shapes/weights/stitchvm_prompt_low", "--sigmas", "0.25", "--out", ""])
    row = result["value"]["rows"]["0.25"]
    assert row["again/rho"] == row["stitchvm_experts_denoised/rho"]
    assert row["again/mse"] == row["stitchvm_experts_denoised/mse"]
    assert not any(k.startswith("again@") for k in result.get("retrieval", {}))


def test_a_denoised_variant_takes_sigma_in_and_noise_draws():
    assert bv.denoised_spec("runs/x") is None and bv.denoised_spec("denoised:runs/x") == ("runs/x", {})
    assert bv.denoised_spec("denoised[sigma_in=0.1,noise_draws=4]:runs/x") == ("runs/x", {"sigma_in": 0.1,
                                                                                        "noise_draws": 4})
    for bad, match in (("denoised[sigma=0.1]:d", "options in denoised"), ("denoised[noise_draws=2.5]:d", "an integer"),
                       ("denoised[sigma_in]:d", "options in denoised"), ("denoised[sigma_in=0.1:d", "write denoised"),
                       ("denoised[noise_draws=2,noise_draws=3]:d", "given twice"),
                       ("denoised[noise_draws=0]:d", "noise_draws >= 1"), ("denoised[sigma_in=2]:d", "in \\(0, 1\\)")):
        with pytest.raises(ValueError, match=match):
            bv.parse_variants([f"a={bad}"])
    # the options reach the critic: at sigma 0.25 the shipped config values x̂0 at sigma_in 0.1 (its knot there), the
    # mean of four re-noisings, which the same settings given as options reproduce; other settings differ
    result = bv.main(["--quick", "--critics", "stitchvm_experts_denoised", "--sigmas", "0.25", "--out", "",
                      "--variant", "same=denoised[sigma_in=0.1,noise_draws=4]:shapes/weights/stitchvm_prompt_low",
                      "--variant", "one=denoised[sigma_in=0.1,noise_draws=1]:shapes/weights/stitchvm_prompt_low",
                      "--variant", "high=denoised[sigma_in=0.15,noise_draws=4]:shapes/weights/stitchvm_prompt_low"])
    row = result["value"]["rows"]["0.25"]
    assert row["same/mse"] == row["stitchvm_experts_denoised/mse"]
    assert row["one/mse"] != row["same/mse"] and row["high/mse"] != row["same/mse"]
