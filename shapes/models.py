"""The Shapes world's trained tiny models: configs, savers and one-line offline loaders.

    policy = load_shapes_policy()                 # FlowPolicy: SD3 MMDiT + AutoencoderKL + CLIP text tower
    model, tokenize = load_shapes_clip()          # open_clip.CLIP (eval) + word tokenizer -> LongTensor (B, L)
    reward = load_shapes_reward()                 # critics.rewards.clip_score.CLIPScore, the default reward

Everything is the real library class at a small config (docs/shapes_world.md has the figures):

    component      class                                     size                       input -> output
    VAE            diffusers AutoencoderKL                   3 levels (32, 64, 128)     (3, 64, 64) -> (4, 16, 16)
    text encoder   transformers CLIPTextModelWithProjection  width 128, 3 layers        16 tokens -> (16, 128), (128,)
    flow           diffusers SD3Transformer2DModel           width 128, 8 joint blocks  patch 2 -> 8x8 tokens
    reward         open_clip CLIP (ViT 64/8, text 3 layers)  vision 192 x 6, text 128   (3, 64, 64), 16 tokens -> 128

Text is tokenised by one word-level tokenizer (``tokenizer.json``: [PAD]=0, [UNK]=1, [BOS]=2, the caption words,
[EOS] last) shared by the policy's text tower and the CLIP text tower; open_clip pools its text tower at
argmax(token id), which is [EOS] because it is the largest id.

Weights live in ``shapes/weights/`` (fp16 safetensors + JSON configs, diffusers/transformers layouts where the
class has one) and are rebuilt by ``REBUILD_COMMAND``. Loaders never touch the network.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn

from policies.flow import FlowPolicy
from policies.text_encoders import CLIPTextEncoder, word_tokenizer
from rl.checkpoint import atomic_write_bytes, interrupted_swap, write_dir_atomically

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
REBUILD_COMMAND = "python -m shapes.train_all --device cuda"
CONTEXT_LENGTH = 16  # longest caption: prefix (3) + group (3) + "on the left of" (4) + group (3) + [BOS], [EOS] = 15
SPECIAL_TOKENS = dict(unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]")
STORE_DTYPE = torch.float16  # shipped weights; every loader casts to the dtype asked for

# file layout under a weights directory
VAE_DIR = "vae"
TRANSFORMER_DIR = "transformer"
TEXT_ENCODER_DIR = "text_encoder"
CLIP_DIR = "clip"
TOKENIZER_FILE = "tokenizer.json"
POLICY_FILE = "policy.json"
CLIP_CONFIG_FILE = "open_clip_config.json"
CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"


# ---------------------------------------------------------------------------------------------------------
# Configs (the shipped sizes; the training scripts take overrides for tiny CPU runs)
# ---------------------------------------------------------------------------------------------------------


def vae_config(block_out_channels: tuple[int, ...] = (32, 64, 128), layers_per_block: int = 1,
               latent_channels: int = 4, norm_num_groups: int = 32, image_size: int = 64) -> dict:
    """AutoencoderKL kwargs: len(block_out_channels) levels -> 2^(levels-1) downsampling (4x for 3 levels).
    ``scaling_factor`` / ``shift_factor`` are placeholders until the trained encoder's statistics set them."""
    levels = len(block_out_channels)
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(block_out_channels),
                layers_per_block=layers_per_block, latent_channels=latent_channels, norm_num_groups=norm_num_groups,
                sample_size=image_size, scaling_factor=1.0, shift_factor=0.0)


def text_encoder_config(tokenizer, hidden_size: int = 128, num_layers: int = 3, num_heads: int = 4,
                        projection_dim: int = 128) -> dict:
    """CLIPTextConfig kwargs for the policy's text tower (eos_token_id = the tokenizer's [EOS], so transformers
    pools at the [EOS] position)."""
    return dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=num_heads,
                max_position_embeddings=tokenizer.model_max_length, projection_dim=projection_dim,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)


