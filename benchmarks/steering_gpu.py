"""GPU cost of value-guided sampling at SD3.5-Medium scale: plain CFG vs Tweedie-DPS vs StitchVM-DPS, V(z) vs
decode-and-score, FK steering per sample. Random-initialised models of the real shapes (timing and memory only).

    python benchmarks/steering_gpu.py                 # one H100/H200: 512^2 and 1024^2, batch 1 and 4, bf16
    python benchmarks/steering_gpu.py --tiny          # CPU check of every code path with tiny models (~1 min)

Models: ``SD3Transformer2DModel`` with SD3.5-Medium's config (24 MMDiT blocks, width 1536, 13 dual-attention
blocks, RMS qk-norm), the SD3 VAE (16 latent channels), random text embeddings of SD3's shapes (77 + 256 tokens,
CLIP/T5 encoders are paid once per prompt by every method alike), open_clip ViT-L/14 as the CLIP-score reward, and
a StitchVM with (i, j) = (4, 1) (random stitch W: the cost does not depend on its values). bf16 weights, CFG 4.5.

What is timed (CUDA events, ``--warmup`` untimed calls, median of ``--repeats``), per (resolution, batch):
    cfg               one plain sampling step: CFG velocity (one batched [uncond, cond] forward) + SDE step
    tweedie_dps       guided step, CriticGuide + TweedieCritic: CFG forward, then a conditional DiT forward + VAE
                      decode + CLIP with autograd, backward to z
    tweedie_dps_fused guided step, TweedieGuide: the CFG's conditional half is the denoiser (one DiT pass less)
    tweedie_dps_fused_graphed  the same as CUDA graphs (GraphedTweedieGuide below): conditional DiT + decode + image
                      tower with their backward to z as one graph, the unconditional DiT forward as another
    stitchvm_dps      guided step, CriticGuide + StitchVM: CFG forward + head (4 blocks) + stitch + tail, backward
    stitchvm_dps_shared  guided step, SharedHeadGuide: the CFG's unconditional blocks 1..4 are the head
    stitchvm_dps_shared_graphed  the same with the stitch + tail forward/backward replayed as CUDA graphs (GPU only)
    stitchvm_dps_shared_full_graph  the same with the whole step replayed as CUDA graphs (SharedHeadGuide
                      cuda_graph="full": head + stitch + tail with backward, then the rest of the CFG forward)
    cfg_graphed       the plain step with its CFG forward replayed as a CUDA graph: the baseline for "full"
    value_stitchvm    V(z) forward, no grad (head + stitch + tail); value_stitchvm_graphed: as one CUDA graph
    decode_score      r(D(z)) forward, no grad (the terminal critic); decode_score_graphed: decode + image tower
                      as one CUDA graph (the text side is cached for every method: cache_text_side)
    value_tweedie     r(D(z - sigma v_c(z))) forward, no grad (conditional DiT + decode + reward)
Every ratio compares the best variant of each side (eager or graphed): StitchVM gets no graph its baselines lack.
``--sdpa`` selects the attention kernels of every method alike (torch.nn.attention.sdpa_kernel priority);
``--profile`` prints the CUDA kernel time table of one plain CFG step and one best StitchVM step.
Memory: peak ``torch.cuda.max_memory_allocated`` during one call minus the allocated memory before it (weights
excluded: "working memory" of the step); the critics' own parameters are listed separately.
FK (batch = one prompt, N = 4 particles, M = 2 proposals on the first 40% of ``--fk-steps`` steps, difference
potentials): seconds per sample for a K-step run, with SharedHeadGuide (StitchVM) and TweedieGuide potentials, next
to plain CFG sampling of the same N particles; the per-step cost extrapolates linearly to 40 steps.

A failure (out of memory at 1024^2 batch 4 Tweedie-DPS, say) is reported in its cell and the run goes on; a time
budget (``--budget-s``) skips what is left rather than running past the caller's limit. Prints markdown tables and
writes JSON to ``$OUT/steering_gpu.json`` (or ``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import types
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

if importlib.util.find_spec("scipy") is None:
    # The GPU image has no scipy. critics.rewards' package init imports ShapesEval (shapes/eval.py), which imports
    # scipy.ndimage at module level but is never called here; stand in an empty module so the import succeeds.
    print("note: scipy is not installed; stubbing scipy.ndimage (ShapesEval is not used by this benchmark)",
          file=sys.stderr)
    _scipy = types.ModuleType("scipy")
    _scipy.ndimage = types.ModuleType("scipy.ndimage")
    sys.modules.update({"scipy": _scipy, "scipy.ndimage": _scipy.ndimage})

from critics.baselines import TweedieCritic  # noqa: E402
from policies import samplers  # noqa: E402
from rl.steering.dps import DPSConfig, dps_step  # noqa: E402
from rl.steering.fk import FKConfig, fk_sample  # noqa: E402
from policies.flow import PromptEmbeds  # noqa: E402
from rl.steering import mmdit  # noqa: E402
from policies.graphs import GraphedGrad, GraphedNoGrad  # noqa: E402
from rl.steering.guides import (CriticGuide, GuideOutput, SharedHeadGuide, TweedieGuide, cfg_combine,  # noqa: E402
                                grad_leaf, grad_of)
from rl.steering.testing import random_stitchvm  # noqa: E402

CFG_SCALE = 4.5
SIGMA, SIGMA_NEXT = 0.7, 0.68  # a mid-trajectory step (costs do not depend on sigma)
PROMPT = "a red circle to the left of two blue squares"  # also a Shapes caption, for the --tiny tokenizer
STEP_METHODS = ("cfg", "cfg_graphed", "tweedie_dps", "tweedie_dps_fused", "tweedie_dps_fused_graphed", "stitchvm_dps",
                "stitchvm_dps_shared", "stitchvm_dps_shared_graphed", "stitchvm_dps_shared_full_graph")
TWEEDIE_STEPS = ("tweedie_dps", "tweedie_dps_fused", "tweedie_dps_fused_graphed")
CFG_STEPS = ("cfg", "cfg_graphed")
STITCHVM_STEPS = ("stitchvm_dps_shared", "stitchvm_dps_shared_graphed", "stitchvm_dps_shared_full_graph")  # fused
VALUE_METHODS = ("value_stitchvm", "value_stitchvm_graphed", "decode_score", "decode_score_graphed", "value_tweedie")
FK_METHODS = ("fk_stitchvm_shared", "fk_tweedie_fused", "plain_n_particles")
FK_STEPS_REPORTED = 40  # the paper's FK schedule length
SDPA_PRIORITY = {"default": None,
                 "cudnn": ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),
                 "flash": ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),
                 "efficient": ("EFFICIENT_ATTENTION", "FLASH_ATTENTION", "MATH")}


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
def build_sd35_medium(device: torch.device, dtype: torch.dtype):
    """SD3.5-Medium-shaped policy + CLIP ViT-L/14 CLIPScore, random weights, initialised directly on the device."""
    import open_clip
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from critics.rewards import CLIPScore
    from policies.flow import FlowPolicy
    from policies.testing import SD3_VAE, SD35_MEDIUM, RandomTextEncoder

    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of a minute on the host CPU
        transformer = SD3Transformer2DModel(**SD35_MEDIUM)
        vae = AutoencoderKL(**SD3_VAE)
    policy = FlowPolicy(transformer.eval(), vae.eval(), RandomTextEncoder(seed=0), shift=3.0).to(device, dtype)
    policy.transformer.requires_grad_(False)  # inference: no weight-gradient bookkeeping in any graph
    clip = open_clip.create_model("ViT-L-14", pretrained=None, device=device).to(dtype).eval()
    reward = CLIPScore(clip, open_clip.get_tokenizer("ViT-L-14"))
    return policy, reward


def build_tiny(device: torch.device, dtype: torch.dtype):
    from rl.steering.testing import tiny_clip_reward
    from policies.testing import tiny_policy

    policy = tiny_policy().to(device=device, dtype=dtype)
    policy.transformer.requires_grad_(False)
    return policy, tiny_clip_reward().to(device=device, dtype=dtype)


def param_gb(*modules) -> float:
    seen, total = set(), 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total / 2**30


# ---------------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------------
class Bench:
    """Times zero-argument closures; records failures instead of raising; respects a wall-clock budget."""

    def __init__(self, device: torch.device, warmup: int, repeats: int, budget_s: float):
        self.device, self.warmup, self.repeats = device, warmup, repeats
        self.deadline = time.monotonic() + budget_s
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def run(self, name: str, fn, repeats: int | None = None) -> dict:
        """{"ms": median, "ms_all": [...], "work_gb": peak - before} or {"error": "..."}."""
        if time.monotonic() > self.deadline:
            return {"error": "skipped (time budget)"}
        repeats = repeats or self.repeats
        self.free()
        try:
            self.sync()
            before = torch.cuda.memory_allocated(self.device) if self.cuda else 0
            if self.cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            out = fn()  # first warm-up call also measures the peak working memory
            self.sync()
            work_gb = (torch.cuda.max_memory_allocated(self.device) - before) / 2**30 if self.cuda else None
            del out
            for _ in range(self.warmup - 1):
                fn()
            times = []
            for _ in range(repeats):
                if self.cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end))
                else:
                    t0 = time.perf_counter()
                    fn()
                    times.append((time.perf_counter() - t0) * 1e3)
            return {"ms": statistics.median(times), "ms_all": times, "work_gb": work_gb}
        except torch.cuda.OutOfMemoryError:
            return {"error": "OOM"}
        except Exception as e:  # noqa: BLE001 - one broken cell must not lose the whole table
            traceback.print_exc(file=sys.stderr)
            return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"}
        finally:
            self.free()


@torch.no_grad()
def cfg_step(policy, z, sigma, cond, dps_cfg, generator):
    """The plain sampling step: CFG velocity ([uncond, cond] in one batch) + SDE step."""
    v = policy.velocity(z, sigma, cond, CFG_SCALE)
    return samplers.sde_step(v, z, SIGMA, SIGMA_NEXT, dps_cfg.eta, generator=generator).prev_sample


def guided_step(guide, z, sigma, cond, prompts, dps_cfg, generator):
    """One DPS step: the guide's velocity, V and ∇V, then the guided SDE step."""
    out = guide(z, sigma, cond, prompts, need_value=True, need_grad=True)
    return dps_step(out.velocity, z, SIGMA, SIGMA_NEXT, out.grad, dps_cfg, generator).prev_sample


