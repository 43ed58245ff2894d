"""PickScore on a tiny random transformers CLIPModel: exp(logit_scale) · cos, processor-equivalent input."""

import pytest
import torch
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from critics.rewards import PickScore
from critics.rewards.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, preprocess
from tests.critics.rewards.conftest import (
    finite_difference_check,
    pil_uint8_image,
    tiny_hf_clip,
    word_tokenizer,
)
from tests.critics.rewards.test_base import to_pil

PROMPTS = ["a red circle", "two blue square and a star"]


def features(output):
    # transformers 5 returns BaseModelOutputWithPooling from get_*_features; 4.x returned the tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def reference_score(model, pixel_values, prompts):
    """The PickScore model card's computation."""
    tokens = word_tokenizer()(prompts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    img = features(model.get_image_features(pixel_values=pixel_values))
    txt = features(model.get_text_features(**tokens))
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp() * (img * txt).sum(-1)


def test_equals_model_card_score():
    model = tiny_hf_clip()
    reward = PickScore(model, word_tokenizer())
    images = torch.rand(2, 3, 32, 32)
    pixels = (images - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = reference_score(model, pixels, PROMPTS)
        got = reward(images, PROMPTS)
        assert got.dtype == torch.float32 and got.shape == (2,)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        from_embeds = reward.score_from_embeds(reward.image_embed(images), reward.text_embed(PROMPTS))
        torch.testing.assert_close(from_embeds, got)


def test_preprocessing_matches_clip_image_processor():
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model = tiny_hf_clip()
    reward = PickScore(model, word_tokenizer())
    images = pil_uint8_image(40, 52, seed=2)
    pixel_values = processor(images=[to_pil(images)], return_tensors="pt")["pixel_values"]
    ours = preprocess(images, reward.preprocess_cfg)
    assert (ours - pixel_values).abs().mean() < 6e-3 and (ours - pixel_values).abs().max() < 0.03
    with torch.no_grad():
        expected = reference_score(model, pixel_values, PROMPTS[:1])
        got = reward(images, PROMPTS[:1])
    # Equal up to PIL's uint8 rounding of the resized image (differences ~1e-2 of a logit of ~2.7).
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=0)


def test_vision_is_the_models_own_tower():
    model = tiny_hf_clip()
    reward = PickScore(model, word_tokenizer())
    assert isinstance(reward.vision, CLIPVisionModelWithProjection)
    assert reward.vision.vision_model is model.vision_model
    assert reward.vision.visual_projection is model.visual_projection
    assert reward.image_size == (32, 32) and reward.differentiable
    assert not any(p.requires_grad for p in reward.parameters())
    assert all(p.device.type == "cpu" for p in reward.parameters())


def test_gradient_reaches_pixels():
    reward = PickScore(tiny_hf_clip().double(), word_tokenizer())
    images = 0.1 + 0.8 * torch.rand(2, 3, 36, 36, dtype=torch.float64)
    finite_difference_check(lambda x: reward(x, PROMPTS), images)


def test_from_pretrained_local_dir(tmp_path):
    model = tiny_hf_clip(seed=4)
    model.save_pretrained(tmp_path / "model")
    word_tokenizer().save_pretrained(tmp_path / "processor")
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.25] * 3
    )
    processor.save_pretrained(tmp_path / "processor")
    reward = PickScore.from_pretrained(tmp_path / "model", processor_path=tmp_path / "processor")
    assert reward.mean == (0.5, 0.5, 0.5) and reward.std == (0.25, 0.25, 0.25) and reward.image_size == (32, 32)
    images = torch.rand(2, 3, 32, 32)
    expected = PickScore(model, word_tokenizer(), mean=[0.5] * 3, std=[0.25] * 3)
    with torch.no_grad():
        torch.testing.assert_close(reward(images, PROMPTS), expected(images, PROMPTS))


def test_from_pretrained_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"model directory not found: {tmp_path / 'nope'}"):
        PickScore.from_pretrained(tmp_path / "nope")
