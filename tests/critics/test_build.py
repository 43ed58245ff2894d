"""critics.build end to end on a tiny random Shapes world; critics.load; the critic configs; clear errors."""

from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from critics import load
from critics.build import BuildConfig, ImageFolder, build, load_config, main
from critics.stitchvm import DiTHead, StitchVM
from critics.tails import make_tail
from critics.vae_stitch import LatentHead
from rl.config import ConfigError, _import, instantiate, load_yaml
from shapes.models import load_shapes_policy, load_shapes_reward
from tests.critics.tiny_world import BUILD_YAML as SHAPES_YAML
from tests.critics.tiny_world import (IMAGE_SIZE, TINY_VIT, tiny_overrides, write_tiny_open_clip,
                                      write_tiny_shapes_weights)

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "critic"
SD35_YAML = str(CONFIGS / "build_sd35m_clip.yaml")
PROMPTS = ["a red circle", "two blue squares"]


def test_build_writes_critic_grid_heatmap_and_record(built, world):
    result, _ = built
    out = result.output_dir
    assert sorted(p.name for p in out.iterdir()) == ["build.json", "interface.json", "interface.png", "manifest.json",
                                                      "stitch.safetensors", "stitchvm.json", "tail.safetensors"]
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temp dirs left behind
    grid = json.loads((out / "interface.json").read_text())
    assert grid["i_values"] == [1, 2, 3] and grid["j_values"] == [1, 2, 3, 4]  # every DiT block, j <= 4
    rel = torch.tensor(grid["rel_mse"])
    assert rel.shape == (3, 4) and (rel > 0).all() and (rel < 1.5).all()
    a, c = divmod(int(rel.argmin()), 4)
    assert grid["best"] == [a + 1, c + 1] == [result.model.i, result.model.j]  # the minimum is selected
    assert (out / "interface.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / "build.json").read_text())
    assert record["steps"] == 4 and record["config"]["distill"]["lr"] == pytest.approx(3e-4)
    assert len(result.stats["distill/loss"]) == 4
    meta = json.loads((out / "stitchvm.json").read_text())
    assert (meta["backbone"], meta["image_size"]) == ("shapes-dit", IMAGE_SIZE)


def test_loaded_critic_equals_built_one_and_is_differentiable(built, world):
    result, _ = built
    policy, reward = load_shapes_policy(weights_dir=world), load_shapes_reward(weights_dir=world)
    critic = load.stitchvm(policy, reward, result.output_dir)
    assert isinstance(critic.head, DiTHead) and (critic.i, critic.j) == (result.model.i, result.model.j)
    assert critic.head.transformer_blocks[0] is policy.transformer.transformer_blocks[0]  # shared, not copied
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    v = critic.value(z, torch.tensor([0.3, 0.8]), PROMPTS)
    with torch.no_grad():
        ref = result.model.value(z, torch.tensor([0.3, 0.8]), PROMPTS)
    torch.testing.assert_close(v.detach(), ref, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(v.sum(), z)
    assert grad.abs().sum() > 0
    # the reward's own preprocessing is the tail's: the teacher tower reproduces reward.image_embed
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    teacher = make_tail(reward.vision, critic.tail.preprocess)
    torch.testing.assert_close(teacher.encode(images).embed, reward.image_embed(images), rtol=1e-5, atol=1e-6)


def test_vae_stitch_builds_with_identity_head_and_pairs_by_vae(built, world, tmp_path):
    _, result = built
    out = result.output_dir
    assert (out / "vae_stitch.json").is_file() and not (out / "stitchvm.json").exists()
    grid = json.loads((out / "interface.json").read_text())
    assert grid["i_values"] == [0] and len(grid["rel_mse"][0]) == 4 and grid["best"][0] == 0
    policy, reward = load_shapes_policy(weights_dir=world), load_shapes_reward(weights_dir=world)
    critic = load.vae_stitch(policy, reward, out)
    assert isinstance(critic, StitchVM) and isinstance(critic.head, LatentHead) and critic.i == 0
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(critic.value(z, 0.5, PROMPTS), result.model.value(z, 0.5, PROMPTS))
        # the identity head has no timestep: the value does not depend on sigma
        torch.testing.assert_close(critic.value(z, 0.1, PROMPTS), critic.value(z, 0.9, PROMPTS))
    # another transformer on the same VAE shares the latent space: the baseline still pairs
    other = write_tiny_shapes_weights(tmp_path / "other_dit", dit_seed=9)
    load.vae_stitch(load_shapes_policy(weights_dir=other), reward, out)
    # a vae_stitch file that claims another value target (the build refuses one) is refused, not loaded as CLIP's
    import shutil

    from rl.checkpoint import write_manifest

    edited = tmp_path / "edited"
    shutil.copytree(out, edited)
    meta = json.loads((edited / "vae_stitch.json").read_text())
    (edited / "vae_stitch.json").write_text(json.dumps({**meta, "value_target": {"_component_": "shapes.eval.X"}}))
    write_manifest(edited)
    with pytest.raises(ValueError, match="regresses onto shapes.eval.X"):
        load.vae_stitch(policy, reward, edited)


def test_pairing_with_another_policy_is_an_error_that_says_so(built, world, tmp_path):
    svm, vae = built
    reward = load_shapes_reward(weights_dir=world)
    other_dit = load_shapes_policy(weights_dir=write_tiny_shapes_weights(tmp_path / "dit", dit_seed=9))
    with pytest.raises(ValueError, match="built for backbone shapes-dit"):
        load.stitchvm(other_dit, reward, svm.output_dir)
    other_vae = load_shapes_policy(weights_dir=write_tiny_shapes_weights(tmp_path / "vae", seed=5))
    with pytest.raises(ValueError, match="another latent space"):
        load.vae_stitch(other_vae, reward, vae.output_dir)
    with pytest.raises(FileNotFoundError, match="critics.build"):
        load.stitchvm(other_dit, reward, tmp_path / "nothing_here")


def test_pinned_interface_is_used(world, tmp_path):
    result = build(load_config(SHAPES_YAML, tiny_overrides(world, tmp_path / "c", "search.pinned=[2,3]",
                                                           "search.i_values=[1,2]", "distill.max_steps=1")))
    assert (result.model.i, result.model.j) == (2, 3)
    assert result.model.class_token is not None  # j > 1 learns the class token entering block j
    grid = json.loads((tmp_path / "c" / "interface.json").read_text())
    assert grid["best"] == [2, 3] and grid["pinned"] == [2, 3] and grid["i_values"] == [1, 2]


def test_stitch_blocks_are_built_saved_and_loaded(world, tmp_path):
    out = tmp_path / "c"
    result = build(load_config(SHAPES_YAML, tiny_overrides(world, out, "stitch_blocks=1", "distill.max_steps=2")))
    assert len(result.model.stitch.blocks) == 1
    assert json.loads((out / "stitchvm.json").read_text())["stitch_blocks"] == 1
    critic = load.stitchvm(load_shapes_policy(weights_dir=world), load_shapes_reward(weights_dir=world), out)
    assert len(critic.stitch.blocks) == 1
    z = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(critic.value(z, 0.5, PROMPTS + ["a star"]),
                                   result.model.value(z, 0.5, PROMPTS + ["a star"]))


def test_float16_storage_and_heatmap_elsewhere(world, tmp_path):
    heatmap = tmp_path / "img" / "grid.png"
    out = tmp_path / "c"
    result = build(load_config(SHAPES_YAML, tiny_overrides(world, out, "store_dtype=float16", f"heatmap={heatmap}",
                                                           "distill.max_steps=1")))
    assert heatmap.read_bytes()[:4] == b"\x89PNG" and not (out / "interface.png").exists()
    from safetensors.torch import load_file

    for name in ("stitch.safetensors", "tail.safetensors"):
        assert {t.dtype for k, t in load_file(out / name).items() if k != "class_token"} == {torch.float16}
    assert json.loads((out / "stitchvm.json").read_text())["store_dtype"] == "float16"
    policy, reward = load_shapes_policy(weights_dir=world), load_shapes_reward(weights_dir=world)
    critic = load.stitchvm(policy, reward, out)
    assert critic.tail.stem_conv.weight.dtype == torch.float32  # cast back on load
    z = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(critic.value(z, 0.5, PROMPTS + ["a star"]),
                                   result.model.value(z, 0.5, PROMPTS + ["a star"]), rtol=0, atol=5e-3)


@pytest.mark.parametrize("extra,message", [
    (["search.pinned=[2,5]"], r"config error: search: interface \(i, j\) = \(2, 5\) out of range"),
    (["search.i_values=[1,9]"], r"config error: search: interface \(i, j\) = \(9, 1\) out of range.*3 \(DiT blocks\)"),
    (["kind=vae_stitch", "search.pinned=[2,1]"], r"config error: search.pinned: kind=vae_stitch has no DiT block"),
    (["probe.n=1"], r"error: probe set too small: 16 rows for 32 features"),
    (["data.size=64"], r"error: data images are \(64, 64\).*latents \(4, 8, 8\).*set the data resolution"),
    (["distill.lrr=1"], r"config error: override 'distill.lrr=1': key 'distill.lrr' does not exist"),
    (["distill.loss=mse"], r"config error: distill: loss must be one of"),
    (["distill.log_every=0"], r"config error: distill: log_every must be >= 1"),
    (["onpolicy.log_every=0"], r"config error: onpolicy.log_every: must be >= 1"),
    (["kind=stitchvm2"], r"config error: kind: expected one of \['stitchvm', 'vae_stitch'\]"),
    (["stitch_blocks=-1"], r"config error: stitch_blocks: must be >= 0, got -1"),
    (["kind=vae_stitch", "onpolicy.target={_component_: shapes.eval.ShapesEval}"],
     r"config error: onpolicy.target: kind=vae_stitch is the baseline of the tower's own reward"),
])
def test_build_command_errors_are_one_clear_message(world, tmp_path, capsys, extra, message):
    rc = main(["--config", SHAPES_YAML, *tiny_overrides(world, tmp_path / "x", *extra)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]  # (library progress bars also use stderr)
    assert rc == 2
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.search(message, errors[0]), err
    assert not (tmp_path / "x").exists()  # nothing written


def test_an_output_dir_or_heatmap_that_cannot_be_written_is_a_config_error(world, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert main(["--config", SHAPES_YAML, *tiny_overrides(world, afile)]) == 2
    assert "output_dir: " in capsys.readouterr().err and afile.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # not moved aside, nothing beside it
    assert main(["--config", SHAPES_YAML, *tiny_overrides(world, tmp_path / "x", f"heatmap={afile}/h.png")]) == 2
    assert "heatmap: " in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_critic_yamls_instantiate_as_rl_train_does(built, world):
    svm, vae = built
    policy, reward = load_shapes_policy(weights_dir=world), load_shapes_reward(weights_dir=world)
    for name, out, head in (("stitchvm", svm.output_dir, DiTHead), ("vae_stitch", vae.output_dir, LatentHead)):
        node = load_yaml(CONFIGS / f"{name}.yaml")
        assert node["path"] == f"shapes/weights/{name}"  # the shipped critic
        critic = instantiate({**node, "path": str(out)}, _path="critic", policy=policy, reward=reward)
        assert isinstance(critic.head, head) and critic.latent_size == policy.latent_size


def test_build_yamls_are_valid_build_configs():
    for path in sorted(CONFIGS.glob("build_*.yaml")):
        cfg = load_config(path)
        assert isinstance(cfg, BuildConfig) and cfg.probe.n == 200  # the paper's probe size
        for key in ("policy", "reward", "data"):  # every node names an importable callable taking its kwargs
            node = getattr(cfg, key)
            target = _import(node["_component_"], key)
            inspect.signature(target).bind_partial(**{k: v for k, v in node.items() if k != "_component_"})
    with pytest.raises(ConfigError, match="unknown key 'search.pined'"):
        load_config(SHAPES_YAML, ["+search.pined=[1,1]"])
    # the README's build command must not replace a shipped critic or a tracked image unless asked (a newcomer's
    # one-minute try rewrote docs/img/ and, had it reached a checkpoint, shapes/weights/stitchvm)
    for path in sorted(CONFIGS.glob("build_shapes*.yaml")):
        cfg = load_config(path)
        assert Path(cfg.output_dir).parts[0] == "runs" and cfg.heatmap is None, path


def test_ctrl_c_stops_a_build_with_a_message(monkeypatch, tmp_path, capsys):
    import critics.build as build_module

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "build", interrupted)
    assert main(["--config", SHAPES_YAML, f"output_dir={tmp_path / 'c'}"]) == 130
    err = capsys.readouterr().err
    assert "interrupted:" in err and "last complete checkpoint" in err and "Traceback" not in err


def test_sd35m_config_runs_on_tiny_models_of_the_same_classes(tmp_path, monkeypatch):
    """build_sd35m_clip.yaml with its reward and data loaders (CLIPScore.from_pretrained on a file, ImageFolder)
    and every stage setting scaled down; the policy is a tiny SD3Transformer2DModel + AutoencoderKL FlowPolicy."""
    weights = write_tiny_open_clip(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    g = torch.Generator().manual_seed(0)
    for k in range(24):
        arr = (torch.rand(20 + k % 3, 24, 3, generator=g) * 255).byte().numpy()  # odd sizes: resize + crop
        Image.fromarray(arr).save(images / f"{k:02d}.png")
    cfg = load_config(SD35_YAML, [
        "policy={_component_: policies.testing.tiny_policy}", f"reward.model_name={TINY_VIT}",
        f"reward.pretrained={weights}", f"data.root={images}", "data.resolution=16", f"output_dir={tmp_path / 'out'}",
        "probe.n=4", "search.i_values=[1,2]", "search.pinned=[2,1]", "distill.batch_size=4",
        "distill.micro_batch_size=2", "distill.max_steps=2", "distill.warmup_steps=1", "distill.progress=false",
        "num_workers=0", "device=cpu"])
    assert cfg.head_dtype == "bfloat16"
    result = build(cfg)
    assert (result.model.i, result.model.j) == (2, 1)
    assert result.model.head.transformer_blocks[0].attn.to_q.weight.dtype == torch.bfloat16
    assert result.model.tail.stem_conv.weight.dtype == torch.float32
    meta = json.loads((tmp_path / "out" / "stitchvm.json").read_text())
    assert meta["backbone"] == "stabilityai/stable-diffusion-3.5-medium" and meta["i"] == 2


def test_image_folder_resizes_and_crops(tmp_path):
    Image.fromarray((torch.rand(30, 50, 3) * 255).byte().numpy()).save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolder(tmp_path, resolution=16)
    assert len(ds) == 1 and ds[0].shape == (3, 16, 16) and 0 <= ds[0].min() and ds[0].max() <= 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .png"):
        ImageFolder(tmp_path / "empty", 16)


def test_a_flipped_byte_is_caught_by_the_manifest(built, world, tmp_path):
    import shutil

    broken = tmp_path / "flipped"
    shutil.copytree(built[0].output_dir, broken)
    data = bytearray((broken / "tail.safetensors").read_bytes())
    data[-10] ^= 0xFF  # same size, valid safetensors framing: only the checksum can tell
    (broken / "tail.safetensors").write_bytes(bytes(data))
    policy, reward = load_shapes_policy(weights_dir=world), load_shapes_reward(weights_dir=world)
    with pytest.raises(ValueError, match="tail.safetensors is corrupt"):
        load.stitchvm(policy, reward, broken)


def test_mixed_stream_adds_the_policy_samples_at_the_asked_share():
    from critics.build import MixedStream

    data = [torch.zeros(6, 3, 4, 4) for _ in range(3)]
    bank = torch.full((5, 3, 4, 4), 255, dtype=torch.uint8)
    bank[0] = 0  # one dark sample: draws are with replacement and random, so not every sample is bright
    stream = MixedStream(data, bank, fraction=0.25, seed=3)
    batches = list(stream)
    assert [b.shape[0] for b in batches] == [8, 8, 8]  # 6 data + round(6 * 0.25 / 0.75) = 2 samples
    bright = sum(int((b.flatten(1) == 1).all(1).sum()) for b in batches)
    assert 0 < bright <= 6 and all(((b == 0) | (b == 1)).all() for b in batches)
    assert all(torch.equal(a, b) for a, b in zip(batches, MixedStream(data, bank, 0.25, seed=3)))
    with pytest.raises(ValueError, match="generate at the data's resolution"):
        list(MixedStream([torch.zeros(2, 3, 8, 8)], bank, 0.5, seed=0))
    with pytest.raises(ValueError, match="uint8"):
        MixedStream(data, bank.float(), 0.5, seed=0)


@pytest.mark.parametrize("n,loader,batch,fraction", [(37, 8, 16, 0.75), (32, 8, 8, 0.0), (50, 7, 5, 0.25)])
def test_steps_per_pass_counts_what_stage_two_batches(n, loader, batch, fraction):
    """steps_per_pass: the optimiser steps of one pass of the data loader's batches (MixedStream-grown), re-chunked."""
    from critics.build import MixedStream, steps_per_pass
    from critics.distill import rebatch

    data = list(torch.zeros(n, 3, 4, 4).split(loader))  # the loader's batches, the last one partial
    stream = MixedStream(data, torch.zeros(3, 3, 4, 4, dtype=torch.uint8), fraction, seed=0) if fraction else data
    assert steps_per_pass(n, loader, batch, fraction) == len(list(rebatch(stream, batch)))


def test_mixed_stream_carries_the_samples_own_latents():
    from critics.build import MixedStream
    from critics.distill import rebatch

    data = [(torch.zeros(6, 3, 4, 4), [f"d{b}"] * 6) for b in range(3)]
    bank = torch.stack([torch.full((3, 4, 4), 10 * (k + 1), dtype=torch.uint8) for k in range(5)])
    latents = torch.arange(5, dtype=torch.float16).view(5, 1, 1, 1).expand(5, 2, 2, 2) + 1
    prompts = [f"p{k}" for k in range(5)]
    items = list(MixedStream(data, bank, 0.25, seed=3, bank_prompts=prompts, bank_latents=latents))
    for images, texts, lat, own in items:
        assert images.shape[0] == texts.__len__() == lat.shape[0] == own.shape[0] == 8 and int(own.sum()) == 2
        for x, text, z, mine in zip(images, texts, lat, own):
            if mine:  # a policy sample: its image, prompt and latent are one bank row's
                k = int(round(x[0, 0, 0].item() * 255)) // 10 - 1
                assert text == f"p{k}" and torch.equal(z, latents[k].float())
            else:
                assert x.abs().sum() == 0 and text.startswith("d") and z.abs().sum() == 0
    # the same rows without latents; and rebatch keeps each row's latent and flag with its image across re-chunking
    plain = list(MixedStream(data, bank, 0.25, seed=3, bank_prompts=prompts))
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(items, plain))
    for batch in rebatch(items, 5):
        assert batch.latents.shape == (5, 2, 2, 2) and batch.own.shape == (5,)
        assert torch.equal(batch.own, batch.images.flatten(1).amax(1) > 0)
        assert torch.equal(batch.own, batch.latents.flatten(1).amax(1) > 0)
    with pytest.raises(ValueError, match="one row per policy sample"):
        MixedStream(data, bank, 0.5, seed=0, bank_latents=latents[:3])
    with pytest.raises(ValueError, match="mixes items with and without"):
        list(rebatch([items[0], (torch.zeros(2, 3, 4, 4), ["x"] * 2)], 4))


def test_generate_samples_cycles_settings_and_is_seeded(world):
    from critics.build import PolicySampleConfig, generate_samples

    policy = load_shapes_policy(weights_dir=world)
    cfg = PolicySampleConfig(n=5, prompts={}, num_steps=2, guidance_scales=[1.0, 3.0], etas=[0.0, 0.7],
                             batch_size=2, seed=4)
    prompts = ["two red circles", "a blue square"]
    seen, real = [], policy.sample

    def recording(rows, **kw):
        seen.append((list(rows), kw["guidance_scale"], kw["eta"], kw["num_steps"]))
        return real(rows, **kw)

    policy.sample = recording
    images, latents = generate_samples(policy, prompts, cfg)
    assert images.dtype == torch.uint8 and images.shape == (5, 3, IMAGE_SIZE, IMAGE_SIZE)
    # batches of 2, 2, 1; prompts cycled; (CFG, eta) = (1, 0), (3, 0), (1, 0.7): every pair gets its share
    assert seen == [(prompts, 1.0, 0.0, 2), (prompts, 3.0, 0.0, 2), (prompts[:1], 1.0, 0.7, 2)]
    again = generate_samples(policy, prompts, cfg)
    assert torch.equal(images, again[0]) and torch.equal(latents, again[1])
    # the latents are the ones the images decode from (up to the uint8 and float16 roundings)
    assert latents.dtype == torch.float16 and latents.shape == (5, policy.latent_channels, policy.latent_size,
                                                                policy.latent_size)
    with torch.no_grad():
        decoded = policy.decode(latents.float().to(policy.device)).cpu()
    assert (decoded - images.float() / 255).abs().max() < 0.02


def test_build_with_policy_samples_and_the_caption_score_term(world, tmp_path, monkeypatch):
    from critics import build as build_module

    streams, real = [], build_module.distill

    def spy(model, reward, encode_fn, data_iter, cfg, **kw):
        streams.append(data_iter)
        return real(model, reward, encode_fn, data_iter, cfg, **kw)

    monkeypatch.setattr(build_module, "distill", spy)
    out = tmp_path / "c"
    result = build(load_config(SHAPES_YAML, tiny_overrides(
        world, out, "policy_samples.n=6", "policy_samples.batch_size=3", "policy_samples.num_steps=2",
        "policy_samples.prompts={_component_: shapes.data.prompts, split: train, n: 4, seed: 5}",
        "distill.lambda_score=2.0", "score_captions={_component_: shapes.data.prompts, split: train, n: 16, seed: 11}",
        "distill.max_steps=2")))
    assert len(result.stats["distill/score_loss"]) == 2 and all(v > 0 for v in result.stats["distill/score_loss"])
    record = json.loads((out / "build.json").read_text())
    assert record["times"]["policy_samples_s"] > 0 and record["config"]["distill"]["lambda_score"] == 2.0
    (stream,) = streams
    assert isinstance(stream, build_module.MixedStream) and stream.bank.shape[0] == 6 and stream.fraction == 0.5
    assert next(iter(stream)).shape[0] == 16  # loader batches of 8 renders + 8 policy samples
    assert stream.bank_latents is None  # student_latents: encoded (the default)


def test_build_with_the_own_caption_score_term(world, tmp_path, monkeypatch):
    """A null-text head with distill.lambda_own_score: the renders and the policy samples reach stage 2 with their
    captions / prompts, and the term is trained and recorded."""
    from critics import build as build_module

    batches, real = [], build_module.distill

    def spy(model, reward, encode_fn, data_iter, cfg, **kw):
        batches.append(next(iter(data_iter)))
        assert kw["text_embed_fn"] == reward.text_embed
        return real(model, reward, encode_fn, data_iter, cfg, **kw)

    monkeypatch.setattr(build_module, "distill", spy)
    out = tmp_path / "c"
    prompts = "{_component_: shapes.data.prompts, split: train, n: 4, seed: 5}"
    result = build(load_config(SHAPES_YAML, tiny_overrides(
        world, out, "policy_samples.n=4", "policy_samples.batch_size=2", "policy_samples.num_steps=2",
        f"policy_samples.prompts={prompts}", "distill.lambda_own_score=1.5", "distill.max_steps=2")))
    images, texts = batches[0]
    from shapes.data import prompts as make_prompts
    assert len(texts) == images.shape[0] == 16 and all(texts)
    assert set(make_prompts("train", 4, 5)) & set(texts)  # the policy samples carry their prompts
    own = result.stats["distill/own_score_loss"]
    assert len(own) == 2 and all(v > 0 for v in own)
    record = json.loads((out / "build.json").read_text())
    assert record["config"]["distill"]["lambda_own_score"] == 1.5 and record["final"]["distill/own_score_loss"] > 0


def test_build_with_the_policy_samples_own_latents(world, tmp_path, monkeypatch):
    from critics import build as build_module

    batches, real = [], build_module.distill

    def spy(model, reward, encode_fn, data_iter, cfg, **kw):
        batches.append(next(iter(data_iter)))
        return real(model, reward, encode_fn, data_iter, cfg, **kw)

    monkeypatch.setattr(build_module, "distill", spy)
    out = tmp_path / "c"
    build(load_config(SHAPES_YAML, tiny_overrides(
        world, out, "policy_samples.n=4", "policy_samples.batch_size=2", "policy_samples.num_steps=2",
        "policy_samples.prompts={_component_: shapes.data.prompts, split: train, n: 4, seed: 5}",
        "policy_samples.student_latents=own", "distill.max_steps=1")))
    images, texts, lat, own = batches[0]  # a null-text head: no captions
    assert texts is None and own.sum() == 8 and lat.shape[0] == images.shape[0] == 16 and lat.dim() == 4
    assert (lat[~own] == 0).all() and (lat[own].flatten(1).abs().amax(1) > 0).all()
    assert json.loads((out / "build.json").read_text())["config"]["policy_samples"]["student_latents"] == "own"


@pytest.mark.parametrize("extra,message", [
    (["distill.lambda_score=1"], r"config error: score_captions: distill.lambda_score > 0 weights"),
    (["distill.lambda_own_score=1", "score=image"],
     r"config error: distill.lambda_own_score: the own-caption score term is for prompt-dependent rewards"),
    (["policy_samples.n=4"], r"config error: policy_samples.prompts: policy_samples.n > 0 needs the prompts"),
    (["policy_samples.fraction=1.0"], r"config error: policy_samples.fraction: must be in \(0, 1\)"),
    (["policy_samples.etas=[-0.1]"], r"config error: policy_samples.etas: must be a non-empty list of noise levels"),
    (["policy_samples.n=4", "policy_samples.prompts={_component_: shapes.data.prompts, split: train, n: 4, seed: 5}",
      "data.size=64"], r"error: data images are \(64, 64\).*set the data resolution"),  # before any generation
])
def test_stage_two_option_errors(world, tmp_path, capsys, extra, message):
    rc = main(["--config", SHAPES_YAML, *tiny_overrides(world, tmp_path / "x", *extra)])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(message, err), err
    assert not (tmp_path / "x").exists()


def interrupt_stage_two_at_step_3(monkeypatch) -> tuple[list[tuple[int, float]], dict]:
    """Make the build's stage 2 raise KeyboardInterrupt (Ctrl-C) at step 3 unless it resumes or control["on"] is
    False; returns the (step, lr) list it logs every step, and control."""
    from critics import build as build_module

    real, seen, control = build_module.distill, [], {"on": True}

    def interrupted(model, reward, encode_fn, data_iter, cfg, **kw):
        def callback(step, stats):
            seen.append((step, stats["distill/lr"]))
            if step == 3 and kw.get("resume") is None and control["on"]:
                raise KeyboardInterrupt
        kw.pop("callback")
        return real(model, reward, encode_fn, data_iter, cfg, callback=callback, **kw)

    monkeypatch.setattr(build_module, "distill", interrupted)
    return seen, control


def test_an_interrupted_build_resumes_stage_two_from_its_checkpoint(world, tmp_path, monkeypatch, capsys):
    """Ctrl-C after stage 2's step-2 checkpoint, then the same command with resume=true: the build goes on at step 3
    from the checkpoint's float32 weights, optimizer and schedule (its lr at each step is the uninterrupted build's)
    and ends as a critic without training state; another config, or a finished critic, is refused."""
    from critics.distill import STATE_JSON, STATE_TENSORS

    seen, _ = interrupt_stage_two_at_step_3(monkeypatch)
    out = tmp_path / "c"
    args = ["--config", SHAPES_YAML, *tiny_overrides(world, out, "distill.log_every=1", "distill.lr_decay=cosine")]
    assert main(args) == 130 and "resume=true" in capsys.readouterr().err
    assert (out / STATE_TENSORS).is_file() and (out / STATE_JSON).is_file()  # the step-2 checkpoint
    interrupted = list(seen)
    relative = f"output_dir={os.path.relpath(out)}"  # the same directory, spelled otherwise
    # workers, checkpoint cadence and the spelling of the directory change nothing computed: allowed
    assert main([*args, "resume=true", "num_workers=0", "distill.ckpt_every=1", relative]) == 0
    record = json.loads((out / "build.json").read_text())
    assert record["resumed_from_step"] == 2 and record["steps"] == 4 and record["distill_steps"] == 4
    assert [s for s, _ in seen] == [1, 2, 3, 3, 4]
    assert seen[3][1] == pytest.approx(interrupted[2][1])  # step 3's lr: the schedule went on, not restarted
    assert not (out / STATE_TENSORS).exists() and not (out / STATE_JSON).exists()
    load.stitchvm(load_shapes_policy(weights_dir=world), load_shapes_reward(weights_dir=world), out)
    assert main([*args, "resume=true"]) == 2  # finished: no state to go on from
    assert "holds no stage-2 training state" in capsys.readouterr().err
    seen.clear()
    assert main(args) == 130
    assert main([*args, "resume=true", "distill.lr=1e-3"]) == 2
    assert re.search(r"config error: resume: the checkpoint in .* was written by another config \(distill.lr: "
                     r"0.0003 there, 0.001 here\)", capsys.readouterr().err)


@pytest.mark.parametrize("max_steps,epochs,last", [("null", 2, 8), (100, 1, 4)])
def test_a_resumed_build_stops_where_its_epochs_end(world, tmp_path, monkeypatch, max_steps, epochs, last):
    """The epochs end first (distill.max_steps null as in the SD3.5 config's 5 epochs, or more steps than a pass
    has): the resumed run stops where the uninterrupted one did, epochs x floor(32 / 8) steps."""
    _, control = interrupt_stage_two_at_step_3(monkeypatch)
    args = lambda out: ["--config", SHAPES_YAML, *tiny_overrides(  # noqa: E731
        world, out, "distill.log_every=1", "distill.lr_decay=constant", f"distill.max_steps={max_steps}",
        f"distill.epochs={epochs}", "data.num_samples=32", "distill.ckpt_every=0")]
    control["on"] = False  # the uninterrupted reference
    assert main(args(tmp_path / "ref")) == 0
    assert json.loads((tmp_path / "ref" / "build.json").read_text())["steps"] == last
    control["on"] = True
    out = tmp_path / "c"
    assert main([*args(out), "distill.ckpt_every=2"]) == 130
    assert main([*args(out), "distill.ckpt_every=2", "resume=true"]) == 0
    record = json.loads((out / "build.json").read_text())
    assert record["resumed_from_step"] == 2 and record["steps"] == last
