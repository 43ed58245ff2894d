"""HPSv2: raw cosine with HPSv2's resize-longest-and-pad input; loading {"state_dict": ...} checkpoints."""

import pickle

import pytest
import torch
import torchvision.transforms.functional as TF

from critics.rewards import CLIPScore, HPSv2
from critics.rewards.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from tests.critics.rewards.conftest import char_tokenizer, finite_difference_check, tiny_open_clip

PROMPTS = ["a red circle", "two blue squares"]


class NotATensor:
    pass


def test_equals_raw_cosine_of_padded_image():
    model = tiny_open_clip()
    reward = HPSv2(model, char_tokenizer)
    images = torch.rand(2, 3, 48, 64)
    # HPSv2's ResizeMaxSize by hand: scale the longest side 64 -> 32, height 48 -> 24, pad 4 rows each side.
    resized = TF.resize(images, [24, 32], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    padded = TF.pad(resized, [0, 4, 0, 4], fill=0.0)
    pixels = TF.normalize(padded, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    with torch.no_grad():
        img = model.encode_image(pixels, normalize=True)
        txt = model.encode_text(char_tokenizer(PROMPTS), normalize=True)
        expected = (img * txt).sum(-1)  # hpsv2/img_score.py: diagonal(image_features @ text_features.T)
        torch.testing.assert_close(reward(images, PROMPTS), expected, atol=1e-6, rtol=1e-5)


def test_square_images_match_clip_score():
    images = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(
            HPSv2(tiny_open_clip(), char_tokenizer)(images, PROMPTS),
            CLIPScore(tiny_open_clip(), char_tokenizer)(images, PROMPTS),
        )


def test_gradient_reaches_pixels():
    reward = HPSv2(tiny_open_clip().double(), char_tokenizer)
    images = 0.1 + 0.8 * torch.rand(2, 3, 30, 44, dtype=torch.float64)
    finite_difference_check(lambda x: reward(x, PROMPTS), images)


def test_loads_hpsv2_style_checkpoint(tmp_path, tiny_open_clip_name):
    # The released checkpoints are {"state_dict": ...}, from DDP training ("module." prefix).
    model = tiny_open_clip(seed=5)
    path = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    reward = HPSv2.from_pretrained(tiny_open_clip_name, path, tokenizer=char_tokenizer)
    assert isinstance(reward, HPSv2) and reward.preprocess_cfg.resize_mode == "longest"
    images = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(reward(images, PROMPTS), HPSv2(model, char_tokenizer)(images, PROMPTS))


def test_refuses_pickled_code(tmp_path, tiny_open_clip_name):
    # torch.load(weights_only=True): a checkpoint carrying arbitrary objects is rejected, not executed.
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": tiny_open_clip().state_dict(), "extra": NotATensor()}, path)
    with pytest.raises(pickle.UnpicklingError):
        HPSv2.from_pretrained(tiny_open_clip_name, path, tokenizer=char_tokenizer)