def transformer_config(text_hidden: int, text_projection: int, num_layers: int = 8, num_heads: int = 4,
                       head_dim: int = 32, latent_size: int = 16, latent_channels: int = 4) -> dict:
    """SD3Transformer2DModel kwargs: width = num_heads * head_dim, patch 2 (8x8 image tokens for 16x16 latents),
    joint stream fed by the text tower's hidden states, AdaLN by its projected pooled vector."""
    width = num_heads * head_dim
    return dict(sample_size=latent_size, patch_size=2, in_channels=latent_channels, out_channels=latent_channels,
                num_layers=num_layers, attention_head_dim=head_dim, num_attention_heads=num_heads,
                joint_attention_dim=text_hidden, caption_projection_dim=width, pooled_projection_dim=text_projection,
                pos_embed_max_size=latent_size)


def clip_config(vocab_size: int, context_length: int = CONTEXT_LENGTH, embed_dim: int = 128, image_size: int = 64,
                patch_size: int = 8, vision_width: int = 192, vision_layers: int = 6, head_width: int = 32,
                text_width: int = 128, text_heads: int = 4, text_layers: int = 3) -> dict:
    """open_clip.CLIP kwargs: a standard VisionTransformer (class token, ln_pre, transformer, ln_post, proj) on
    64x64 / patch 8 = 8x8 patches, and a causal text transformer pooled at argmax(token id) = [EOS]."""
    return dict(embed_dim=embed_dim,
                vision_cfg=dict(image_size=image_size, patch_size=patch_size, width=vision_width,
                                layers=vision_layers, head_width=head_width),
                text_cfg=dict(context_length=context_length, vocab_size=vocab_size, width=text_width,
                              heads=text_heads, layers=text_layers))


def build_vae(config: dict):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**config)


def build_text_encoder(config: dict):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(**config))


def build_transformer(config: dict):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**config)


def build_clip(config: dict):
    import open_clip

    return open_clip.CLIP(**copy.deepcopy(config))


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------


def build_tokenizer(max_length: int = CONTEXT_LENGTH):
    """The word-level tokenizer over ``shapes.data.vocabulary()`` (training only: loading reads tokenizer.json,
    so shipped weights keep their ids if the vocabulary ever changes)."""
    from shapes.data import vocabulary

    return word_tokenizer(vocabulary(), max_length=max_length)


def save_tokenizer(tokenizer, path: str | Path) -> None:
    """Write the backend tokenizer (vocabulary, normaliser, [BOS]/[EOS] template), without the padding and
    truncation state that calls leave on it: those are per-call arguments. Atomic, as every Shapes saver."""
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.no_padding()
    backend.no_truncation()
    atomic_write_bytes(path, backend.to_str(pretty=True).encode())


def load_tokenizer(path: str | Path, max_length: int = CONTEXT_LENGTH):
    """A ``PreTrainedTokenizerFast`` from a tokenizer.json written by :func:`save_tokenizer`."""
    from transformers import PreTrainedTokenizerFast

    path = _require(Path(path))
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path), model_max_length=max_length, **SPECIAL_TOKENS)
    if tokenizer.eos_token_id != len(tokenizer) - 1:
        raise ValueError(f"{path}: [EOS] must be the largest token id (open_clip pools at argmax), got "
                         f"{tokenizer.eos_token_id} of {len(tokenizer)}")
    return tokenizer


class WordTokenize:
    """``tokenize(texts) -> LongTensor (B, L)`` for the CLIP reward: [BOS] words [EOS] [PAD]...

    Unlike a BPE tokenizer, a word-level vocabulary cannot spell an unseen word: a prompt with words outside it,
    or longer than the context, is an error rather than a silent [UNK] / truncation (the reward would score
    something other than the prompt). The empty prompt is allowed.
    """

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer = tokenizer
        self.context_length = int(context_length)

    def __call__(self, texts: list[str]) -> Tensor:
        if isinstance(texts, str):
            raise TypeError(f"texts must be a list of strings, got a single str: {texts!r:.80}")
        ids = self.tokenizer(list(texts)).input_ids  # list of [BOS] ... [EOS]
        unk = self.tokenizer.unk_token_id
        for text, row in zip(texts, ids):
            if len(row) > self.context_length:
                raise ValueError(f"prompt {text!r:.120} has {len(row) - 2} words; the Shapes CLIP context holds "
                                 f"{self.context_length - 2}")
            if unk in row:
                raise ValueError(f"prompt {text!r:.120} has words outside the Shapes vocabulary "
                                 f"(shapes.data.vocabulary())")
        tokens = torch.full((len(ids), self.context_length), self.tokenizer.pad_token_id, dtype=torch.long)
        for b, row in enumerate(ids):
            tokens[b, : len(row)] = torch.tensor(row)
        return tokens


