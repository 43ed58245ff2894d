"""FlowPolicy: an SD3-family rectified-flow text-to-image policy.

It owns the diffusers ``SD3Transformer2DModel`` (with its peft LoRA adapters), the ``AutoencoderKL`` and a text
encoder, and gives trainers and critics the few operations they need: encode prompts, predict the velocity
(with classifier-free guidance), move between images and latents, and the sigma schedule. The sampling loop is
the caller's (``policies.samplers.sample``), as in diffusers where the user owns the denoising loop.

Latents here are always the *normalised* latents the transformer sees,
z = (vae_latent - shift_factor) * scaling_factor, exactly as ``StableDiffusion3Pipeline``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from policies import graphs, samplers
from policies.text_encoders import TextEncoder

NUM_TRAIN_TIMESTEPS = 1000  # SD3 conditions on timestep = sigma * 1000


@dataclass
class PromptEmbeds:
    """Text conditioning for a batch: ``embeds`` (B, L, D_joint), ``pooled`` (B, D_pool)."""

    embeds: Tensor
    pooled: Tensor

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def repeat(self, n: int) -> "PromptEmbeds":
        """Each prompt n times in a row (a group of n samples per prompt)."""
        return PromptEmbeds(self.embeds.repeat_interleave(n, 0), self.pooled.repeat_interleave(n, 0))

    def expand(self, batch: int) -> "PromptEmbeds":
        """A single prompt broadcast to ``batch`` rows."""
        if len(self) != 1:
            raise ValueError(f"expand() needs one prompt, got {len(self)}")
        return PromptEmbeds(self.embeds.expand(batch, -1, -1), self.pooled.expand(batch, -1))

    def to(self, *args, **kwargs) -> "PromptEmbeds":
        return PromptEmbeds(self.embeds.to(*args, **kwargs), self.pooled.to(*args, **kwargs))


class FlowPolicy(nn.Module):
    """SD3 transformer + VAE + text encoder, with the rectified-flow schedule.

    Args:
        transformer: a diffusers ``SD3Transformer2DModel`` of any size.
        vae: a diffusers ``AutoencoderKL``; ``scaling_factor`` and ``shift_factor`` must be set (SD3: 1.5305, 0.0609).
        text_encoder: a :class:`~policies.text_encoders.TextEncoder` whose output sizes match the transformer.
        shift: SD3's timestep shift (3.0 for SD3/SD3.5 at 1024^2), applied as in FlowMatchEulerDiscreteScheduler.
    """

    def __init__(self, transformer: nn.Module, vae: nn.Module, text_encoder: TextEncoder, shift: float = 3.0,
                 resolution: int | None = None):
        super().__init__()
        if vae.config.shift_factor is None or vae.config.scaling_factor is None:
            raise ValueError("the VAE config must set scaling_factor and shift_factor (SD3's are 1.5305 and 0.0609)")
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        tcfg = transformer.config
        if vae.config.latent_channels != tcfg.in_channels:
            raise ValueError(f"VAE latent_channels={vae.config.latent_channels} but the transformer expects "
                             f"in_channels={tcfg.in_channels}: pair a VAE and transformer of the same latent space")
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.shift = float(shift)
        self._latent_size = tcfg.sample_size if resolution is None else self._check_resolution(resolution)
        # RL trains LoRA adapters on the transformer; the VAE and text encoder stay frozen.
        self.vae.requires_grad_(False)
        if isinstance(text_encoder, nn.Module):
            text_encoder.requires_grad_(False)
        self._null: PromptEmbeds | None = None
        # Distributed wrappers (DDP / DeepSpeed engines) have no .config or adapter methods, so the policy keeps
        # the bare transformer and routes forward passes through the wrapper when one is set. Stored outside the
        # module tree so parameters are not listed twice.
        object.__setattr__(self, "_forward_module", None)
        object.__setattr__(self, "_graphs", None)  # enable_cuda_graphs
        object.__setattr__(self, "_tuner_for", (None, None))  # _graph_state's cache: (parameter storage, LoRA layer)

    def set_forward_module(self, module: nn.Module | None) -> None:
        """Route transformer forward passes through ``module`` (e.g. what ``accelerator.prepare`` returned)."""
        object.__setattr__(self, "_forward_module", module)

    def enable_cuda_graphs(self, enabled: bool = True, capacity: int = 8) -> None:
        """Replay the transformer's forwards without autograd on CUDA as CUDA graphs (``run.cuda_graphs``).

        What a trainer's rollouts, evaluation and KL reference run. A small model at a small batch is bound by
        kernel launches, not arithmetic: DRaFT's 64-sample rollouts of the Shapes MMDiT ran ~2.6x faster replayed
        on an H100 (1.33x the epochs in the same minutes); at 1024 samples a call (GRPO, DDPO) the GPU is busy already
        and nothing changes (docs/bench/trainers_session12.md). One capture per input shape and model state
        (policies.graphs.StateGraphs keyed by :meth:`_graph_state`), so switching adapters, disabling them, or
        replacing a parameter selects another capture instead of replaying stale weights. Forwards with autograd
        (the policy gradient's re-scoring), on other devices, or inside another capture stay eager. Without
        gradients the bare transformer runs (a DDP / ZeRO-2 wrapper adds nothing then); a ZeRO-3-partitioned one,
        whose parameters hooks gather at every forward, cannot be replayed: rl/train.py refuses that pairing."""
        object.__setattr__(self, "_graphs", graphs.StateGraphs(self._bare_forward, capacity) if enabled else None)

    @property
    def cuda_graphs(self) -> bool:
        return self._graphs is not None

    # ----------------------------------------------------------------------------------------------- sizes
    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    @property
    def latent_size(self) -> int:
        """Side of the latents the policy samples: ``resolution`` / the VAE's factor, else the transformer's
        ``sample_size`` (SD3.5-Medium: 128, i.e. 1024^2 images; its 512^2 setups pass resolution=512)."""
        return self._latent_size

    def _check_resolution(self, resolution: int) -> int:
        tcfg, factor = self.transformer.config, self.vae_scale_factor
        unit = factor * tcfg.patch_size
        if resolution <= 0 or resolution % unit:
            raise ValueError(f"resolution {resolution} must be a positive multiple of {unit} (the VAE's factor "
                             f"{factor} x the transformer's patch size {tcfg.patch_size})")
        max_patches = getattr(tcfg, "pos_embed_max_size", None)
        if max_patches is not None and resolution // unit > max_patches:
            raise ValueError(f"resolution {resolution} needs {resolution // unit} patches a side; the transformer's "
                             f"position embedding covers {max_patches} ({max_patches * unit} pixels)")
        return resolution // factor

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        return self.latent_size * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def check_latents(self, z: Tensor, name: str = "latent") -> None:
        """Raise a ValueError that says what to fix when z is not (B, C, h, w) of this latent space."""
        patch = self.transformer.config.patch_size
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"{name} must be (B, {self.latent_channels}, h, w) for this policy, got {tuple(z.shape)}")
        if z.shape[2] % patch or z.shape[3] % patch:
            raise ValueError(f"{name} height/width {tuple(z.shape[2:])} must be multiples of the patch size {patch}")
        max_tokens = self.transformer.config.pos_embed_max_size
        if max_tokens is not None and max(z.shape[2], z.shape[3]) // patch > max_tokens:
            raise ValueError(f"{name} size {tuple(z.shape[2:])} exceeds the transformer's position-embedding range "
                             f"({max_tokens * patch} latent pixels)")

    # ----------------------------------------------------------------------------------------------- text
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        if isinstance(prompts, str):
            raise TypeError(f"prompts must be a list of strings, got a single str: {prompts!r:.80}")
        embeds, pooled = self.text_encoder.encode(list(prompts))
        return PromptEmbeds(embeds.to(self.dtype), pooled.to(self.dtype))

    def null_embeds(self) -> PromptEmbeds:
        """Embedding of the empty prompt "" (CFG's unconditional branch, StitchVM's null-text head), cached."""
        if self._null is None or self._null.embeds.device != self.device:
            with torch.no_grad():
                self._null = self.encode_prompts([""])
        return self._null

    # ----------------------------------------------------------------------------------------------- velocity
    def velocity(self, z: Tensor, sigma: Tensor | float, cond: PromptEmbeds, guidance_scale: float = 1.0,
                 uncond: PromptEmbeds | None = None) -> Tensor:
        """v_theta(z_sigma, sigma | prompt), with classifier-free guidance when guidance_scale != 1.

        Args:
            z: (B, C, h, w) normalised latents.
            sigma: float or (B,) noise levels in [0, 1].
            cond: the prompts' embeddings, B rows.
            guidance_scale: CFG weight w; v = v_u + w (v_c - v_u), as StableDiffusion3Pipeline.
            uncond: negative-prompt embeddings (default: the empty prompt).
        Returns:
            (B, C, h, w) velocity in the transformer's dtype.
        """
        self.check_latents(z)
        batch = z.shape[0]
        if len(cond) != batch:
            raise ValueError(f"{len(cond)} prompt embeddings for a batch of {batch} latents")
        sigma = torch.as_tensor(sigma, device=z.device, dtype=torch.float32)
        sigma = sigma.expand(batch) if sigma.ndim == 0 else sigma
        z_in = z.to(self.dtype)
        if guidance_scale == 1.0:
            return self._transformer(z_in, sigma, cond)
        uncond = self.null_embeds().expand(batch) if uncond is None else uncond
        # One batched call for both branches, unconditional first, as the diffusers pipeline does.
        both = PromptEmbeds(torch.cat([uncond.embeds, cond.embeds]), torch.cat([uncond.pooled, cond.pooled]))
        v_u, v_c = self._transformer(torch.cat([z_in, z_in]), torch.cat([sigma, sigma]), both).chunk(2)
        return v_u + guidance_scale * (v_c - v_u)

    def _transformer(self, z: Tensor, sigma: Tensor, cond: PromptEmbeds) -> Tensor:
        timestep = sigma * NUM_TRAIN_TIMESTEPS
        if (self._graphs is not None and z.is_cuda and not torch.is_grad_enabled()
                and not torch.cuda.is_current_stream_capturing()):
            return self._graphs(self._graph_state(), z, timestep, cond.embeds, cond.pooled)
        module = self._forward_module if self._forward_module is not None else self.transformer
        return module(hidden_states=z, timestep=timestep, encoder_hidden_states=cond.embeds,
                      pooled_projections=cond.pooled, return_dict=False)[0]

    def _bare_forward(self, z: Tensor, timestep: Tensor, embeds: Tensor, pooled: Tensor) -> Tensor:
        return self.transformer(hidden_states=z, timestep=timestep, encoder_hidden_states=embeds,
                                pooled_projections=pooled, return_dict=False)[0]

    def _graph_state(self) -> tuple:
        """Everything a captured forward freezes besides its inputs: the LoRA layers' Python flags (active
        adapters, disabled, merged; peft keeps them equal on every layer), train/eval mode, autocast, and the
        storage address of every parameter (in-place updates keep it; a replaced tensor changes it)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        t = self.transformer
        storage = tuple(p.data_ptr() for p in t.parameters())
        if self._tuner_for[0] != storage:  # the module walk only when the parameters changed
            tuner = next((m for m in t.modules() if isinstance(m, BaseTunerLayer)), None)
            object.__setattr__(self, "_tuner_for", (storage, tuner))
        tuner = self._tuner_for[1]
        lora_flags = None if tuner is None else (tuple(tuner.active_adapters), tuner.disable_adapters, tuner.merged)
        return (lora_flags, t.training, torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"), storage)

    def velocity_fn(self, cond: PromptEmbeds, guidance_scale: float = 1.0, uncond: PromptEmbeds | None = None):
        """v(z, sigma) for :func:`policies.samplers.sample`, with the prompts and guidance bound."""
        return functools.partial(self.velocity, cond=cond, guidance_scale=guidance_scale, uncond=uncond)

    # ----------------------------------------------------------------------------------------------- schedule
    def sigmas(self, num_steps: int, device: torch.device | str | None = None) -> Tensor:
        """The (num_steps + 1,) sigma schedule of diffusers' FlowMatchEulerDiscreteScheduler with ``shift``,
        ending at 0. Computed by the scheduler itself so our trajectories are the pipeline's."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=self.shift)
        scheduler.set_timesteps(num_steps, device=device or self.device)
        return scheduler.sigmas.float()

    def noise(self, batch: int, generator: torch.Generator | None = None, size: int | None = None) -> Tensor:
        """z_T ~ N(0, I) of shape (batch, C, size, size) (default: the transformer's sample size)."""
        size = size or self.latent_size
        return torch.randn((batch, self.latent_channels, size, size), generator=generator, device=self.device,
                           dtype=torch.float32).to(self.dtype)

    @torch.no_grad()
    def sample(self, prompts: list[str], num_steps: int = 20, guidance_scale: float = 1.0, eta: float = 0.0,
               stop_at: int | None = None, generator: torch.Generator | None = None, z_T: Tensor | None = None,
               **kwargs) -> samplers.Trajectory:
        """Convenience: encode prompts, draw z_T and run :func:`policies.samplers.sample` without gradients."""
        cond = self.encode_prompts(prompts)
        z_T = self.noise(len(prompts), generator) if z_T is None else z_T
        return samplers.sample(self.velocity_fn(cond, guidance_scale), z_T, self.sigmas(num_steps, z_T.device),
                               eta=eta, stop_at=stop_at, generator=generator, **kwargs)

    # ----------------------------------------------------------------------------------------------- VAE
    def encode(self, images: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> normalised latents (B, C, H/f, W/f) (posterior mode unless sample)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        dist = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist
        latent = dist.sample(generator) if sample else dist.mode()
        return (latent - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    def decode(self, z: Tensor) -> Tensor:
        """Normalised latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1], float32 (differentiable)."""
        self.check_latents(z)
        latent = z.to(self.vae.dtype) / self.vae.config.scaling_factor + self.vae.config.shift_factor
        return (self.vae.decode(latent, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)

    @staticmethod
    def to_pil(images: Tensor) -> list[Image.Image]:
        """(B, 3, H, W) in [0, 1] -> PIL images (rounded as diffusers' image processor does)."""
        arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        return [Image.fromarray(a) for a in arr]

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | Path, torch_dtype: torch.dtype = torch.float32, shift: float | None = None,
                        load_t5: bool = True, local_files_only: bool = True,
                        resolution: int | None = None) -> "FlowPolicy":
        """Load SD3 / SD3.5 (diffusers layout) from a local directory, or from the Hub with
        ``local_files_only=False``. A missing path is an error that says what to provide. ``resolution``: the
        image side to sample at (default: the transformer's sample_size x the VAE's factor, 1024 for SD3.5)."""
        from diffusers import AutoencoderKL, SD3Transformer2DModel

        from policies.text_encoders import SD3TextEncoders

        if local_files_only and not Path(path).is_dir():
            raise FileNotFoundError(
                f"no SD3 checkpoint directory at '{path}'. Point model.path at one, download one (e.g. "
                f"`huggingface-cli download stabilityai/stable-diffusion-3.5-medium --local-dir {path}`), or pass a "
                f"Hub id with model.local_files_only=false to let diffusers fetch it.")
        kw = dict(torch_dtype=torch_dtype, local_files_only=local_files_only)
        transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
        text = SD3TextEncoders.from_pretrained(path, torch_dtype=torch_dtype, load_t5=load_t5,
                                               local_files_only=local_files_only,
                                               joint_attention_dim=transformer.config.joint_attention_dim)
        if shift is None:
            from diffusers import FlowMatchEulerDiscreteScheduler

            shift = FlowMatchEulerDiscreteScheduler.from_pretrained(
                path, subfolder="scheduler", local_files_only=local_files_only).config.shift
        return cls(transformer, vae, text, shift=shift, resolution=resolution)
