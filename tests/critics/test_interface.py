"""Stage 1: least-squares fit, feature caches, (i, j) sweep, pinned interface, heatmap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from critics.interface import collect_features, fit_linear, save_heatmap, search, validate_interface
from critics.stitchvm import DiTHead, Stitch, grid_to_tokens, resample_grid
from critics.tails import OpenCLIPTail
from tests.critics.test_stitchvm import LATENT, null_cond, tiny_open_clip, tiny_sd3


def probe_set(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randn(n, 4, LATENT, LATENT, generator=g)


def tiny_head_tail(depth: int = 3) -> tuple[DiTHead, OpenCLIPTail]:
    return DiTHead(tiny_sd3(), depth, *null_cond(), latent_size=LATENT), OpenCLIPTail(tiny_open_clip().visual)


def test_fit_recovers_planted_linear_map():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 20, generator=g, dtype=torch.float64)
    W, b = torch.randn(7, 20, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    fit = fit_linear(X, X @ W.T + b)
    assert (fit.W - W).abs().max() < 1e-8 and (fit.b - b).abs().max() < 1e-8
    assert fit.mse < 1e-20 and fit.rel_mse < 1e-20
    assert fit.W.dtype == torch.float64


def test_fit_matches_numpy_least_squares_on_noisy_data():
    rng = np.random.default_rng(1)
    X, Y = rng.normal(size=(300, 10)), rng.normal(size=(300, 4))
    fit = fit_linear(torch.from_numpy(X).float(), torch.from_numpy(Y).float())  # float32 in, float64 solve
    A = np.concatenate([X.astype(np.float32).astype(np.float64), np.ones((300, 1))], axis=1)
    sol, *_ = np.linalg.lstsq(A, Y.astype(np.float32).astype(np.float64), rcond=None)
    np.testing.assert_allclose(fit.W.numpy(), sol[:-1].T, atol=1e-10)
    np.testing.assert_allclose(fit.b.numpy(), sol[-1], atol=1e-10)
    resid = A @ sol - Y.astype(np.float32)
    assert fit.mse == pytest.approx((resid ** 2).mean(), rel=1e-9)
    assert fit.rel_mse == pytest.approx(fit.mse / Y.astype(np.float32).var(axis=0).mean(), rel=1e-5)
    assert 0.9 < fit.rel_mse < 1.0  # pure noise: the fit barely beats the mean


def test_fit_rejects_too_few_rows():
    with pytest.raises(ValueError, match=r"probe set too small: 10 rows for 10 features; need at least 11"):
        fit_linear(torch.randn(10, 10), torch.randn(10, 3))


def test_collect_features_one_pass_equals_per_block_heads():
    head, tail = tiny_head_tail()
    images, latents = probe_set(4)
    sigmas = torch.tensor([0.0, 0.3, 0.6, 0.9])
    feats = collect_features(head, tail, images, latents, [1, 3], [1, 2], sigmas=sigmas,
                             generator=torch.Generator().manual_seed(5), batch_size=4)
    eps = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    z_t = (1 - sigmas.view(-1, 1, 1, 1)) * latents + sigmas.view(-1, 1, 1, 1) * eps
    with torch.no_grad():
        for i in (1, 3):
            h = DiTHead(tiny_sd3(), i, *null_cond(), latent_size=LATENT)(z_t, sigmas)  # (4, 16, 8, 8)
            expected = grid_to_tokens(resample_grid(h, (4, 4))).reshape(-1, 16)  # 4 images × 16 tokens
            torch.testing.assert_close(feats.dit[i], expected)
        for j in (1, 2):
            torch.testing.assert_close(feats.tail[j], tail.prefix(tail.preprocess(images), j).reshape(-1, 64))
    assert feats.dit[1].shape == (64, 16) and feats.tail[2].shape == (64, 64)


def test_search_grid_and_fit_agree_with_the_initialised_stitch():
    head, tail = tiny_head_tail()
    images, latents = probe_set(6)
    sigmas = torch.linspace(0.05, 0.95, 6)
    result = search(head, tail, images, latents, sigmas=sigmas, generator=torch.Generator().manual_seed(0),
                    batch_size=4, keep_all_fits=True)
    assert result.grid.shape == (3, 4) and result.i_values == [1, 2, 3] and result.j_values == [1, 2, 3, 4]
    assert torch.isfinite(result.grid).all() and (result.rel_mse > 0).all() and (result.rel_mse < 1).all()
    a, c = divmod(int(result.grid.argmin()), 4)
    assert result.best == (result.i_values[a], result.j_values[c])
    torch.testing.assert_close(result.grid, result.rel_mse)

    # the stitch built from fit (i, j) reproduces the fit's MSE on the same probe features
    i, j = 2, 3
    fit = result.fits[(i, j)]
    stitch = Stitch(head.width, tail.width, head.grid, tail.grid, fit.W, fit.b)
    # re-draw the probe noise as collect_features does: one ε draw per batch of 4 from the same generator
    g = torch.Generator().manual_seed(0)
    z_t = []
    for s in range(0, 6, 4):
        e = torch.randn(latents[s:s + 4].shape, generator=g)
        t = sigmas[s:s + 4].view(-1, 1, 1, 1)
        z_t.append((1 - t) * latents[s:s + 4] + t * e)
    z_t = torch.cat(z_t)
    with torch.no_grad():
        pred = stitch(head.forward_taps(z_t, sigmas, [i])[i])  # (6, 16, 64)
        target = tail.prefix(tail.preprocess(images), j)
    mse = (pred.double() - target.double()).pow(2).mean().item()
    assert mse == pytest.approx(fit.mse, rel=1e-4)


def test_pinned_interface_and_validation(tmp_path):
    head, tail = tiny_head_tail()
    images, latents = probe_set(4)
    result = search(head, tail, images, latents, pinned=(3, 2), generator=torch.Generator().manual_seed(0))
    assert result.best == (3, 2) and result.grid.shape == (1, 1) and list(result.fits) == [(3, 2)]
    for bad in [(0, 1), (4, 1), (1, 0), (1, 5)]:
        with pytest.raises(ValueError, match=r"need 1 ≤ i ≤ 3 \(DiT blocks\) and 1 ≤ j ≤ 4"):
            search(head, tail, images, latents, pinned=bad)
    with pytest.raises(ValueError, match="1 ≤ j ≤ 2"):
        validate_interface(1, 3, num_dit_blocks=24, num_tail_blocks=2)
    validate_interface(24, 4, num_dit_blocks=24, num_tail_blocks=24)
    shallow = DiTHead(tiny_sd3(), 1, *null_cond(), latent_size=LATENT)
    with pytest.raises(ValueError, match="exceeds the head depth 1"):
        search(shallow, tail, images, latents, pinned=(2, 1))
    png = tmp_path / "heatmap.png"
    save_heatmap(search(head, tail, images, latents, j_values=[1, 2], generator=torch.Generator().manual_seed(0)),
                 str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_search_rejects_probe_set_smaller_than_feature_width():
    head, tail = tiny_head_tail()
    images, latents = probe_set(1)  # 1 image × 16 tokens = 16 rows < 16 DiT features + 1
    with pytest.raises(ValueError, match="probe set too small: 16 rows for 16 features"):
        search(head, tail, images, latents, pinned=(1, 1))