# ---------------------------------------------------------------------------------------------------------
# Saving (fp16 on disk)
# ---------------------------------------------------------------------------------------------------------


# Every saver replaces its file or directory atomically (rl.checkpoint): a training script killed while saving
# leaves the previous weights loadable, never a half-written directory that the strict loaders would refuse.


def clear_scratch(weights_dir: str | Path) -> None:
    """Delete the temporary files a killed save left in ``weights_dir`` (atomic_write_bytes' `.<name>.<random>.tmp`;
    write_dir_atomically cleans its own fixed `.<name>.tmp` directories): called by every saver before it writes."""
    weights_dir = Path(weights_dir)
    if weights_dir.is_dir():
        for name in (TOKENIZER_FILE, POLICY_FILE):
            for stale in weights_dir.glob(f".{name}.*.tmp"):
                stale.unlink(missing_ok=True)


def _half_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).to(device="cpu", dtype=STORE_DTYPE)


def _save_pretrained(module: nn.Module, path: Path) -> None:
    """A diffusers / transformers model's float16 copy, saved as safetensors into ``path`` atomically."""
    half = _half_copy(module)
    write_dir_atomically(path, lambda tmp: half.save_pretrained(tmp, safe_serialization=True))


def save_vae(vae, weights_dir: str | Path) -> None:
    clear_scratch(weights_dir)
    _save_pretrained(vae, Path(weights_dir) / VAE_DIR)


def save_policy(transformer, text_model, tokenizer, weights_dir: str | Path, policy_cfg: dict, vae=None) -> None:
    """Transformer (diffusers layout), text tower (transformers layout), tokenizer.json and policy.json; with
    ``vae`` (the one the transformer was trained on) policy.json records its fingerprint, and the loader refuses
    the policy with another VAE."""
    weights_dir = Path(weights_dir)
    if vae is not None:
        from critics.vae_stitch import vae_fingerprint

        policy_cfg = {**policy_cfg, "vae_fingerprint": vae_fingerprint(vae)}
    clear_scratch(weights_dir)
    _save_pretrained(transformer, weights_dir / TRANSFORMER_DIR)
    _save_pretrained(text_model, weights_dir / TEXT_ENCODER_DIR)
    save_tokenizer(tokenizer, weights_dir / TOKENIZER_FILE)
    # policy.json last, with the checksums of the parts above: a save killed between two parts leaves an old
    # policy.json next to a new part, which load_shapes_policy then refuses instead of mixing them
    policy_cfg = {**policy_cfg, "weights_sha256": {k: _sha256(p) for k, p in _policy_parts(weights_dir).items()}}
    atomic_write_bytes(weights_dir / POLICY_FILE, (json.dumps(policy_cfg, indent=2, sort_keys=True) + "\n").encode())


def save_clip(model: nn.Module, config: dict, tokenizer, weights_dir: str | Path) -> None:
    state = {k: v.detach().to("cpu", STORE_DTYPE).contiguous() for k, v in model.state_dict().items()}
    clear_scratch(weights_dir)

    def write(tmp: str) -> None:
        safetensors.torch.save_file(state, str(Path(tmp) / CLIP_WEIGHTS_FILE))
        (Path(tmp) / CLIP_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    write_dir_atomically(Path(weights_dir) / CLIP_DIR, write)
    save_tokenizer(tokenizer, Path(weights_dir) / TOKENIZER_FILE)


# ---------------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------------


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"missing Shapes weights file {path}; rebuild the weights with `{REBUILD_COMMAND}` "
                                f"(about 13 minutes on one GPU; see docs/shapes_world.md)")
    return path


def _weights_subdir(path: Path) -> Path:
    """``path``, or, when a save was killed between the two renames of its swap (rl.checkpoint.write_dir_atomically),
    the complete previous version it left beside it (the next save of that part moves it back)."""
    previous = interrupted_swap(path)
    if previous is None:
        return path
    print(f"warning: {path} is missing: a save into it was interrupted; loading the previous version from "
          f"{previous} (the next save puts it back)", file=sys.stderr)
    return Path(previous)


