"""LAION aesthetic predictor: the released head's layout, a hand computation, both tower kinds, loading."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from critics.rewards import Aesthetic, AestheticMLP
from critics.rewards.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from tests.critics.rewards.conftest import EMBED_DIM, finite_difference_check, tiny_open_clip

PROMPTS = ["ignored", "also ignored"]
# Parameter names of sac+logos+ava1-l14-linearMSE.pth (Linear layers at indices 0, 2, 4, 6, 7).
LAION_KEYS = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}


def normalised(images):
    return (images - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)


def test_head_matches_released_layout():
    head = AestheticMLP()
    assert set(head.state_dict()) == LAION_KEYS
    widths = [m.out_features for m in head.layers if isinstance(m, torch.nn.Linear)]
    assert head.layers[0].in_features == 768 and widths == [1024, 128, 64, 16, 1]


def test_equals_head_on_normalised_embedding():
    torch.manual_seed(0)
    model, head = tiny_open_clip(), AestheticMLP(embed_dim=EMBED_DIM)
    reward = Aesthetic(model.visual, head)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        emb = model.encode_image(normalised(images))
        expected = head.eval()(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
        got = reward(images, PROMPTS)
        assert got.shape == (2,) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(reward.score_from_image_embed(reward.image_embed(images)), got)
    assert not reward.head.training and not any(p.requires_grad for p in reward.parameters())


def test_transformers_tower():
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, projection_dim=EMBED_DIM,
    )
    tower, head = CLIPVisionModelWithProjection(config).eval(), AestheticMLP(embed_dim=EMBED_DIM).eval()
    reward = Aesthetic(tower, head)
    assert reward.image_size == (32, 32) and reward.vision is tower
    images = torch.rand(2, 3, 64, 48)
    with torch.no_grad():
        pixels = normalised(F.interpolate(images, size=(42, 32), mode="bicubic", antialias=True)[:, :, 5:37])
        emb = tower(pixel_values=pixels).image_embeds
        torch.testing.assert_close(reward(images, PROMPTS), head(F.normalize(emb, dim=-1)).squeeze(-1))


def test_gradient_reaches_pixels():
    torch.manual_seed(0)
    reward = Aesthetic(tiny_open_clip().visual.double(), AestheticMLP(embed_dim=EMBED_DIM).double())
    images = 0.1 + 0.8 * torch.rand(2, 3, 32, 32, dtype=torch.float64)
    finite_difference_check(lambda x: reward(x, PROMPTS), images)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_from_pretrained(tmp_path, tiny_open_clip_name, suffix):
    torch.manual_seed(1)
    model, head = tiny_open_clip(seed=2), AestheticMLP(embed_dim=EMBED_DIM)
    clip_path, head_path = tmp_path / "clip.safetensors", tmp_path / f"head{suffix}"
    save_file(model.state_dict(), str(clip_path))
    if suffix == ".safetensors":
        save_file(head.state_dict(), str(head_path))
    else:
        torch.save(head.state_dict(), head_path)
    reward = Aesthetic.from_pretrained(head_path, clip_path, clip_model_name=tiny_open_clip_name)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reward(images, PROMPTS), Aesthetic(model.visual, head)(images, PROMPTS))


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="aesthetic head weights not found.*improved-aesthetic-predictor"):
        Aesthetic.from_pretrained(tmp_path / "head.pth", tmp_path / "clip.pt")
    reward = Aesthetic(tiny_open_clip().visual, AestheticMLP())  # 16-d tower, 768-d head
    with pytest.raises(ValueError, match="embedding width 16 does not match.*768"):
        reward(torch.rand(1, 3, 32, 32), ["x"])