@torch.no_grad()
def critic_value(critic, z, sigma, prompts):
    return critic.value(z, sigma, prompts)


@torch.no_grad()
def decode_score(policy, reward, z, prompts):
    return reward(policy.decode(z), prompts)


class GraphedTweedieGuide:
    """TweedieGuide's arithmetic as CUDA graphs, so Tweedie-DPS gets the treatment StitchVM's "full" mode gets:
    V = r(D(z - sigma v_c(z))) with the conditional DiT forward, the VAE decode and the image tower (and their
    backward to z) replayed as one graph; the prompt scoring (text tower) eager, as in every method; the
    unconditional DiT forward as a second graph. Benchmark-only (not a library guide)."""

    def __init__(self, policy, reward, guidance_scale: float):
        self.policy, self.reward, self.guidance_scale = policy, reward, guidance_scale
        t = policy.transformer

        def embed_and_velocity(z, sigma, embeds, pooled):
            v_c = mmdit.forward(t, z, sigma, embeds, pooled)
            z_0 = z - sigma.view(-1, 1, 1, 1).to(v_c.dtype) * v_c
            return reward._image_embed(policy.decode(z_0)), v_c.detach()  # no range check: it syncs

        self.value_graph = GraphedGrad(embed_and_velocity)
        self.uncond_graph = GraphedNoGrad(lambda z, sigma, e, p: mmdit.forward(t, z, sigma, e, p))

    def __call__(self, z, sigma, cond, prompts, need_value: bool = True, need_grad: bool = True) -> GuideOutput:
        leaf = grad_leaf(z)
        with torch.enable_grad():
            embed, v_c = self.value_graph(leaf, sigma, cond.embeds, cond.pooled)
            value = self.reward.score_from_embeds(embed, self.reward.text_embed(list(prompts))).float()
            grad = grad_of(value, leaf).clone()
        null = self.policy.null_embeds().expand(z.shape[0])
        with torch.no_grad():
            v_u = self.uncond_graph(z, sigma, null.embeds, null.pooled)
            v = cfg_combine(v_u, v_c.detach(), self.guidance_scale)
        return GuideOutput(v, value.detach(), grad)


