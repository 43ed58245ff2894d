"""peft LoRA adapters on an SD3 transformer: several named adapters, the reference policy, diffusers export.

Adapters live on the diffusers model itself (``transformer.add_adapter``), never behind ``get_peft_model``:
that wrapper prefixes every key with ``base_model.model.`` and the result no longer loads with
``StableDiffusion3Pipeline.load_lora_weights``.

- ``add_lora(transformer, LoraSpec(), "default")`` — the trained policy theta.
- a second adapter (e.g. "old", DiffusionNFT's data-collection policy) is added with the same spec and kept in
  sync by :func:`copy_adapter` / :func:`ema_update`.
- ``with reference_policy(transformer):`` — all adapters off, i.e. the pretrained model theta_0 (KL anchor).
- :func:`export_diffusers` writes ``pytorch_lora_weights.safetensors`` that diffusers' pipelines load.

Under DeepSpeed ZeRO-3 every parameter is partitioned across processes (outside a forward pass ``p.data`` is an
empty placeholder). The functions here that read or write adapter weights — :func:`ema_update`,
:func:`copy_adapter`, :func:`adapter_state_dict`, :func:`load_adapter_state_dict`, :func:`export_diffusers` —
gather them first (:func:`gathered`); there they are collectives that every process must call. Elsewhere
:func:`gathered` is a no-op.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

# The SD3 attention projections, image stream and text ("add_") stream, as used by Flow-GRPO and the paper.
SD3_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@dataclass
class LoraSpec:
    """LoRA hyper-parameters.

    Attributes:
        r: rank.
        alpha: scaling numerator; the update is (alpha / r) B A.
        target_modules: module-name suffixes to adapt.
        dropout: LoRA dropout.
        init: peft's ``init_lora_weights`` ("gaussian" or True: B = 0 so the adapter starts as the identity).
    """

    r: int = 32
    alpha: float = 64.0
    target_modules: tuple[str, ...] = field(default_factory=lambda: SD3_TARGETS)
    dropout: float = 0.0
    init: bool | str = True

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        self.target_modules = tuple(self.target_modules)

    def to_peft(self):
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, target_modules=list(self.target_modules),
                          lora_dropout=self.dropout, init_lora_weights=self.init)


def _linear_names(model: nn.Module) -> list[str]:
    """Names of the adaptable linear layers (a layer already wrapped by peft counts by its own name)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [n for n, m in model.named_modules()
            if (isinstance(m, nn.Linear) or isinstance(m, BaseTunerLayer))
            and ".lora_" not in n and not n.endswith(".base_layer")]


def check_targets(model: nn.Module, targets: tuple[str, ...]) -> None:
    """Every target must match at least one nn.Linear by name suffix; else say which exist."""
    names = _linear_names(model)
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        suffixes = sorted({".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit() else n.split(".")[-1]
                           for n in names})
        raise ValueError(f"LoRA target module(s) {missing} not found in {type(model).__name__}. "
                         f"Linear layers it has: {suffixes}")


def add_lora(transformer: nn.Module, spec: LoraSpec, adapter_name: str = "default") -> None:
    """Add a LoRA adapter named ``adapter_name`` and make it the active, trainable one."""
    check_targets(transformer, spec.target_modules)
    if adapter_name in getattr(transformer, "peft_config", {}):
        raise ValueError(f"adapter '{adapter_name}' already exists on the transformer")
    with warnings.catch_warnings():  # a second named adapter (EMA, old policy) is the design, not an accident
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
        transformer.add_adapter(spec.to_peft(), adapter_name=adapter_name)
    transformer.set_adapter(adapter_name)


def adapter_names(transformer: nn.Module) -> list[str]:
    return list(getattr(transformer, "peft_config", {}))


def _require(transformer: nn.Module, name: str) -> None:
    if name not in adapter_names(transformer):
        raise KeyError(f"no LoRA adapter '{name}' on the transformer (adapters: {adapter_names(transformer)})")


def set_active(transformer: nn.Module, name: str) -> None:
    """Route forward passes through adapter ``name`` (peft then marks only it trainable)."""
    _require(transformer, name)
    transformer.set_adapter(name)