def _require_model_dir(path: Path, weights_file: str) -> Path:
    path = _weights_subdir(path)
    _require(path / "config.json")
    _require(path / weights_file)
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _policy_parts(weights_dir: Path) -> dict[str, Path]:
    """The weight files a policy save writes before policy.json, whose checksums policy.json records (binary files
    only: git may rewrite a text file's line endings on checkout; the tokenizer is checked against the text tower's
    vocabulary size instead)."""
    return {TRANSFORMER_DIR: _weights_subdir(weights_dir / TRANSFORMER_DIR) / DIFFUSERS_WEIGHTS,
            TEXT_ENCODER_DIR: _weights_subdir(weights_dir / TEXT_ENCODER_DIR) / TRANSFORMERS_WEIGHTS}


def check_policy_parts(weights_dir: Path, recorded: dict[str, str] | None) -> None:
    """Refuse a transformer / text tower pair that is not the one policy.json was written with: the parts
    are swapped in one after another, so a save killed between them leaves new and old parts side by side."""
    if recorded is None:  # policy.json written before session 14
        return
    stale = [name for name, path in _policy_parts(weights_dir).items()
             if name in recorded and (not path.exists() or _sha256(path) != recorded[name])]
    if stale:
        raise ValueError(f"{weights_dir}: {', '.join(stale)} not the one(s) {POLICY_FILE} was written with -- a save "
                         f"of the policy was interrupted, or a file was replaced by hand; save the policy again "
                         f"(`python -m shapes.train_flow`) or restore it (`git checkout -- {weights_dir}`)")


@dataclass(frozen=True)
class PolicyConfig:
    """policy.json: the sampling defaults the shipped policy was chosen at (docs/shapes_world.md).

    Attributes:
        shift: SD3 timestep shift of the Euler schedule.
        guidance_scale: default CFG weight (1.0 = CFG-free).
        num_steps: default number of Euler steps.
        context_length: token context of the text tower.
        train_step: training step of the shipped (EMA) checkpoint.
    """

    shift: float
    guidance_scale: float
    num_steps: int
    context_length: int
    train_step: int


def policy_config(weights_dir: str | Path | None = None) -> PolicyConfig:
    path = _require(Path(weights_dir or WEIGHTS_DIR) / POLICY_FILE)
    data = json.loads(path.read_text())
    return PolicyConfig(**{k: data[k] for k in PolicyConfig.__dataclass_fields__})


def shapes_tokenizer(weights_dir: str | Path | None = None):
    weights_dir = Path(weights_dir or WEIGHTS_DIR)
    return load_tokenizer(weights_dir / TOKENIZER_FILE, policy_config(weights_dir).context_length)


def _strict_load(cls, path: Path, **kwargs):
    """``cls.from_pretrained`` that refuses weights which do not fit the config: transformers fills a missing tensor
    with random values and both libraries drop unexpected ones, each with only a log line."""
    model, info = cls.from_pretrained(path, local_files_only=True, output_loading_info=True, **kwargs)
    problems = {k: list(v) for k, v in info.items() if v}
    if problems:
        detail = "; ".join(f"{k}: {', '.join(map(str, v[:3]))}{'…' if len(v) > 3 else ''}" for k, v in problems.items())
        raise ValueError(f"{path}: the weights do not fit the config ({detail}); rebuild with `{REBUILD_COMMAND}`")
    return model