@torch.no_grad()
def cfg_step_graphed(graphed_velocity, z, sigma, cond, dps_cfg, generator):
    v = graphed_velocity(z, sigma, cond.embeds, cond.pooled)
    return samplers.sde_step(v, z, SIGMA, SIGMA_NEXT, dps_cfg.eta, generator=generator).prev_sample


@torch.no_grad()
def decode_score_graphed(graphed_embed, reward, z, prompts):
    return reward.score_from_embeds(graphed_embed(z), reward.text_embed(prompts))


def cache_text_side(reward) -> None:
    """The reward's text tower per prompt string, cached for every method alike: StitchVM's PromptScore caches it,
    so the decode-and-score and Tweedie baselines get the same cache instead of tokenising and running the text
    tower on every timed call (before session 13 they did, and the V(z) / DPS ratios were flattered by it)."""
    from critics.stitchvm import PromptRows

    rows = PromptRows(reward.text_embed)
    reward.text_embed = lambda prompts: torch.stack(rows(list(prompts)))


def step_closures(policy, reward, stitchvm, tweedie, z, cond, prompts, generator, dps_cfg) -> tuple[dict, dict]:
    """The zero-argument calls timed for one (resolution, batch), and the guides they use."""
    sigma = torch.full((z.shape[0],), SIGMA, device=z.device)
    guides = {"tweedie_dps": CriticGuide(policy, tweedie, CFG_SCALE),
              "tweedie_dps_fused": TweedieGuide(policy, tweedie, CFG_SCALE),
              "stitchvm_dps": CriticGuide(policy, stitchvm, CFG_SCALE),
              "stitchvm_dps_shared": SharedHeadGuide(policy, stitchvm, CFG_SCALE)}
    cuda = z.device.type == "cuda"
    if cuda:
        guides["stitchvm_dps_shared_graphed"] = SharedHeadGuide(policy, stitchvm, CFG_SCALE, cuda_graph="tail")
        guides["stitchvm_dps_shared_full_graph"] = SharedHeadGuide(policy, stitchvm, CFG_SCALE, cuda_graph="full")
        guides["tweedie_dps_fused_graphed"] = GraphedTweedieGuide(policy, reward, CFG_SCALE)
    calls = {"cfg": partial(cfg_step, policy, z, sigma, cond, dps_cfg, generator)}
    if cuda:
        velocity = GraphedNoGrad(lambda z_, s_, e_, p_: policy.velocity(z_, s_, PromptEmbeds(e_, p_), CFG_SCALE))
        calls["cfg_graphed"] = partial(cfg_step_graphed, velocity, z, sigma, cond, dps_cfg, generator)
    calls.update({k: partial(guided_step, g, z, sigma, cond, prompts, dps_cfg, generator) for k, g in guides.items()})
    calls["value_stitchvm"] = partial(critic_value, stitchvm, z, sigma, prompts)
    if cuda:
        calls["value_stitchvm_graphed"] = partial(guides["stitchvm_dps_shared_full_graph"].values, z, sigma, cond,
                                                  prompts)
    calls["decode_score"] = partial(decode_score, policy, reward, z, prompts)
    if cuda:
        embed = GraphedNoGrad(lambda z_: reward._image_embed(policy.decode(z_)))  # no range check: it syncs
        calls["decode_score_graphed"] = partial(decode_score_graphed, embed, reward, z, prompts)
    calls["value_tweedie"] = partial(critic_value, tweedie, z, sigma, prompts)
    return calls, guides


