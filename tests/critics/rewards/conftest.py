"""Tiny random reward towers built from configs (no downloads) and helpers shared by the reward tests."""

import json

import numpy as np
import open_clip
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

EMBED_DIM = 16
TINY_OPEN_CLIP = {
    "embed_dim": EMBED_DIM,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 2},
}
TINY_OPEN_CLIP_NAME = "stitchvm-test-tiny-clip"
WORDS = ["a", "red", "blue", "green", "circle", "square", "star", "two", "and", "photo", "of"]


def char_tokenizer(prompts: list[str], length: int = 16) -> torch.Tensor:
    """Character-level tokenizer standing in for the Shapes one: ids 1..60, sot 62, eot 63 = the largest id
    (open_clip pools the text tower at argmax(token ids)), 0 = padding."""
    out = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids = [62] + [ord(c) % 60 + 1 for c in prompt][: length - 2] + [63]
        out[row, : len(ids)] = torch.tensor(ids)
    return out


def tiny_open_clip(seed: int = 0) -> open_clip.CLIP:
    torch.manual_seed(seed)
    return open_clip.CLIP(**TINY_OPEN_CLIP).eval()


@pytest.fixture(scope="session")
def tiny_open_clip_name(tmp_path_factory) -> str:
    """Registers the tiny config with open_clip so that the ``from_pretrained`` (file) code path can run."""
    path = tmp_path_factory.mktemp("open_clip_cfg") / f"{TINY_OPEN_CLIP_NAME}.json"
    path.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(path)
    return TINY_OPEN_CLIP_NAME


def tiny_hf_clip(seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=1,
        ),
        vision_config=dict(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2,
        ),
        projection_dim=EMBED_DIM,
    )
    return CLIPModel(config).eval()


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level transformers tokenizer over WORDS (as the Shapes text tokenizer): <pad>=0, <eos>=1, <bos>=2;
    every prompt becomes ``<bos> words <eos>`` and the CLIP text tower pools at the first <eos>."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def pil_uint8_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A smooth random image (1, 3, H, W) whose values are exact multiples of 1/255 (PIL round-trips it)."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((1, 3, 6, 6))).float()
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return (smooth * 255).round() / 255


def finite_difference_check(fn, images: torch.Tensor, eps: float = 1e-2, rtol: float = 2e-2) -> None:
    """Autograd d fn(images).sum() / d pixel equals a central difference, at the pixel of largest gradient."""
    images = images.clone().requires_grad_(True)
    fn(images).sum().backward()
    grad = images.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0
    index = np.unravel_index(int(grad.abs().argmax()), tuple(grad.shape))
    with torch.no_grad():
        plus, minus = images.detach().clone(), images.detach().clone()
        plus[index] += eps
        minus[index] -= eps
        numeric = (fn(plus).double().sum() - fn(minus).double().sum()) / (2 * eps)
    assert float(numeric) == pytest.approx(float(grad[index]), rel=rtol)