def shapes_vae(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               weights_dir: str | Path | None = None):
    """The trained AutoencoderKL (eval, frozen); its config carries the latent ``scaling_factor``/``shift_factor``."""
    from diffusers import AutoencoderKL

    path = _require_model_dir(Path(weights_dir or WEIGHTS_DIR) / VAE_DIR, DIFFUSERS_WEIGHTS)
    vae = _strict_load(AutoencoderKL, path, torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


def shapes_text_encoder(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        weights_dir: str | Path | None = None) -> CLIPTextEncoder:
    """The policy's text tower wrapped as a ``CLIPTextEncoder`` (eval, frozen)."""
    from transformers import CLIPTextModelWithProjection

    weights_dir = Path(weights_dir or WEIGHTS_DIR)
    path = _require_model_dir(weights_dir / TEXT_ENCODER_DIR, TRANSFORMERS_WEIGHTS)
    model = _strict_load(CLIPTextModelWithProjection, path)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    tokenizer = shapes_tokenizer(weights_dir)
    if len(tokenizer) != model.config.vocab_size:
        raise ValueError(f"{weights_dir / TOKENIZER_FILE} has {len(tokenizer)} tokens but the text encoder was "
                         f"trained with {model.config.vocab_size}; rebuild with `{REBUILD_COMMAND}`")
    return CLIPTextEncoder(model, tokenizer, tokenizer.model_max_length)


def load_shapes_policy(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                       weights_dir: str | Path | None = None) -> FlowPolicy:
    """The pretrained Shapes policy: a FlowPolicy over the trained MMDiT, VAE and text tower, with the shipped
    ``shift``. Sample at ``policy_config().num_steps`` Euler steps and ``policy_config().guidance_scale``.

    The transformer is in eval mode with gradients enabled (trainers add LoRA adapters or fine-tune it); the
    VAE and text encoder are frozen.
    """
    from diffusers import SD3Transformer2DModel

    weights_dir = Path(weights_dir or WEIGHTS_DIR)
    cfg = policy_config(weights_dir)
    path = _require_model_dir(weights_dir / TRANSFORMER_DIR, DIFFUSERS_WEIGHTS)
    recorded = json.loads((weights_dir / POLICY_FILE).read_text())  # what the policy save wrote last
    check_policy_parts(weights_dir, recorded.get("weights_sha256"))
    transformer = _strict_load(SD3Transformer2DModel, path, torch_dtype=dtype)
    vae = shapes_vae(device, dtype, weights_dir)
    trained_on = recorded.get("vae_fingerprint")
    if trained_on is not None:
        from critics.vae_stitch import vae_fingerprint

        found = vae_fingerprint(vae)
        if found != trained_on:
            raise ValueError(f"{weights_dir / VAE_DIR} is not the VAE the transformer was trained on (policy.json "
                             f"records encoder fingerprint {trained_on[:12]}, this VAE's is "
                             f"{found[:12]}): retrain the flow on it (`python -m shapes.train_flow`) "
                             f"or restore the VAE (`git checkout -- {weights_dir / VAE_DIR}`)")
    policy = FlowPolicy(transformer.to(device).eval(), vae, shapes_text_encoder(device, dtype, weights_dir),
                        shift=cfg.shift)
    return policy


def load_shapes_clip(device: str | torch.device = "cpu", weights_dir: str | Path | None = None):
    """The Shapes CLIP reward model: ``(open_clip.CLIP in eval mode, tokenize)`` with
    ``tokenize(list[str]) -> LongTensor (B, context_length)`` (see :class:`WordTokenize`)."""
    from safetensors.torch import load_file

    weights_dir = Path(weights_dir or WEIGHTS_DIR)
    clip_dir = _weights_subdir(weights_dir / CLIP_DIR)
    config = json.loads(_require(clip_dir / CLIP_CONFIG_FILE).read_text())
    model = build_clip(config)
    state = load_file(str(_require(clip_dir / CLIP_WEIGHTS_FILE)))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model = model.to(device).eval()
    context = config["text_cfg"]["context_length"]
    tokenizer = load_tokenizer(weights_dir / TOKENIZER_FILE, context)
    if len(tokenizer) != config["text_cfg"]["vocab_size"]:
        raise ValueError(f"{weights_dir / TOKENIZER_FILE} has {len(tokenizer)} tokens but the CLIP text tower was "
                         f"trained with {config['text_cfg']['vocab_size']}; rebuild with `{REBUILD_COMMAND}`")
    return model, WordTokenize(tokenizer, context)


def load_shapes_reward(device: str | torch.device = "cpu", weights_dir: str | Path | None = None, **kwargs):
    """The default Shapes reward: ``CLIPScore`` (raw cosine) of the Shapes CLIP. ``kwargs`` go to CLIPScore
    (``scale``, ``clip_at_zero``)."""
    from critics.rewards.clip_score import CLIPScore

    model, tokenize = load_shapes_clip(device, weights_dir)
    return CLIPScore(model, tokenize, **kwargs)