def consistency(guides: dict, z, cond, prompts) -> dict:
    """bf16 check that the shared head computes the separate head's value and gradient."""
    sigma = torch.full((z.shape[0],), SIGMA, device=z.device)
    a = guides["stitchvm_dps_shared"](z, sigma, cond, prompts)
    b = guides["stitchvm_dps"](z, sigma, cond, prompts)
    out = {"grad_cosine_min": grad_cosine(a.grad, b.grad), "value_abs_diff_max": (a.value - b.value).abs().max().item(),
           "velocity_rel_diff": ((a.velocity - b.velocity).float().norm() / b.velocity.float().norm()).item()}
    for name, tag in (("stitchvm_dps_shared_graphed", "graphed"), ("stitchvm_dps_shared_full_graph", "full_graph")):
        if name in guides:
            c = guides[name](z, sigma, cond, prompts)
            out[f"{tag}_grad_cosine_min"] = grad_cosine(c.grad, a.grad)
            out[f"{tag}_value_abs_diff_max"] = (c.value - a.value).abs().max().item()
            out[f"{tag}_velocity_rel_diff"] = ((c.velocity - a.velocity).float().norm()
                                               / a.velocity.float().norm()).item()
    if "tweedie_dps_fused_graphed" in guides:  # the graphed Tweedie baseline computes TweedieGuide's numbers
        t, g = guides["tweedie_dps_fused"](z, sigma, cond, prompts), guides["tweedie_dps_fused_graphed"](z, sigma, cond,
                                                                                                         prompts)
        out["tweedie_graphed_grad_cosine_min"] = grad_cosine(g.grad, t.grad)
        out["tweedie_graphed_value_abs_diff_max"] = (g.value - t.value).abs().max().item()
    return out


