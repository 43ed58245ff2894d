"""The shipped Shapes models: offline loaders, consistent configs, and the quality figures they were shipped for."""

import json
from pathlib import Path

import open_clip
import pytest
import torch

from critics.rewards.clip_score import CLIPScore
from policies.flow import FlowPolicy
from shapes import bench_world, models
from shapes.data import vocabulary

# 23 MB of world models + the shipped critics in float16: stitchvm, stitchvm_checker, vae_stitch (2.7-2.8 MB each)
# and the two prompt-conditioned experts of stitchvm_experts, stitchvm_prompt_low and stitchvm_prompt (9.1 and 5.5 MB:
# their tail is the whole CLIP tower, j = 1; session 7 replaced session 6's single null-text low-sigma expert, session
# 15 the low one by a build with two transformer blocks after the stitch, session 21 by one with four). The cap is the
# device tool's: the working tree and the device wheels (8.4 MB) travel to a GPU call within 64 MiB (67.1 MB), and the
# tracked tree holds ~11 MB besides the weights.
WEIGHT_BUDGET_BYTES = 47 * 10**6


@pytest.fixture(scope="module")
def policy():
    return models.load_shapes_policy()


@pytest.fixture(scope="module")
def clip():
    return models.load_shapes_clip()


@pytest.fixture(scope="module")
def test_set():
    return bench_world.test_images(32, workers=1)


def test_policy_loader_gives_the_documented_sizes(policy):
    assert isinstance(policy, FlowPolicy)
    assert (policy.latent_channels, policy.latent_size, policy.image_size) == (4, 16, 64)
    cfg = models.policy_config()
    assert policy.shift == cfg.shift and 1.0 <= cfg.shift <= 3.0 and cfg.num_steps == 20
    cond = policy.encode_prompts(["a red circle", ""])
    assert cond.embeds.shape == (2, 16, policy.transformer.config.joint_attention_dim)
    assert cond.pooled.shape == (2, policy.transformer.config.pooled_projection_dim)
    with torch.no_grad():
        traj = policy.sample(["a red circle", "two blue squares above a green star"], num_steps=2,
                             guidance_scale=cfg.guidance_scale, generator=torch.Generator().manual_seed(0))
        images = policy.decode(traj.z_tau)
    assert images.shape == (2, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
    assert not policy.vae.training and not any(p.requires_grad for p in policy.vae.parameters())
    assert not any(p.requires_grad for p in policy.text_encoder.model.parameters())


def test_policy_loader_dtype():
    policy = models.load_shapes_policy(dtype=torch.bfloat16)
    assert policy.dtype == torch.bfloat16 and policy.vae.dtype == torch.bfloat16
    assert policy.text_encoder.model.dtype == torch.bfloat16


def test_configs_are_consistent(policy, clip):
    model, _ = clip
    vae, transformer = policy.vae.config, policy.transformer.config
    # the policy's latent space is the VAE's: 3 levels = 4x down, 4 channels, SD3 normalisation set
    assert vae.latent_channels == transformer.in_channels == transformer.out_channels == 4
    assert policy.vae_scale_factor == 4 and vae.sample_size // 4 == transformer.sample_size
    assert vae.scaling_factor > 0 and vae.shift_factor is not None
    # the text tower feeds the MMDiT, and both CLIP towers read the one tokenizer
    text = policy.text_encoder.model.config
    assert (text.hidden_size, text.projection_dim) == (transformer.joint_attention_dim,
                                                        transformer.pooled_projection_dim)
    tokenizer = models.shapes_tokenizer()
    clip_cfg = json.loads((models.WEIGHTS_DIR / models.CLIP_DIR / models.CLIP_CONFIG_FILE).read_text())
    assert len(tokenizer) == text.vocab_size == clip_cfg["text_cfg"]["vocab_size"]
    assert tokenizer.eos_token_id == len(tokenizer) - 1 == text.eos_token_id
    assert clip_cfg["text_cfg"]["context_length"] == models.policy_config().context_length == text.max_position_embeddings
    # every caption word is in the shipped vocabulary (if the generator grows words, rebuild the weights)
    unknown = [w for w in vocabulary() if tokenizer.convert_tokens_to_ids(w) == tokenizer.unk_token_id]
    assert not unknown, f"rebuild the weights ({models.REBUILD_COMMAND}): words missing from the tokenizer {unknown}"


def test_shipped_weights_fit_the_budget():
    files = [p for p in models.WEIGHTS_DIR.rglob("*") if p.is_file() and "logs" not in p.parts]
    assert sum(p.stat().st_size for p in files) <= WEIGHT_BUDGET_BYTES
    assert {p.suffix for p in files} == {".json", ".safetensors"}


def test_clip_loader(clip):
    model, tokenize = clip
    assert isinstance(model, open_clip.CLIP) and not model.training
    # the StitchVM critic truncates the standard open_clip ViT
    for part in ("class_embedding", "conv1", "ln_pre", "transformer", "ln_post", "proj"):
        assert hasattr(model.visual, part)
    tokens = tokenize(["a red circle", ""])
    assert tokens.dtype == torch.long and tokens.shape == (2, 16)
    assert tokens.argmax(1).tolist() == [4, 1]  # [BOS] a red circle [EOS]: pooled at [EOS]
    with pytest.raises(ValueError, match="outside the Shapes vocabulary"):
        tokenize(["a red elephant"])
    with pytest.raises(ValueError, match="context"):
        tokenize(["a red circle and " * 5 + "a red circle"])


def test_reward_loader_scores_the_right_caption_higher(test_set):
    images, captions = test_set
    reward = models.load_shapes_reward()
    assert isinstance(reward, CLIPScore)
    right = reward(images[:8], captions[:8])
    wrong = reward(images[:8], captions[8:16])
    assert right.shape == (8,) and right.dtype == torch.float32
    assert (right > wrong).float().mean() >= 0.75


def test_missing_weights_name_the_file_and_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"policy\.json.*shapes\.train_all"):
        models.load_shapes_policy(weights_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"open_clip_config\.json.*shapes\.train_all"):
        models.load_shapes_clip(weights_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"vae.config\.json"):
        models.shapes_vae(weights_dir=tmp_path)