def adapter_parameters(transformer: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """The LoRA A/B parameters of one adapter, keyed by module path (adapter name removed)."""
    _require(transformer, name)
    tag = f".{name}."
    return {n.replace(tag, "."): p for n, p in transformer.named_parameters() if "lora_" in n and tag in n}


@contextlib.contextmanager
def reference_policy(transformer: nn.Module):
    """All adapters disabled: the frozen pretrained model theta_0 (KL reference). Restores on exit."""
    if not adapter_names(transformer):  # no adapters: the model already is theta_0
        yield transformer
        return
    transformer.disable_adapters()
    try:
        yield transformer
    finally:
        transformer.enable_adapters()


@contextlib.contextmanager
def using_adapter(transformer: nn.Module, name: str):
    """Temporarily route through adapter ``name``; restores the previously active adapter."""
    previous = list(transformer.active_adapters())
    set_active(transformer, name)
    try:
        yield transformer
    finally:
        transformer.set_adapter(previous[0] if len(previous) == 1 else previous)


@contextlib.contextmanager
def gathered(params, modify: bool = False):
    """Make ZeRO-3-partitioned ``params`` whole for the body: to read them, or to write them with ``modify=True``
    (process 0's values are then re-partitioned on exit; every process computes the same values here). A
    collective under ZeRO-3 — every process must enter it; a no-op for ordinary parameters."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]  # DeepSpeed's mark of a ZeRO-3 parameter
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None):
        yield


@torch.no_grad()
def copy_adapter(transformer: nn.Module, src: str, dst: str) -> None:
    """theta_dst <- theta_src."""
    ema_update(transformer, src, dst, decay=0.0)


_EMA_SHADOW = "_stitchvm_ema_shadow"  # transformer attribute: {(adapter, key): float32 copy of a low-precision weight}


@torch.no_grad()
def ema_update(transformer: nn.Module, src: str, dst: str, decay: float) -> None:
    """theta_dst <- decay * theta_dst + (1 - decay) * theta_src (DiffusionNFT's old-policy update).

    A bf16 / fp16 ``dst`` (a policy loaded in bf16, DeepSpeed's bf16 module) is averaged in a float32 shadow and
    rounded into the adapter after each update: in place, a step (1 - decay)|src - dst| below half a bf16 ulp of dst
    rounds away, and at decay 0.98 a bf16 EMA covered 27 % of the gap in 50 steps instead of 64 %. The shadow
    follows the adapter: one that no longer rounds to it (a checkpoint or keep_best loaded into the adapter) is
    started again from the adapter's values."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    p_src, p_dst = adapter_parameters(transformer, src), adapter_parameters(transformer, dst)
    if p_src.keys() != p_dst.keys():
        raise ValueError(f"adapters '{src}' and '{dst}' have different layouts; add both with the same LoraSpec")
    shadows = transformer.__dict__.setdefault(_EMA_SHADOW, {})
    with gathered(p_src.values()), gathered(p_dst.values(), modify=True):
        for key, p in p_dst.items():
            if p.dtype in (torch.float32, torch.float64):
                p.lerp_(p_src[key].to(p.dtype), 1.0 - decay)
                continue
            shadow = shadows.get((dst, key))
            if shadow is None or shadow.shape != p.shape or shadow.device != p.device \
                    or not torch.equal(shadow.to(p.dtype), p):
                shadow = p.detach().float().clone()
            shadow.lerp_(p_src[key].float(), 1.0 - decay)
            p.copy_(shadow)
            shadows[(dst, key)] = shadow


def ema_shadow_state(transformer: nn.Module, name: str) -> dict[str, Tensor]:
    """The float32 shadows of adapter ``name``'s low-precision parameters (see :func:`ema_update`), keyed as
    :func:`adapter_parameters`, for a checkpoint: without them a resumed bf16 EMA restarts from the rounded adapter
    and drifts from the uninterrupted run. Only shadows that still round to the adapter are returned (others
    would be restarted anyway); {} for a float32 adapter or one never averaged."""
    shadows = transformer.__dict__.get(_EMA_SHADOW, {})
    params = adapter_parameters(transformer, name)
    out = {}
    with gathered(params.values()):
        for key, p in params.items():
            shadow = shadows.get((name, key))
            if shadow is not None and shadow.shape == p.shape and torch.equal(shadow.to(p.dtype), p.to(shadow.device)):
                out[key] = shadow.detach().cpu().clone()
    return out


def load_ema_shadow_state(transformer: nn.Module, name: str, state: dict[str, Tensor]) -> None:
    """Inverse of :func:`ema_shadow_state`, after the adapter's own values are loaded. The shadow was saved only
    where it rounds to the saved adapter, so it is that adapter's exact value: the adapter takes it, rounded to its
    dtype (a run resumed in float32 gets the exact average, one resumed in another low precision the nearest value),
    and a low-precision adapter keeps it as its shadow."""
    params = adapter_parameters(transformer, name)
    unknown = sorted(state.keys() - params.keys())
    if unknown:
        raise ValueError(f"EMA shadow for adapter '{name}' has keys the adapter lacks: {unknown[:5]}")
    shadows = transformer.__dict__.setdefault(_EMA_SHADOW, {})
    with gathered(params.values(), modify=True), torch.no_grad():
        for key, value in state.items():
            p = params[key]
            if value.shape != p.shape:
                raise ValueError(f"EMA shadow '{key}' of adapter '{name}' has shape {tuple(value.shape)}, the adapter "
                                 f"{tuple(p.shape)} (different rank?)")
            p.copy_(value)
            if p.dtype not in (torch.float32, torch.float64):
                shadows[(name, key)] = value.detach().float().to(p.device).clone()


def adapter_state_dict(transformer: nn.Module, name: str = "default") -> dict[str, Tensor]:
    """peft state dict of one adapter (keys without the adapter name, as diffusers stores them)."""
    from peft.utils import get_peft_model_state_dict

    _require(transformer, name)
    with gathered(adapter_parameters(transformer, name).values()):
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(transformer, adapter_name=name).items()}


def load_adapter_state_dict(transformer: nn.Module, state: dict[str, Tensor], name: str = "default") -> None:
    """Inverse of :func:`adapter_state_dict`; every key must land (a partial load is an error)."""
    expected = adapter_state_dict(transformer, name)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"LoRA state for adapter '{name}' does not fit the transformer: "
                         f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"LoRA tensor '{key}' has shape {tuple(value.shape)}, the transformer's adapter "
                             f"'{name}' expects {tuple(expected[key].shape)} (different rank?)")
    from peft.utils import set_peft_model_state_dict

    with gathered(adapter_parameters(transformer, name).values(), modify=True):
        set_peft_model_state_dict(transformer, state, adapter_name=name)


def export_diffusers(transformer: nn.Module, out_dir: str | Path, name: str = "default",
                     state: dict[str, Tensor] | None = None) -> Path:
    """Write adapter ``name`` as ``out_dir/pytorch_lora_weights.safetensors`` in diffusers' format, so
    ``StableDiffusion3Pipeline.from_pretrained(base).load_lora_weights(out_dir)`` reproduces the policy.

    ``state``: the adapter's :func:`adapter_state_dict` when the caller already holds it (multi-process runs take
    it on every process — a collective under ZeRO-3 — and write it from one).

    The adapter's peft config (rank, alpha, targets) travels as safetensors metadata so the loader
    rebuilds the same scaling alpha / r. Written to a temporary directory and renamed into place: a kill
    mid-export never leaves a half-written adapter.
    """
    from diffusers import StableDiffusion3Pipeline

    out_dir = Path(out_dir)
    state = adapter_state_dict(transformer, name) if state is None else state
    metadata = transformer.peft_config[name].to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])  # JSON-serialisable (peft keeps a set)
    from rl.checkpoint import write_dir_atomically  # the one directory swap of the project (crash-recoverable)

    write_dir_atomically(out_dir, lambda tmp: StableDiffusion3Pipeline.save_lora_weights(
        tmp, transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata))
    return out_dir