def grad_cosine(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1).min().item()


@torch.no_grad()
def plain_particles(policy, cond, z_T, sigmas, eta, generator):
    """Unsteered CFG sampling of the same particles: what FK costs without potentials or proposals."""
    return samplers.sample(policy.velocity_fn(cond, CFG_SCALE), z_T, sigmas, eta=eta, generator=generator,
                           keep_latents=False).z_tau


def fk_run(guide, z_T, sigmas, cond, prompts, cfg, generator):
    return fk_sample(guide, z_T, sigmas, cond, prompts, cfg, generator).z_0


def fk_closures(policy, stitchvm, tweedie, latent: int, steps: int, generator) -> dict:
    cfg = FKConfig(num_particles=4, num_proposals=2, proposal_fraction=0.4, potential="difference", lam=10.0,
                   eta=0.7)
    prompts = [PROMPT]
    cond = policy.encode_prompts(prompts)
    sigmas = policy.sigmas(steps)
    z_T = policy.noise(cfg.num_particles, generator, size=latent)
    shared, fused = SharedHeadGuide(policy, stitchvm, CFG_SCALE), TweedieGuide(policy, tweedie, CFG_SCALE)
    return {"fk_stitchvm_shared": partial(fk_run, shared, z_T, sigmas, cond, prompts, cfg, generator),
            "fk_tweedie_fused": partial(fk_run, fused, z_T, sigmas, cond, prompts, cfg, generator),
            "plain_n_particles": partial(plain_particles, policy, cond.repeat(cfg.num_particles), z_T, sigmas,
                                         cfg.eta, generator)}


