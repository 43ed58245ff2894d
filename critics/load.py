"""YAML-facing loaders of the stitched critics: pair a saved critic with the run's policy and reward.

    critic:                                       # configs/critic/stitchvm.yaml
      _component_: critics.load.stitchvm
      path: shapes/weights/stitchvm

rl/train.py calls ``instantiate(cfg["critic"], policy=policy, reward=reward)``, so each loader takes the policy
(FlowPolicy) and the reward (a CLIP-family reward with ``vision`` and ``preprocess_cfg``) as keyword arguments.

Paths: an absolute path is used as is; a relative path is read from the current directory if it exists there,
else from the repository root (so the shipped configs work from any directory). A path that exists in neither
is a FileNotFoundError naming both places.

Pairing: the loaders refuse a critic built for another policy or reward (critics.stitchvm.load_stitchvm checks
the backbone config, the head blocks' fingerprint and the null-text conditioning; critics.vae_stitch checks the
VAE), with a message that says which is which.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Callable

from torch import Tensor, nn

from critics.rewards.base import preprocess as reward_preprocess_fn
from critics.stitchvm import HeadText, StitchVM, load_stitchvm
from critics.vae_stitch import load_vae_stitch
from rl.checkpoint import interrupted_swap

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_HINT = "build one with `python -m critics.build --config configs/critic/build_shapes.yaml` (docs/critic.md)"


def resolve_path(path: str | os.PathLike) -> Path:
    """The critic directory `path` names (see the module docstring for relative paths)."""
    path = Path(path)
    # a complete copy in the current directory wins, as the module docstring says; only then is a missing copy
    # (here or under the repository root) stood in for by the backup an interrupted save left beside it
    candidates = (path,) if path.exists() or path.is_absolute() else (path, REPO_ROOT / path)
    for candidate in candidates:
        previous = interrupted_swap(candidate)  # a build killed between the two renames of its last save
        if previous is not None:
            print(f"warning: {candidate} is missing: its build was interrupted while saving; loading the last "
                  f"complete version from {previous} (the next build into {candidate} puts it back)",
                  file=sys.stderr)
            return Path(previous)
    if path.is_absolute() or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"no critic at {path}; {BUILD_HINT}")
        return path
    rooted = REPO_ROOT / path
    if not rooted.exists():
        raise FileNotFoundError(f"no critic at {path} (looked in {Path.cwd()} and {REPO_ROOT}); {BUILD_HINT}")
    return rooted


def warn_if_unfinished(path: Path) -> None:
    """A build saves complete, loadable checkpoints as it trains; only its last save records the total time. Say so
    when a critic is one of the earlier ones (a build stopped or killed before the end), which loads as any other."""
    build_json = path / "build.json"
    if not build_json.is_file():
        return
    record = json.loads(build_json.read_text())
    if "total_s" not in record.get("times", {}):
        steps = {k: record[k] for k in ("last_step", "last_onpolicy_step") if k in record}
        print(f"warning: critic at {path} is a checkpoint of a build that did not finish ({steps or 'no step'}); it "
              f"loads, but it is not the build's result", file=sys.stderr)


def reward_preprocess(reward: nn.Module) -> Callable[[Tensor], Tensor]:
    """The reward's own differentiable preprocessing (resize + normalise to its tower), for the critic's tail.

    The tail must see pixels exactly as the reward does, or distillation targets and the teacher differ.
    """
    return functools.partial(reward_preprocess_fn, cfg=reward.preprocess_cfg)


def stitchvm(policy: nn.Module, reward: nn.Module, path: str | os.PathLike, tower: nn.Module | None = None,
             check_target: bool = True, head_text: HeadText | None = None) -> StitchVM:
    """Load the StitchVM at `path` around `policy.transformer` (its first i blocks, shared) and `reward`.

    The head is conditioned on the policy's own null-text embedding (``policy.null_embeds()``) or, for a critic
    built with ``head_conditioning: prompt``, on the prompt being valued through the policy's text encoder.
    ``tower``: the reward model the critic was stitched onto, when the run optimises another reward that the
    critic was regressed onto (a checker without a network; ``onpolicy.target`` in the build, docs/critic.md);
    it supplies the tail's preprocessing and the prompt embeddings. None: the run's ``reward``.
    ``check_target``: refuse a run whose reward is not the one the critic predicts (``check_value_target``); the
    build turns it off to continue training a critic from ``init_from`` onto any target.
    ``head_text``: the text cache a prompt-conditioned head uses (default: its own over ``policy.encode_prompts``);
    critics of one policy may share one.
    """
    path, run_reward = resolve_path(path), reward
    reward = tower if tower is not None else reward
    if not hasattr(reward, "vision"):
        raise ValueError(f"a StitchVM needs the reward model it was stitched onto (an image tower `.vision`); the run's "
                         f"reward is a {type(reward).__name__}: name the tower in the critic config, e.g. "
                         f"`critic.tower: {{_component_: shapes.models.load_shapes_reward}}`")
    null = policy.null_embeds()
    model = load_stitchvm(path, policy.transformer, reward, null.embeds, null.pooled,
                          preprocess=reward_preprocess(reward),  # verifies the manifest, stitchvm.json included
                          encode_prompts=head_text if head_text is not None else policy.encode_prompts)
    if check_target:
        check_value_target(path, run_reward, tower)
    warn_if_unfinished(path)
    return model


def stitchvm_experts(policy: nn.Module, reward: nn.Module, paths: list[str], upper: list[float],
                     tower: nn.Module | None = None) -> nn.Module:
    """Noise-level experts (critics/routed.py): the StitchVM at ``paths[k]`` values latents with sigma in
    (upper[k-1], upper[k]]. Each loads as :func:`stitchvm` does; they share the policy's transformer blocks."""
    from critics.routed import SigmaRoutedCritic

    return SigmaRoutedCritic(_expert_stitchvms(policy, reward, paths, tower), upper)


