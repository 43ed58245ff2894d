"""The Shapes training scripts: their pure pieces against hand-derived values, and tiny CPU runs end to end."""

import math

import numpy as np
import pytest
import torch

from shapes import models, train_clip, train_flow, train_vae
from shapes.data import ObjectGroup, PromptSpec, caption, parse_caption, prompts
from shapes.training import lr_at, parse_args, render

TINY_VAE = ["--block_out_channels", "4,8,8", "--norm_num_groups", "4", "--stats_images", "8", "--eval_images", "4",
            "--workers", "1", "--log_every", "1", "--warmup", "1"]
TINY_CLIP = ["--vision_width", "32", "--vision_layers", "1", "--head_width", "16", "--text_width", "32",
             "--text_heads", "2", "--text_layers", "1", "--embed_dim", "16", "--eval_images", "32", "--workers", "1",
             "--log_every", "1", "--warmup", "1"]
TINY_FLOW = ["--num_layers", "1", "--num_heads", "2", "--head_dim", "16", "--text_hidden", "32", "--text_layers", "1",
             "--text_heads", "2", "--text_projection", "32", "--val_prompts", "4", "--num_steps", "2", "--shifts", "1",
             "--guidances", "1", "--snapshots", "0.5,1", "--workers", "1", "--log_every", "1", "--warmup", "1",
             "--stop_at", "0"]


def _losses(metrics: dict, key: str) -> list[float]:
    return [row[key] for row in metrics["log"]]


# ------------------------------------------------------------------------------------------------ pure pieces


def test_render_does_not_depend_on_workers():
    one, caps_one = render("train", 24, seed=3, workers=1)
    two, caps_two = render("train", 24, seed=3, workers=2)
    assert one.dtype == torch.uint8 and one.shape == (24, 3, 64, 64)
    assert torch.equal(one, two) and caps_one == caps_two


def test_lr_schedule():
    assert lr_at(0, 1.0, warmup=10, total=100) == pytest.approx(0.1)
    assert lr_at(9, 1.0, warmup=10, total=100) == pytest.approx(1.0)
    assert lr_at(100, 1.0, warmup=10, total=100) == pytest.approx(0.1)  # final_frac
    assert lr_at(55, 1.0, warmup=10, total=100) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the cosine


def test_parse_args_types_and_unknown_keys():
    args = parse_args(train_vae.VAEArgs, ["--block_out_channels", "8,16", "--lr", "0.01", "--steps", "3"])
    assert args.block_out_channels == (8, 16) and args.lr == 0.01 and args.steps == 3
    with pytest.raises(SystemExit):
        parse_args(train_vae.VAEArgs, ["--no_such_option", "1"])


def test_vae_loss_hand_values():
    x = torch.zeros(1, 3, 2, 2)
    x_hat = x.clone()
    x_hat[..., 0, 0] = 0.4  # one pixel off by 0.4 in every channel
    kl = torch.tensor([10.0])
    loss, stats = train_vae.vae_loss(x, x_hat, kl, kl_weight=0.01, edge_weight=2.0)
    mse, l1 = 0.16 / 4, 0.4 / 4
    # finite differences: 1 of the 2 horizontal and 1 of the 2 vertical ones per channel differ by 0.4
    edge = (0.4 / 2 + 0.4 / 2) / 2
    assert stats["mse"] == pytest.approx(mse) and stats["l1"] == pytest.approx(l1)
    assert stats["edge"] == pytest.approx(edge)
    assert loss.item() == pytest.approx(mse + l1 + 2.0 * edge + 0.01 * 10.0)


def test_spec_key_equivalences():
    a, b = ObjectGroup(1, "red", "circle"), ObjectGroup(2, "blue", "square")
    key = train_clip.spec_key
    assert key(PromptSpec((a, b), "left of")) == key(PromptSpec((b, a), "right of"))
    assert key(PromptSpec((a, b), "above")) == key(PromptSpec((b, a), "below"))
    assert key(PromptSpec((a, b))) == key(PromptSpec((b, a)))
    assert key(PromptSpec((a, b), "left of")) != key(PromptSpec((a, b), "right of"))
    assert key(PromptSpec((a, b))) != key(PromptSpec((a, b), "left of"))


def test_perturbed_specs_are_other_scenes():
    rng = np.random.default_rng(0)
    for text in prompts("train", 200, seed=0):
        spec = parse_caption(text)
        other = train_clip.perturb_spec(spec, rng)
        assert train_clip.spec_key(other) != train_clip.spec_key(spec)
        # never "A and B" <-> "A <relation> B": an image of one can satisfy the other
        if len(spec.groups) == 2 and len(other.groups) == 2 and set(spec.groups) == set(other.groups):
            assert (spec.relation is None) == (other.relation is None)
        assert parse_caption(caption(other)) == other


def test_contrastive_loss_hand_values_and_masking():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [math.sqrt(0.5), math.sqrt(0.5)]])  # 2 captions + 1 hard negative
    scale = torch.tensor(0.0)  # s = 1
    loss, acc = train_clip.contrastive_loss(img, txt, scale, torch.tensor([0, 1]), torch.tensor([0, 1, 2]))
    c = math.sqrt(0.5)
    i2t = -math.log(math.e / (math.e + 1 + math.exp(c)))  # each image: positive 1, other caption 0, negative c
    t2i = -math.log(math.e / (math.e + 1))
    assert loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-6) and acc.item() == 1.0
    # the hard negative describing image 0's scene (same key) is masked out of image 0's denominator
    loss_masked, _ = train_clip.contrastive_loss(img, txt, scale, torch.tensor([0, 1]), torch.tensor([0, 1, 0]))
    i2t_0 = -math.log(math.e / (math.e + 1))
    assert loss_masked.item() == pytest.approx(((i2t_0 + i2t) / 2 + t2i) / 2, rel=1e-6)