def sdpa_context(name: str):
    """torch.nn.attention.sdpa_kernel with a backend priority list (unsupported shapes fall to the next one: the
    VAE's single 512-wide attention head is not a cuDNN/flash shape and runs memory-efficient attention)."""
    if SDPA_PRIORITY[name] is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, b) for b in SDPA_PRIORITY[name]], set_priority=True)


def profile(name: str, fn, rows: int = 18) -> str:
    """The CUDA kernel table of one call (after the timing runs warmed it up)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)
    return f"\n#### profile: {name}\n{table}"


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
def cell(r: dict | None, key: str = "ms", digits: int = 1) -> str:
    if r is None:
        return "-"
    if "error" in r:
        return r["error"]
    value = r.get(key)
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(a: dict | None, b: dict | None) -> float | None:
    """a / b of median times, None when either failed."""
    if not a or not b or "ms" not in a or "ms" not in b:
        return None
    return a["ms"] / b["ms"]


def fmt(x: float | None, suffix: str = "x") -> str:
    return "-" if x is None else f"{x:.2f}{suffix}"


def best_of(r: dict, methods) -> dict | None:
    """The fastest successful cell among ``methods``."""
    ok = [r[k] for k in methods if "ms" in r.get(k, {})]
    return min(ok, key=lambda x: x["ms"]) if ok else None


def extra_memory(shared: dict | None, cfg: dict | None, tweedie: dict | None) -> float | None:
    """(working GB of StitchVM-DPS - plain CFG) / (working GB of Tweedie-DPS - plain CFG)."""
    if not (shared and cfg and tweedie) or any(x.get("work_gb") is None for x in (shared, cfg, tweedie)):
        return None
    return (shared["work_gb"] - cfg["work_gb"]) / max(tweedie["work_gb"] - cfg["work_gb"], 1e-9)


def best_tweedie(r: dict) -> dict | None:
    return best_of(r, TWEEDIE_STEPS)


def best_value(r: dict) -> dict | None:
    return best_of(r, ("value_stitchvm", "value_stitchvm_graphed"))


def best_decode(r: dict) -> dict | None:
    return best_of(r, ("decode_score", "decode_score_graphed"))


def report(results: dict) -> str:
    lines = [f"Device: {results['device']} | torch {results['torch']} | dtype {results['dtype']} | CFG {CFG_SCALE} "
             f"| attention {results.get('sdpa', 'default')} "
             f"| StitchVM (i, j) = ({results['i']}, 1)", ""]
    lines += ["### Guided step: ms (working GB)", "",
              "| res | B | plain CFG | plain CFG graphed | Tweedie-DPS | Tweedie-DPS fused | Tweedie-DPS fused graphed | "
              "StitchVM-DPS | StitchVM-DPS shared | shared + CUDA-graph tail | shared, whole step graphed | "
              "best StitchVM vs best Tweedie | best StitchVM / best CFG | extra GB shared / Tweedie |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in results["configs"].items():
        res, B = key.split("x")
        cells = [f"{cell(r.get(m))} ({cell(r.get(m), 'work_gb', 2)})" for m in STEP_METHODS]
        shared, cfg, tw = best_of(r, STITCHVM_STEPS), best_of(r, CFG_STEPS), best_tweedie(r)
        extra = extra_memory(shared, cfg, tw)
        lines.append(f"| {res} | {B} | " + " | ".join(cells) + f" | {fmt(ratio(tw, shared))} | "
                     f"{fmt(ratio(shared, cfg))} | {fmt(extra, '')} |")
    lines += ["", "### Value: V(z) forward vs decode-and-score, ms", "",
              "| res | B | V(z) StitchVM | V(z) graphed | decode + score | decode + score graphed | "
              "Tweedie V (DiT + decode + score) | best decode+score / best V | Tweedie / best V |",
              "|---|---|---|---|---|---|---|---|---|"]
    for key, r in results["configs"].items():
        res, B = key.split("x")
        v, d = best_value(r), best_decode(r)
        lines.append(f"| {res} | {B} | {cell(r.get('value_stitchvm'))} | {cell(r.get('value_stitchvm_graphed'))} | "
                     f"{cell(r.get('decode_score'))} | {cell(r.get('decode_score_graphed'))} | "
                     f"{cell(r.get('value_tweedie'))} | {fmt(ratio(d, v))} | {fmt(ratio(r.get('value_tweedie'), v))} |")
    if results["fk"]:
        lines += ["", "### FK steering, one prompt, N = 4, M = 2 (first 40% of steps): time per sample",
                  "", f"| res | steps | StitchVM (shared head) | Tweedie (fused) | plain CFG, 4 particles | "
                      f"StitchVM / Tweedie | StitchVM / plain | StitchVM at {FK_STEPS_REPORTED} steps |",
                  "|---|---|---|---|---|---|---|---|"]
        for res, r in results["fk"].items():
            s, t, p = (r.get(m) for m in FK_METHODS)
            at40 = None if not s or "ms" not in s else s["ms"] / 1e3 * FK_STEPS_REPORTED / r["steps"]
            lines.append(f"| {res} | {r['steps']} | {cell(s, 'ms', 0)} ms | {cell(t, 'ms', 0)} ms | "
                         f"{cell(p, 'ms', 0)} ms | {fmt(ratio(s, t))} | {fmt(ratio(s, p))} | {fmt(at40, ' s')} |")
    lines += ["", "### Critic parameters (GB): " + ", ".join(f"{k} {v:.2f}" for k, v in results["params_gb"].items())]
    for key, c in results["consistency"].items():
        lines.append(f"shared vs separate head at {key}: " + ", ".join(f"{k} {v:.4g}" for k, v in c.items()))
    target = results["configs"].get(results["target_key"])
    if target:
        shared, cfg, tw = best_of(target, STITCHVM_STEPS), best_of(target, CFG_STEPS), best_tweedie(target)
        lines += ["", f"### Targets at {results['target_key']} (issue #7; best = fastest variant of each method)",
                  f"- StitchVM-DPS >= 4.0x faster than Tweedie-DPS: {fmt(ratio(tw, shared))}",
                  f"- StitchVM-DPS <= 1.2x the plain CFG step: {fmt(ratio(shared, cfg))}",
                  f"- extra working memory <= 10% of Tweedie-DPS's: {fmt(extra_memory(shared, cfg, tw), '')}",
                  "- V(z) >= 5x cheaper than decode-and-score: "
                  f"{fmt(ratio(best_decode(target), best_value(target)))}"]
        batch4 = results["configs"].get(results["target_key"].replace("x1", "x4"))
        if batch4:
            lines.append("- V(z) >= 10x cheaper than decode-and-score at batch 4: "
                         f"{fmt(ratio(best_decode(batch4), best_value(batch4)))}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU (float32): checks every code path")
    p.add_argument("--resolutions", type=int, nargs="+", default=None, help="image sides (default 512 1024; tiny 16)")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 1 4; tiny 1 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per cell (default 2; tiny 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per cell, median (default 5; tiny 2)")
    p.add_argument("--fk-steps", type=int, default=None, help="FK run length (default 10; tiny 4)")
    p.add_argument("--fk-repeats", type=int, default=2, help="timed FK runs per method")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip cells that would start after this many seconds")
    p.add_argument("--sdpa", default="default", choices=sorted(SDPA_PRIORITY),
                   help="attention kernel priority for every method (default: torch's own choice)")
    p.add_argument("--profile", action="store_true",
                   help="print the CUDA kernel table of one plain CFG and one best StitchVM step at the target cell")
    p.add_argument("--json", default=None, help="JSON output path (default $OUT/steering_gpu.json if $OUT is set)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    with sdpa_context(args.sdpa):
        return run(args)


def run(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    tiny = args.tiny
    if not tiny and not torch.cuda.is_available():
        print("error: no CUDA device; run with --tiny for the CPU check", file=sys.stderr)
        return 2
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    resolutions = args.resolutions or ([16] if tiny else [512, 1024])
    batches = args.batches or ([1, 2] if tiny else [1, 4])
    warmup, repeats = args.warmup or (1 if tiny else 2), args.repeats or (2 if tiny else 5)
    fk_steps = args.fk_steps or (4 if tiny else 10)
    head_depth = 1 if tiny else 4
    if tiny:
        torch.set_num_threads(1)  # tiny matmuls: thread hand-offs cost more than they save

    policy, reward = (build_tiny if tiny else build_sd35_medium)(device, dtype)
    cache_text_side(reward)
    print(f"built models in {time.monotonic() - t_start:.0f} s", file=sys.stderr)
    bench = Bench(device, warmup, repeats, args.budget_s - (time.monotonic() - t_start))
    tweedie = TweedieCritic(policy, reward, guidance_scale=1.0)
    dps_cfg = DPSConfig(eta=0.7, guidance_scale=1.0, grad_norm="score")
    generator = torch.Generator(device).manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    results = {"device": name, "sdpa": args.sdpa,
               "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "i": head_depth,
               "configs": {}, "fk": {}, "consistency": {}, "params_gb": {},
               "target_key": f"{max(resolutions)}x1", "settings": {**vars(args), "json": args.json and Path(args.json).name}}
    results["params_gb"]["policy transformer"] = param_gb(policy.transformer)
    results["params_gb"]["VAE"] = param_gb(policy.vae)
    results["params_gb"]["CLIP reward"] = param_gb(reward)
    for res in resolutions:
        latent = res // policy.vae_scale_factor
        stitchvm = random_stitchvm(policy, reward, i=head_depth, latent_size=latent).requires_grad_(False)
        results["params_gb"]["StitchVM stitch + tail"] = param_gb(stitchvm.stitch, stitchvm.tail)
        for B in batches:
            key = f"{res}x{B}"
            print(f"[{time.monotonic() - t_start:5.0f} s] {key}", file=sys.stderr)
            prompts = [PROMPT] * B
            cond = policy.encode_prompts(prompts)
            z = policy.noise(B, generator, size=latent)
            closures, guides = step_closures(policy, reward, stitchvm, tweedie, z, cond, prompts, generator, dps_cfg)
            results["configs"][key] = {name: bench.run(name, fn) for name, fn in closures.items()}
            if args.profile and key == results["target_key"] and not tiny:
                best = best_of(results["configs"][key], STITCHVM_STEPS)
                best_name = next((k for k in STITCHVM_STEPS if results["configs"][key].get(k) is best), None)
                for name in ("cfg", best_name):
                    if name:
                        print(profile(f"{name} at {key}", closures[name]))
            if B == 1 and time.monotonic() < bench.deadline:
                try:
                    results["consistency"][key] = consistency(guides, z, cond, prompts)
                except Exception as e:  # noqa: BLE001 - a diagnostic, never fatal
                    traceback.print_exc(file=sys.stderr)
                    results["consistency"][key] = {f"failed ({type(e).__name__})": math.nan}
            del closures, guides
            bench.free()
        fk = {"steps": fk_steps}
        for name, fn in fk_closures(policy, stitchvm, tweedie, latent, fk_steps, generator).items():
            print(f"[{time.monotonic() - t_start:5.0f} s] FK {res} {name}", file=sys.stderr)
            fk[name] = bench.run(name, fn, repeats=args.fk_repeats)
        results["fk"][str(res)] = fk
        del stitchvm
        bench.free()
    results["wall_s"] = time.monotonic() - t_start
    print(report(results))
    path = args.json or (os.path.join(os.environ["OUT"], "steering_gpu.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        from rl.checkpoint import atomic_write_bytes

        atomic_write_bytes(path, (json.dumps(results, indent=2) + "\n").encode())
        print(f"\nwrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
