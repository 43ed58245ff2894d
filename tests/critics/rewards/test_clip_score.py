"""CLIPScore on a tiny random open_clip model: hand-computed cosine, scaling, gradients, loading."""

import pytest
import torch
import torch.nn.functional as F

from critics.rewards import CLIPScore
from critics.rewards.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from tests.critics.rewards.conftest import char_tokenizer, finite_difference_check, tiny_open_clip

PROMPTS = ["a red circle", "two blue squares"]


def hand_cosine(model, images, prompts):
    pixels = (images - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    img = model.encode_image(pixels)
    txt = model.encode_text(char_tokenizer(prompts))
    return (img * txt).sum(-1) / (img.norm(dim=-1) * txt.norm(dim=-1))


def test_equals_hand_cosine_at_native_size():
    model = tiny_open_clip()
    reward = CLIPScore(model, char_tokenizer)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = hand_cosine(model, images, PROMPTS)
        got = reward(images, PROMPTS)
    assert got.dtype == torch.float32 and got.shape == (2,)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got[0], got[1])  # the tiny model does respond to its inputs


def test_resizes_any_input_size():
    model = tiny_open_clip()
    reward = CLIPScore(model, char_tokenizer)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = hand_cosine(model, F.interpolate(images, size=(32, 32), mode="bicubic", antialias=True), PROMPTS)
        torch.testing.assert_close(reward(images, PROMPTS), expected, atol=1e-6, rtol=1e-5)


def test_embeds_compose_to_score_and_metric_scaling():
    reward = CLIPScore(tiny_open_clip(), char_tokenizer)
    metric = CLIPScore(tiny_open_clip(), char_tokenizer, scale=100.0, clip_at_zero=True)
    images = torch.rand(4, 3, 32, 32)
    prompts = PROMPTS * 2
    with torch.no_grad():
        img_emb, txt_emb = reward.image_embed(images), reward.text_embed(prompts)
        assert img_emb.shape == txt_emb.shape == (4, 16)
        cos = reward.score_from_embeds(img_emb, txt_emb)
        torch.testing.assert_close(cos, reward(images, prompts))
        torch.testing.assert_close(metric(images, prompts), (100 * cos).clamp_min(0))


def test_frozen_and_exposes_tower():
    model = tiny_open_clip()
    reward = CLIPScore(model, char_tokenizer)
    assert reward.differentiable and reward.vision is model.visual
    assert reward.image_size == (32, 32) and reward.mean == OPENAI_CLIP_MEAN and reward.std == OPENAI_CLIP_STD
    assert not any(p.requires_grad for p in reward.parameters()) and not reward.model.training


def test_gradient_reaches_pixels():
    reward = CLIPScore(tiny_open_clip().double(), char_tokenizer)
    images = 0.1 + 0.8 * torch.rand(2, 3, 40, 40, dtype=torch.float64)  # resized 40 -> 32 inside
    finite_difference_check(lambda x: reward(x, PROMPTS), images)


def test_input_errors():
    reward = CLIPScore(tiny_open_clip(), char_tokenizer)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        reward(torch.rand(2, 32, 32, 3), PROMPTS)
    with pytest.raises(ValueError, match="one per image"):
        reward(torch.rand(3, 3, 32, 32), PROMPTS)
    with pytest.raises(ValueError, match="tokenizer must return a LongTensor"):
        CLIPScore(tiny_open_clip(), lambda prompts: [[1, 2]])(torch.rand(1, 3, 32, 32), ["a"])


def test_from_pretrained_round_trip(tmp_path, tiny_open_clip_name):
    model = tiny_open_clip(seed=3)
    path = tmp_path / "tiny.safetensors"
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(path))
    loaded = CLIPScore.from_pretrained(tiny_open_clip_name, path, tokenizer=char_tokenizer)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, PROMPTS), CLIPScore(model, char_tokenizer)(images, PROMPTS))


def test_from_pretrained_reads_a_tags_preprocessing(tmp_path, tiny_open_clip_name, monkeypatch):
    # a file knows only the architecture's preprocessing; the tag it was published under may set its own
    import open_clip
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file(tiny_open_clip(seed=3).state_dict(), str(path))
    tags = {"half": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}}
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, tag: tags.get(tag, {}))
    loaded = CLIPScore.from_pretrained(tiny_open_clip_name, path, tokenizer=char_tokenizer, pretrained_tag="half")
    assert loaded.preprocess_cfg.mean == (0.5, 0.5, 0.5) and loaded.preprocess_cfg.std == (0.5, 0.5, 0.5)
    plain = CLIPScore.from_pretrained(tiny_open_clip_name, path, tokenizer=char_tokenizer)
    assert plain.preprocess_cfg.mean != (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="no pretrained tag 'nope'"):
        CLIPScore.from_pretrained(tiny_open_clip_name, path, tokenizer=char_tokenizer, pretrained_tag="nope")


def test_from_pretrained_missing_file_says_where_and_how(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*Pass the path"):
        CLIPScore.from_pretrained("ViT-L-14", missing)
    # A pretrained tag is never downloaded; the message says how to get the file and about QuickGELU.
    with pytest.raises(FileNotFoundError, match="pretrained tag.*never downloaded.*ViT-L-14-quickgelu"):
        CLIPScore.from_pretrained("ViT-L-14", "openai")