def test_shipped_vae_reconstructs_test_images(test_set):
    images, _ = test_set
    psnr = bench_world.vae_psnr(models.shapes_vae(), images[:8])
    assert psnr.min() > 26.0, psnr


def test_shipped_clip_retrieves_the_caption_among_32(clip, test_set):
    images, captions = test_set
    reward = CLIPScore(*clip)
    img, txt = bench_world.embed(reward, images, captions)
    best = (img @ txt.T).argmax(1)
    right = sum(captions[int(b)] == captions[i] for i, b in enumerate(best))
    assert right >= 28, f"{right}/32"


def test_recorded_figures_meet_the_issue():
    """The bench figures shipped with the weights (logs/bench.json, from `python -m shapes.train_all`)."""
    bench = json.loads(Path(models.WEIGHTS_DIR / "logs" / "bench.json").read_text())
    default = models.policy_config().guidance_scale
    assert bench["vae/psnr_test_db"] >= 28
    assert bench["clip/top1_in_batch"] >= 0.90
    assert bench["spearman/pool"] >= 0.7
    assert 0.35 <= bench[f"eval/overall@w{default:g}"] <= 0.70


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    # transformers would fill a missing tensor with random values (a log line only); a dropped one must be an error
    import shutil

    from safetensors.torch import load_file, save_file

    weights = tmp_path / "weights"
    shutil.copytree(models.WEIGHTS_DIR, weights, ignore=shutil.ignore_patterns("stitchvm*", "vae_stitch"))
    text = next((weights / models.TEXT_ENCODER_DIR).glob("*.safetensors"))
    state = load_file(str(text))
    dropped = next(k for k in state if "text_projection" in k)
    save_file({k: v for k, v in state.items() if k != dropped}, str(text), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"do not fit the config \(missing_keys: {dropped}"):
        models.shapes_text_encoder(weights_dir=weights)
    state[dropped.replace("weight", "extra")] = state[dropped].clone()  # all there, and one more
    save_file(state, str(text), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected_keys"):
        models.shapes_text_encoder(weights_dir=weights)


def test_a_vae_other_than_the_one_the_flow_was_trained_on_is_refused(tmp_path):
    # policy.json records the encoder fingerprint of the VAE the transformer learned the latents of
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    weights = tmp_path / "weights"
    shutil.copytree(models.WEIGHTS_DIR, weights, ignore=shutil.ignore_patterns("stitchvm*", "vae_stitch"))
    assert "vae_fingerprint" in json.loads((weights / models.POLICY_FILE).read_text())
    models.load_shapes_policy(weights_dir=weights)  # the shipped pair
    vae_file = next((weights / models.VAE_DIR).glob("*.safetensors"))
    state = load_file(str(vae_file))
    key = next(k for k in state if k.startswith("encoder.") and k.endswith("weight"))
    state[key] = state[key] * 1.5  # a retrained encoder: another latent space
    save_file(state, str(vae_file))
    with pytest.raises(ValueError, match="not the VAE the transformer was trained on"):
        models.load_shapes_policy(weights_dir=weights)


@pytest.mark.parametrize("part", ["vae", "policy", "clip"])
def test_a_save_killed_midway_leaves_the_previous_weights_loadable(tmp_path, monkeypatch, part):
    # the training scripts save into shapes/weights/ itself: a kill while writing must not leave a half directory
    import shutil

    import diffusers
    import safetensors.torch

    weights = tmp_path / "weights"
    shutil.copytree(models.WEIGHTS_DIR, weights, ignore=shutil.ignore_patterns("stitchvm*", "vae_stitch"))
    before = {p.relative_to(weights): p.read_bytes() for p in weights.rglob("*") if p.is_file()}
    policy = models.load_shapes_policy(weights_dir=weights)

    def killed():
        raise KeyboardInterrupt("killed while writing")

    def retrained(module):  # new weights, so that a save written in place would change the files
        with torch.no_grad():
            for p in module.parameters():
                p.mul_(1.5)
        return module

    if part == "clip":
        real = safetensors.torch.save_file

        def half_written(state, path, *a, **k):  # the tensors land, the kill comes before the config
            real(state, path, *a, **k)
            killed()

        monkeypatch.setattr(safetensors.torch, "save_file", half_written)
        clip = retrained(models.load_shapes_clip(weights_dir=weights)[0])
        config = json.loads((weights / models.CLIP_DIR / models.CLIP_CONFIG_FILE).read_text())
        tokenizer = models.load_tokenizer(weights / models.TOKENIZER_FILE)
        save = lambda: models.save_clip(clip, config, tokenizer, weights)
    else:
        real = diffusers.ModelMixin.save_pretrained

        def half_written(self, *a, **k):  # the weights land, the kill comes before the next part
            real(self, *a, **k)
            killed()

        monkeypatch.setattr(diffusers.ModelMixin, "save_pretrained", half_written)
        save = (lambda: models.save_vae(retrained(policy.vae), weights)) if part == "vae" else (
            lambda: models.save_policy(retrained(policy.transformer), policy.text_encoder.model,
                                       policy.text_encoder.tokenizer, weights, {"shift": 3.0}))
    with pytest.raises(KeyboardInterrupt):
        save()
    after = {p.relative_to(weights): p.read_bytes() for p in weights.rglob("*") if p.is_file()}
    assert after == before  # no scratch directory left, nothing replaced
    # a SIGKILL leaves atomic_write_bytes' temp file behind; the next save clears it
    (weights / f".{models.POLICY_FILE}.x1y2.tmp").write_text("{")
    models.clear_scratch(weights)
    assert not list(weights.glob(".*.tmp"))
    models.load_shapes_policy(weights_dir=weights)
    models.load_shapes_reward(weights_dir=weights)


def test_selection_prompts_are_never_reported_and_keep_the_evaluation_mix():
    from shapes.data import KIND_PROBS, parse_caption, prompts

    chosen = bench_world.selection_prompts(1000)
    assert len(chosen) == 1000
    reported = set(prompts("test", 1024, bench_world.TEST_PROMPT_SEED)) | set(
        prompts("test", 1024, bench_world.RL_EVAL_PROMPT_SEED))
    assert not reported & set(chosen)
    single = sum(len(parse_caption(p).groups) == 1 for p in chosen)
    assert single == round(1000 * KIND_PROBS["single"])
    assert bench_world.selection_prompts(600) == bench_world.selection_prompts(600)  # a pure function


def test_a_policy_save_killed_between_its_parts_is_refused_not_mixed(tmp_path, monkeypatch):
    # the transformer and text tower are swapped in one after the other: a kill between them leaves a new transformer
    # beside the old text tower and the old policy.json, whose checksums then refuse the pair
    import shutil

    import transformers

    weights = tmp_path / "weights"
    shutil.copytree(models.WEIGHTS_DIR, weights, ignore=shutil.ignore_patterns("stitchvm*", "vae_stitch"))
    policy = models.load_shapes_policy(weights_dir=weights)

    def killed(*args, **kwargs):  # the text tower's save; the transformer's (diffusers) has completed
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", killed)
    with torch.no_grad():
        for p in policy.transformer.parameters():
            p.mul_(1.5)
    with pytest.raises(KeyboardInterrupt):
        models.save_policy(policy.transformer, policy.text_encoder.model, policy.text_encoder.tokenizer, weights,
                           {"shift": 3.0})
    with pytest.raises(ValueError, match=r"transformer not the one\(s\) policy.json was written with"):
        models.load_shapes_policy(weights_dir=weights)
    monkeypatch.undo()
    # a save that completes records the new checksums, and the policy loads again
    cfg = {k: v for k, v in json.loads((weights / models.POLICY_FILE).read_text()).items() if k != "weights_sha256"}
    models.save_policy(policy.transformer, policy.text_encoder.model, policy.text_encoder.tokenizer, weights, cfg)
    models.load_shapes_policy(weights_dir=weights)


def test_a_swap_killed_between_its_renames_loads_the_previous_part(tmp_path, capsys):
    # write_dir_atomically renames vae -> .vae.old, then the new one -> vae; a kill between leaves no vae/
    import shutil

    weights = tmp_path / "weights"
    shutil.copytree(models.WEIGHTS_DIR, weights, ignore=shutil.ignore_patterns("stitchvm*", "vae_stitch"))
    for part in (models.VAE_DIR, models.TRANSFORMER_DIR, models.CLIP_DIR):
        (weights / part).rename(weights / f".{part}.old")
    models.load_shapes_policy(weights_dir=weights)
    models.load_shapes_reward(weights_dir=weights)
    err = capsys.readouterr().err
    assert err.count("a save into it was interrupted") >= 3
    models.save_vae(models.shapes_vae(weights_dir=weights), weights)  # the next save puts it back
    assert (weights / models.VAE_DIR).is_dir() and not (weights / f".{models.VAE_DIR}.old").exists()
