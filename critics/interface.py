"""Stage 1 of StitchVM: closed-form interface search (paper §3, Eq. 7).

For every candidate interface (i, j) — DiT block i, reward block j — fit one linear map per spatial token

    W*, b* = argmin_{W, b} E ‖W u^{≤i}(z_t) + b − r^{≤j−1}(x0)‖²                                 (Eq. 7)

on a probe set: clean images x0, latents z0 = E(x0), z_t = (1−t) z0 + t ε with t ~ U[0, 1]. The DiT token grid is
resampled bilinearly to the reward patch grid (the same fixed Up the stitch uses), so one row of the regression
is one reward-grid token of one probe image. Features are cast to float64 and solved with torch.linalg.lstsq.
The interface with the lowest fit error is chosen (or an (i, j) pinned in the config).

Choices the paper leaves open (documented here):
- Intercept: fitted jointly (a ones column is appended), so b* is exact least squares, not a mean residual.
- Selection criterion: relative MSE = MSE / Var(Y) by default. The targets r^{≤j−1} of different j live at
  different scales (the residual stream grows with depth), so absolute MSE would favour low-norm layers;
  `criterion="mse"` selects on the absolute value as the paper words it.
- For j = 1 the target is the stem output (patch embedding before class token / pos-embed / ln_pre), see
  critics/tails.py.

Memory: the cache holds N_probe·N_tok·(D_dit per i + D_tail per j) floats (float32 by default); at SD3.5-M ×
ViT-L/14 with 200 probes that is ~0.3 GB per i. One lstsq per i solves all j at once (stacked targets).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from critics.stitchvm import DiTHead, grid_to_tokens, resample_grid
from critics.tails import VisionTail

MAX_TAIL_BLOCK = 4  # paper: the reward side is searched for j ≤ 4


class LinearFit(NamedTuple):
    """Least-squares fit Y ≈ X Wᵀ + b."""

    W: Tensor  # (D_out, D_in) float64
    b: Tensor  # (D_out,) float64
    mse: float  # mean over rows and outputs of the squared residual
    rel_mse: float  # mse / Var(Y) (Var averaged over output columns); 0 = perfect, 1 = no better than the mean


class ProbeFeatures(NamedTuple):
    """Stage-1 caches: one row per (probe image, reward-grid token)."""

    dit: dict[int, Tensor]  # i -> (N_probe·N_tok, D_dit), head features at z_t resampled to the reward grid
    tail: dict[int, Tensor]  # j -> (N_probe·N_tok, D_tail), r^{≤j−1}(x0)
    sigmas: Tensor  # (N_probe,) noise level t of each probe latent


@dataclass
class InterfaceResult:
    """Outcome of the sweep. Grids are indexed [i_values.index(i), j_values.index(j)]."""

    grid: Tensor  # (I, J) the selection criterion (rel_mse or mse)
    mse: Tensor  # (I, J) absolute MSE
    rel_mse: Tensor  # (I, J) relative MSE
    i_values: list[int]
    j_values: list[int]
    best: tuple[int, int]  # selected (i, j): the pinned one if given, else argmin of grid
    criterion: str
    fits: dict[tuple[int, int], LinearFit] = field(default_factory=dict)  # the best fit; all with keep_all_fits


def validate_interface(i: int, j: int, num_dit_blocks: int, num_tail_blocks: int) -> None:
    """ValueError unless 1 ≤ i ≤ num_dit_blocks and 1 ≤ j ≤ min(4, num_tail_blocks)."""
    j_max = min(MAX_TAIL_BLOCK, num_tail_blocks)
    if not (1 <= i <= num_dit_blocks and 1 <= j <= j_max):
        raise ValueError(f"interface (i, j) = ({i}, {j}) out of range: need 1 ≤ i ≤ {num_dit_blocks} (DiT blocks) "
                         f"and 1 ≤ j ≤ {j_max} (reward blocks, paper searches j ≤ {MAX_TAIL_BLOCK})")


@torch.no_grad()
def collect_features(head: DiTHead, tail: VisionTail, images: Tensor, latents: Tensor, i_values: Sequence[int],
                     j_values: Sequence[int], sigmas: Tensor | None = None, generator: torch.Generator | None = None,
                     batch_size: int = 16, dtype: torch.dtype = torch.float32,
                     cond: tuple[Tensor, Tensor] | None = None) -> ProbeFeatures:
    """Cache u^{≤i}(z_t) for every i and r^{≤j−1}(x0) for every j (Eq. 7's regressors and targets).

    Each batch takes ONE DiT pass tapped after every requested block and ONE tail pass tapped at every j.

    Args:
        head: DiTHead with depth ≥ max(i_values).
        tail: the reward tower's VisionTail (teacher; not modified).
        images: (N, 3, H, W) probe images in [0, 1].
        latents: (N, C, h, w) their normalised latents z0 = E(x0).
        sigmas: (N,) noise levels t; default t ~ U[0, 1] drawn from `generator`.
        generator: CPU generator for t and ε.
        cond: (embeds (N, L, D), pooled (N, P)) for a prompt-conditioned head (the probes' captions); None: null text.
    """
    N = images.shape[0]
    if latents.shape[0] != N:
        raise ValueError(f"{N} images but {latents.shape[0]} latents")
    if max(i_values) > head.i:
        raise ValueError(f"head has depth {head.i}; cannot tap block {max(i_values)}")
    if sigmas is None:
        sigmas = torch.rand(N, generator=generator, dtype=torch.float64)
    if tuple(sigmas.shape) != (N,):
        raise ValueError(f"sigmas must be ({N},); got {tuple(sigmas.shape)}")
    device = head.device
    dit: dict[int, list[Tensor]] = {i: [] for i in i_values}
    tgt: dict[int, list[Tensor]] = {j: [] for j in j_values}
    for s in range(0, N, batch_size):
        z0 = latents[s:s + batch_size].to(device)
        eps = torch.randn(z0.shape, generator=generator, dtype=z0.dtype).to(device)
        t = sigmas[s:s + batch_size].to(device, z0.dtype).view(-1, 1, 1, 1)
        z_t = (1 - t) * z0 + t * eps  # forward process, sigma = t
        extra = () if cond is None else (tuple(x[s:s + batch_size].to(device) for x in cond),)
        for i, h in head.forward_taps(z_t, t.flatten(), list(i_values), *extra).items():
            h = grid_to_tokens(resample_grid(h, tail.grid))  # (b, N_tok, D_dit)
            dit[i].append(h.reshape(-1, h.shape[-1]).to("cpu", dtype))
        pixels = tail.preprocess(images[s:s + batch_size].to(device))
        for j, pre in tail.prefixes(pixels, list(j_values)).items():
            tgt[j].append(pre.tokens.reshape(-1, pre.tokens.shape[-1]).to("cpu", dtype))
    return ProbeFeatures({i: torch.cat(v) for i, v in dit.items()}, {j: torch.cat(v) for j, v in tgt.items()},
                         sigmas.float())


def _lstsq_with_intercept(X: Tensor, Y: Tensor) -> tuple[Tensor, Tensor]:
    """Solve [X 1] [Wᵀ; b] = Y in float64. gelsd (SVD, rank-revealing) on CPU; QR (gels) on CUDA."""
    rows, d_in = X.shape
    if rows < d_in + 1:
        raise ValueError(f"probe set too small: {rows} rows for {d_in} features; need at least {d_in + 1} "
                         f"(rows = probe images × reward tokens; add probe images)")
    X64 = torch.cat([X.double(), torch.ones(rows, 1, dtype=torch.float64, device=X.device)], dim=1)
    Y64 = Y.double().to(X.device)
    driver = "gelsd" if X.device.type == "cpu" else "gels"  # CUDA only offers gels: assumes full column rank
    sol = torch.linalg.lstsq(X64, Y64, driver=driver).solution  # (d_in + 1, D_out)
    if not torch.isfinite(sol).all():
        raise FloatingPointError(f"lstsq ({driver}) returned non-finite values: the features are rank-deficient; "
                                 f"fit on CPU (gelsd) instead")
    return sol[:-1].T.contiguous(), sol[-1].contiguous()


def _errors(X: Tensor, Y: Tensor, W: Tensor, b: Tensor) -> tuple[float, float]:
    Y64 = Y.double().to(X.device)
    resid = X.double() @ W.T + b - Y64
    mse = resid.pow(2).mean().item()
    var = Y64.var(dim=0, unbiased=False).mean().item()
    return mse, mse / var if var > 0 else float("inf")


def fit_linear(X: Tensor, Y: Tensor) -> LinearFit:
    """Least squares with intercept, Y ≈ X Wᵀ + b, in float64.

    Args:
        X: (R, D_in) regressors.  Y: (R, D_out) targets.
    Raises:
        ValueError: fewer rows than D_in + 1.
    """
    if X.dim() != 2 or Y.dim() != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"X (R, D_in) and Y (R, D_out) must share R; got {tuple(X.shape)}, {tuple(Y.shape)}")
    W, b = _lstsq_with_intercept(X, Y)
    mse, rel = _errors(X, Y, W, b)
    return LinearFit(W, b, mse, rel)


def search(head: DiTHead, tail: VisionTail, images: Tensor, latents: Tensor, i_values: Sequence[int] | None = None,
           j_values: Sequence[int] | None = None, pinned: tuple[int, int] | None = None,
           sigmas: Tensor | None = None, generator: torch.Generator | None = None, batch_size: int = 16,
           criterion: str = "rel_mse", keep_all_fits: bool = False,
           cond: tuple[Tensor, Tensor] | None = None) -> InterfaceResult:
    """Sweep (i, j), fit Eq. 7 for each, pick the best (or validate and use `pinned`).

    Args:
        head: DiTHead whose depth bounds i (build it with i = num_layers to sweep every block).
        i_values: DiT blocks to try (default 1..head.i; just the pinned i when pinned is given).
        j_values: reward blocks to try (default 1..min(4, L); just the pinned j when pinned is given).
        pinned: a fixed (i, j) from the config; validated, fitted, and returned as `best`.
        criterion: "rel_mse" (default) or "mse".
        keep_all_fits: keep W, b of every (i, j) (memory: D_tail·D_dit float64 each); else only the best.
        cond: the head's text conditioning per probe (collect_features); None: null text.
    """
    if criterion not in ("rel_mse", "mse"):
        raise ValueError(f"criterion must be 'rel_mse' or 'mse'; got {criterion!r}")
    j_max = min(MAX_TAIL_BLOCK, tail.num_blocks)
    if pinned is not None:
        validate_interface(*pinned, num_dit_blocks=head.num_layers, num_tail_blocks=tail.num_blocks)
        if pinned[0] > head.i:
            raise ValueError(f"pinned i = {pinned[0]} exceeds the head depth {head.i}; build a deeper DiTHead")
        i_values = [pinned[0]] if i_values is None else sorted(set(i_values) | {pinned[0]})
        j_values = [pinned[1]] if j_values is None else sorted(set(j_values) | {pinned[1]})
    i_values = list(range(1, head.i + 1)) if i_values is None else list(i_values)
    j_values = list(range(1, j_max + 1)) if j_values is None else list(j_values)
    for i in i_values:
        for j in j_values:
            validate_interface(i, j, head.i, tail.num_blocks)

    feats = collect_features(head, tail, images, latents, i_values, j_values, sigmas, generator, batch_size,
                             cond=cond)
    Y_all = torch.cat([feats.tail[j] for j in j_values], dim=1)  # (R, J·D_tail): all j in one solve per i
    D = tail.width
    mse = torch.zeros(len(i_values), len(j_values), dtype=torch.float64)
    rel = torch.zeros_like(mse)
    fits: dict[tuple[int, int], LinearFit] = {}
    for a, i in enumerate(i_values):
        X = feats.dit[i].double()  # cast once per i; reused by every j's error
        W_all, b_all = _lstsq_with_intercept(X, Y_all)
        for c, j in enumerate(j_values):
            W, b = W_all[c * D:(c + 1) * D], b_all[c * D:(c + 1) * D]
            m, r = _errors(X, feats.tail[j], W, b)
            mse[a, c], rel[a, c] = m, r
            fits[(i, j)] = LinearFit(W, b, m, r)
    grid = rel if criterion == "rel_mse" else mse
    if pinned is not None:
        best = tuple(pinned)
    else:
        a, c = divmod(int(torch.argmin(grid)), len(j_values))
        best = (i_values[a], j_values[c])
    if not keep_all_fits:
        fits = {best: fits[best]}
    return InterfaceResult(grid, mse, rel, i_values, j_values, best, criterion, fits)


def save_heatmap(result: InterfaceResult, path_png: str) -> None:
    """Heatmap of the (i, j) fit errors with annotated cells; the selected interface is boxed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg without touching the global backend
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    grid = result.grid.numpy()
    fig = Figure(figsize=(1.2 + 0.9 * len(result.j_values), 1.0 + 0.35 * len(result.i_values)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(result.j_values)), [str(j) for j in result.j_values])
    ax.set_yticks(range(len(result.i_values)), [str(i) for i in result.i_values])
    ax.set_xlabel("reward block j")
    ax.set_ylabel("DiT block i")
    ax.set_title(f"stage-1 fit {result.criterion}")
    for a in range(grid.shape[0]):
        for c in range(grid.shape[1]):
            ax.text(c, a, f"{grid[a, c]:.3g}", ha="center", va="center", fontsize=7, color="w")
    bi, bj = result.i_values.index(result.best[0]), result.j_values.index(result.best[1])
    ax.add_patch(Rectangle((bj - 0.5, bi - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path_png, dpi=120)
