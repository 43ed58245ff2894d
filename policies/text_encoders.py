"""Text encoders for SD3-family flow transformers.

A TextEncoder maps prompts to the two conditioning inputs of ``SD3Transformer2DModel``:
``prompt_embeds (B, L, joint_attention_dim)`` for the joint attention stream and
``pooled (B, pooled_projection_dim)`` for the AdaLN timestep/text embedding.

- :class:`SD3TextEncoders` is SD3's triple (CLIP-L, CLIP-G, T5-XXL); it delegates to diffusers'
  ``StableDiffusion3Pipeline.encode_prompt`` so the embeddings are exactly the pipeline's.
- :class:`CLIPTextEncoder` is one transformers ``CLIPTextModelWithProjection`` tower: ``last_hidden_state`` feeds
  the joint stream and ``text_embeds`` is the pooled vector. The Shapes world uses it with a small word-level
  tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn


class TextEncoder(Protocol):
    """encode(prompts) -> (prompt_embeds (B, L, D_joint), pooled (B, D_pool)) on the encoder's device."""

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]: ...


def _check_prompts(prompts: list[str]) -> None:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}: {prompts!r:.80}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: pass at least one prompt (use '' for the unconditional prompt)")


class CLIPTextEncoder(nn.Module):
    """One CLIP text tower (transformers ``CLIPTextModelWithProjection``) as an SD3 text encoder.

    Args:
        model: the text tower; its hidden size must equal the transformer's joint_attention_dim and its
            projection_dim the pooled_projection_dim.
        tokenizer: a transformers tokenizer (``CLIPTokenizer`` or ``PreTrainedTokenizerFast``).
        max_length: token context; prompts are padded/truncated to it.
    """

    def __init__(self, model: nn.Module, tokenizer, max_length: int | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(max_length or model.config.max_position_embeddings)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def joint_dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def pooled_dim(self) -> int:
        return self.model.config.projection_dim

    def tokenize(self, prompts: list[str]) -> Tensor:
        _check_prompts(prompts)
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt")
        return tokens.input_ids.to(self.device)

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        out = self.model(input_ids=self.tokenize(prompts))
        return out.last_hidden_state, out.text_embeds


def word_tokenizer(words, max_length: int = 32):
    """A word-level transformers ``PreTrainedTokenizerFast`` built in memory: [PAD]=0, [UNK]=1, [BOS]=2, words,
    and [EOS] last (open_clip pools text at argmax(token id), so end-of-text must be the largest id)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2}
    for w in sorted(set(words)):
        vocab.setdefault(w, len(vocab))
    vocab["[EOS]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]",
                                   eos_token="[EOS]", model_max_length=max_length)


class SD3TextEncoders(nn.Module):
    """SD3's CLIP-L + CLIP-G + T5 conditioning, computed by diffusers' own ``encode_prompt``.

    ``text_encoder_3`` / ``tokenizer_3`` may be None: SD3 then pads the T5 stream with zeros, as diffusers does, of
    width ``joint_attention_dim`` (the transformer's; 4096 for SD3 / SD3.5), which diffusers reads from the
    pipeline's transformer — this pipeline holds none, so a stand-in carries that one number.
    """

    def __init__(self, text_encoder, tokenizer, text_encoder_2, tokenizer_2, text_encoder_3=None, tokenizer_3=None,
                 max_sequence_length: int = 256, joint_attention_dim: int = 4096):
        super().__init__()
        from diffusers import StableDiffusion3Pipeline

        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = text_encoder, text_encoder_2, text_encoder_3
        self.max_sequence_length = max_sequence_length
        # A pipeline holding only the text components: encode_prompt is then diffusers' code, not a copy of it.
        # Kept out of the module tree (object.__setattr__) so .to()/.state_dict() see each encoder once.
        pipe = StableDiffusion3Pipeline(
            transformer=None, scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=tokenizer,
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3)
        if text_encoder_3 is None:  # only the zero T5 stream reads the transformer (its joint_attention_dim)
            from types import SimpleNamespace

            stand_in = SimpleNamespace(config=SimpleNamespace(joint_attention_dim=joint_attention_dim))
            object.__setattr__(pipe, "transformer", stand_in)  # past DiffusionPipeline's module registration
        object.__setattr__(self, "_pipe", pipe)

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    @classmethod
    def from_pretrained(cls, path: str | Path, torch_dtype: torch.dtype = torch.float32, load_t5: bool = True,
                        local_files_only: bool = True, max_sequence_length: int = 256,
                        joint_attention_dim: int = 4096) -> "SD3TextEncoders":
        """Load the three encoders from an SD3 checkpoint directory (diffusers layout) or Hub id."""
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        kw = dict(torch_dtype=torch_dtype, local_files_only=local_files_only)
        parts = dict(
            text_encoder=CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder", **kw),
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=local_files_only),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kw),
            tokenizer_2=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", local_files_only=local_files_only),
        )
        if load_t5:
            parts["text_encoder_3"] = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", **kw)
            parts["tokenizer_3"] = T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_3",
                                                                   local_files_only=local_files_only)
        return cls(**parts, max_sequence_length=max_sequence_length, joint_attention_dim=joint_attention_dim)

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        _check_prompts(prompts)
        embeds, _, pooled, _ = self._pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return embeds, pooled