def test_gaussian_blur_identity_and_mean():
    x = torch.rand(2, 3, 16, 16)
    out = train_clip.gaussian_blur(x, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(out[0], x[0])
    assert out[1].mean().item() == pytest.approx(x[1].mean().item(), abs=0.02)
    assert out[1].std() < x[1].std()


def test_checkpoint_choice():
    args = train_flow.FlowArgs()
    row = lambda step, shift, w, overall: {"step": step, "shift": shift, "guidance": w, "eval/overall": overall}
    table = [row(100, 1.0, 1.0, 0.30), row(100, 3.0, 1.0, 0.50), row(50, 3.0, 1.0, 0.45), row(80, 3.0, 1.0, 0.60),
             row(50, 3.0, 4.5, 0.6), row(80, 3.0, 4.5, 0.66), row(100, 3.0, 4.5, 0.8)]
    chosen, in_band = train_flow.choose(table, args)  # shift 3 (best at the end), latest CFG-free step in band
    assert in_band and (chosen["step"], chosen["shift"], chosen["guidance"]) == (100, 3.0, 1.0)
    low_cfg_free = [dict(r, **{"eval/overall": 0.25 if (r["step"], r["shift"]) == (100, 3.0) else 0.2})
                    if r["guidance"] == 1.0 else r for r in table]
    chosen, in_band = train_flow.choose(low_cfg_free, args)  # CFG-free never in band: the latest CFG-4.5 one
    assert in_band and (chosen["step"], chosen["guidance"]) == (50, 4.5)
    chosen, in_band = train_flow.choose([row(10, 1.0, 1.0, 0.1), row(10, 1.0, 4.5, 0.2)], args)
    assert not in_band and chosen["guidance"] == 4.5


# ------------------------------------------------------------------------------------------------ tiny runs


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    """A weights directory with a tiny VAE trained for a few steps (the flow run needs one)."""
    out = tmp_path_factory.mktemp("weights")
    metrics = train_vae.main(["--out_dir", str(out), "--steps", "12", "--num_images", "4", "--batch_size", "4",
                              "--lr", "3e-3", *TINY_VAE])
    return out, metrics


def test_vae_run_reduces_the_loss_and_sets_the_latent_normalisation(weights_dir):
    out, metrics = weights_dir
    losses = _losses(metrics, "loss/total")
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3])
    vae = models.shapes_vae(weights_dir=out)
    assert vae.config.scaling_factor == pytest.approx(metrics["vae/scaling_factor"])
    assert vae.config.shift_factor == pytest.approx(metrics["vae/shift_factor"])
    # normalised latents of the training images: zero mean, unit variance (up to the fp16 storage)
    images, _ = render("train", 4, seed=train_vae.DATA_SEED, workers=1)  # the training images
    with torch.no_grad():
        z = (vae.encode(images.float() / 127.5 - 1).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
    assert abs(z.mean().item()) < 0.05 and z.std().item() == pytest.approx(1.0, abs=0.05)


def test_vae_run_is_deterministic(tmp_path):
    argv = ["--steps", "3", "--num_images", "4", "--batch_size", "2", *TINY_VAE]
    first = train_vae.main(["--out_dir", str(tmp_path / "a"), *argv])
    second = train_vae.main(["--out_dir", str(tmp_path / "b"), *argv])
    assert _losses(first, "loss/total") == _losses(second, "loss/total")


def test_clip_run_reduces_the_loss(tmp_path):
    metrics = train_clip.main(["--out_dir", str(tmp_path), "--steps", "15", "--num_train", "16", "--num_test", "0",
                               "--batch_size", "16", "--lr", "2e-3", *TINY_CLIP])
    losses = _losses(metrics, "loss/contrastive")
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    model, tokenize = models.load_shapes_clip(weights_dir=tmp_path)
    assert tokenize(["a red circle"]).shape == (1, models.CONTEXT_LENGTH)
    assert 0.0 <= metrics["clip/top1_in_batch"] <= 1.0


def test_flow_run_reduces_the_loss_and_ships_a_loadable_policy(weights_dir):
    out, _ = weights_dir
    metrics = train_flow.main(["--out_dir", str(out), "--steps", "16", "--num_images", "8", "--batch_size", "8",
                               "--lr", "2e-3", *TINY_FLOW])
    losses = _losses(metrics, "loss/flow_matching")
    assert len(losses) == 16 and np.mean(losses[-4:]) < np.mean(losses[:4])
    assert {r["step"] for r in metrics["flow/selection"]} == {8, 16}
    policy = models.load_shapes_policy(weights_dir=out)
    assert models.policy_config(out).train_step == metrics["flow/chosen"]["step"]
    with torch.no_grad():
        traj = policy.sample(["a red circle"], num_steps=2)
    assert policy.decode(traj.z_tau).shape == (1, 3, 64, 64)