def _expert_stitchvms(policy: nn.Module, reward: nn.Module, paths: list[str], tower: nn.Module | None) -> list:
    text = HeadText(policy.encode_prompts)  # one text cache for the experts: a prompt is encoded once, not per band
    return [stitchvm(policy, reward, p, tower, head_text=text) for p in paths]


def stitchvm_experts_denoised(policy: nn.Module, reward: nn.Module, paths: list[str], upper: list[float],
                              denoised: list[bool], sigma_in: float | list[list[float]] = 0.15,
                              guidance_scale: float = 1.0, tower: nn.Module | None = None,
                              noise_draws: int = 1) -> nn.Module:
    """:func:`stitchvm_experts` where the experts flagged in ``denoised`` value the policy's denoised estimate x̂0
    re-noised to ``sigma_in`` instead of z_t, the mean of ``noise_draws`` re-noisings (critics/denoised.py;
    docs/critic.md, sessions 19 and 22)."""
    from critics.denoised import DenoisedCritic
    from critics.routed import SigmaRoutedCritic

    if len(denoised) != len(paths):
        raise ValueError(f"denoised needs one flag per expert path: got {len(denoised)} flags for {len(paths)} paths")
    experts = _expert_stitchvms(policy, reward, paths, tower)
    return SigmaRoutedCritic([DenoisedCritic(policy, e, sigma_in, guidance_scale, noise_draws=noise_draws) if d
                              else e for e, d in zip(experts, denoised)], upper)


def check_value_target(path: Path, reward: nn.Module, tower: nn.Module | None) -> None:
    """A critic predicts one reward: its tower's (stages 2-3), or the ``value_target`` stage 3 regressed it onto.
    Refuse a run whose reward is another one — a critic of the CLIP score silently steering a run that optimises a
    checker, or the reverse — with what to change."""
    target = json.loads((path / "stitchvm.json").read_text()).get("value_target")  # verified by load_stitchvm
    run_reward = f"{type(reward).__module__}.{type(reward).__qualname__}"
    if target is None:
        if tower is not None:
            raise ValueError(f"critic at {path} predicts the reward of its tower, but critic.tower is set and the run "
                             f"optimises {run_reward}: drop critic.tower (the run's reward is then the tower), or build "
                             f"a critic of this reward with onpolicy.target (docs/critic.md)")
        return
    component, kwargs = target.get("_component_", "?"), {k: v for k, v in target.items() if k != "_component_"}
    hint = (f"critic at {path} predicts {component}{kwargs or ''} (its value_target); the run's reward must be that "
            f"reward and critic.tower the model it was stitched onto (e.g. --config "
            f"configs/experiments/shapes_checker.yaml --critic stitchvm_checker)")
    if tower is None or run_reward != component:
        raise ValueError(f"{hint}; got reward {run_reward}" + ("" if tower is not None else " and no critic.tower"))
    for key, want in kwargs.items():
        if hasattr(reward, key) and getattr(reward, key) != want:
            raise ValueError(f"{hint}; got {key}={getattr(reward, key)!r}")


def vae_stitch(policy: nn.Module, reward: nn.Module, path: str | os.PathLike) -> StitchVM:
    """Load the vae_stitch baseline at `path` for `policy`'s latent space (its VAE) and `reward`."""
    path = resolve_path(path)
    critic = load_vae_stitch(path, policy, reward, preprocess=reward_preprocess(reward))
    warn_if_unfinished(path)
    return critic
