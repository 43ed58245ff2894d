"""Stage 2: loss values by hand, schedule and noise law, a short distillation on tiny models."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from critics.distill import (DistillConfig, caption_metric, distill, rebatch, sample_sigmas, smooth_l1_distill_loss,
                             stitchvm_distill_loss, warmup_factor)
from critics.stitchvm import load_stitchvm
from critics.tails import ClipPreprocess
from tests.critics.test_stitchvm import LATENT, tiny_stitchvm


class TinyEncoder(nn.Module):
    """images (B, 3, 32, 32) in [0, 1] → latents (B, 4, 16, 16): a fixed stand-in for FlowPolicy.encode."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(11)
        self.conv = nn.Conv2d(3, 4, kernel_size=2, stride=2)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(2 * images - 1)


def image_batches(n: int = 16, batch: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.rand(n, 3, 32, 32, generator=g).split(batch))


def eval_loss(model, teacher_reward, encoder, images: torch.Tensor) -> float:
    """Distillation loss on a fixed batch with fixed (σ, ε): deterministic, to compare before/after training."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        t_out = model.tail.__class__(teacher_reward.vision).encode(images)
        z0 = encoder(images)
        sigma = torch.rand(images.shape[0], generator=g)
        z_t = (1 - sigma.view(-1, 1, 1, 1)) * z0 + sigma.view(-1, 1, 1, 1) * torch.randn(z0.shape, generator=g)
        s_out = model.features(z_t, sigma)
        return stitchvm_distill_loss(s_out.embed, s_out.tokens, t_out.embed, t_out.tokens).loss.item()


def test_embed_token_loss_hand_computed():
    student_emb, teacher_emb = torch.tensor([[3.0, 4.0]]), torch.tensor([[2.0, 0.0]])  # ẽ = (.6, .8) vs (1, 0)
    student_tok = torch.zeros(1, 2, 2)
    teacher_tok = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    out = stitchvm_distill_loss(student_emb, student_tok, teacher_emb, teacher_tok, lambda_tok=0.5)
    assert out.embed_loss.item() == pytest.approx(0.4 ** 2 + 0.8 ** 2)  # 0.8
    assert out.token_loss.item() == pytest.approx((1 + 4 + 9 + 16) / 4)  # 7.5
    assert out.loss.item() == pytest.approx(0.8 + 0.5 * 7.5)


def test_smooth_l1_loss_hand_computed():
    # Smooth-ℓ1 (β = 1): ½d² for |d| < 1, |d| − ½ otherwise
    out = smooth_l1_distill_loss(
        student_emb=torch.tensor([[0.0, 2.0]]), student_tok=torch.tensor([[[0.5, 2.0]]]),
        student_score=torch.tensor([4.0]),
        teacher_emb=torch.tensor([[1.0, 0.0]]), teacher_tok=torch.zeros(1, 1, 2), teacher_score=torch.tensor([1.0]))
    assert out.token_loss.item() == pytest.approx((0.125 + 1.5) / 2)
    assert out.embed_loss.item() == pytest.approx(0.5)  # ẽ = (0, 1) vs (1, 0): |d| = 1 → 0.5 each
    assert out.score_loss.item() == pytest.approx(2.5)
    assert out.loss.item() == pytest.approx(0.8125 + 0.5 + 2.5)


def test_schedule_noise_law_and_rebatch():
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0
    g = torch.Generator().manual_seed(0)
    ln = sample_sigmas(20000, DistillConfig(), g)
    assert 0 < ln.min() and ln.max() < 1
    assert ln.median().item() == pytest.approx(0.5, abs=0.02)  # logit-normal(0, 1): centred at 1/2
    assert torch.logit(ln).std().item() == pytest.approx(1.0, abs=0.03)
    un = sample_sigmas(20000, DistillConfig(sigma_sampling="uniform"), g)
    assert un.mean().item() == pytest.approx(0.5, abs=0.01) and un.std().item() == pytest.approx(math.sqrt(1 / 12),
                                                                                                  abs=0.01)
    chunks = list(rebatch([torch.zeros(3, 3, 2, 2), (torch.ones(4, 3, 2, 2), ["p"] * 4), torch.zeros(2, 3, 2, 2)], 4))
    assert [c.images.shape[0] for c in chunks] == [4, 4]  # 9 images → two batches of 4, the last one dropped
    assert chunks[0].images[3].sum() == 12 and chunks[1].images[:3].sum() == 36
    assert [c.captions for c in chunks] == [None, None]  # one item without captions: none for the stream
    assert all(c.latents is None and c.own is None for c in chunks)
    captioned = [(torch.full((3, 3, 2, 2), float(k)), [f"p{k}"] * 3) for k in range(3)]
    chunks = list(rebatch(captioned, 4))  # captions follow their images across the re-chunking
    assert [c.captions for c in chunks] == [["p0", "p0", "p0", "p1"], ["p1", "p1", "p2", "p2"]]
    assert [c.images[:, 0, 0, 0].tolist() for c in chunks] == [[0, 0, 0, 1], [1, 1, 2, 2]]
    labels = [(torch.zeros(4, 3, 2, 2), [0, 1, 2, 3])]  # a list that is not of strings is not captions
    assert [c.captions for c in rebatch(labels, 4)] == [None]
    with pytest.raises(ValueError, match="caption_dropout"):
        DistillConfig(caption_dropout=1.0)
    with pytest.raises(ValueError, match="loss must be one of"):
        DistillConfig(loss="mse")
    with pytest.raises(ValueError, match="sigma_sampling must be one of"):
        DistillConfig(sigma_sampling="cosine")


def test_distill_reduces_loss_and_trains_only_stitch_and_tail(tmp_path):
    model, transformer, reward, embeds, pooled = tiny_stitchvm(j=2)
    encoder = TinyEncoder()
    data = image_batches(16, 4)
    eval_images = torch.cat(data)[:8]
    head_before = {n: p.detach().clone() for n, p in model.head.named_parameters()}
    stitch_before = [p.detach().clone() for p in model.stitch_parameters()]
    tail_before = [p.detach().clone() for _, p in model.tail_named_parameters()]
    teacher_before = [p.detach().clone() for p in reward.vision.parameters()]
    loss_before = eval_loss(model, reward, encoder, eval_images)
    logged = []
    cfg = DistillConfig(lr=3e-3, warmup_steps=2, batch_size=8, micro_batch_size=4, epochs=10, max_steps=8,
                        log_every=4, ckpt_every=3, ckpt_dir=str(tmp_path / "ckpt"), progress=False)
    stats = distill(model, reward, encoder, data, cfg, callback=lambda step, s: logged.append((step, s)),
                    ckpt_meta={"image_size": 32})
    loss_after = eval_loss(model, reward, encoder, eval_images)
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)
    assert len(stats["distill/loss"]) == 8 and [s for s, _ in logged] == [4, 8]
    assert stats["distill/lr"][:3] == pytest.approx([1.5e-3, 3e-3, 3e-3])
    assert all(torch.equal(p, head_before[n]) for n, p in model.head.named_parameters())
    assert all(not torch.equal(p, q) for p, q in zip(model.stitch_parameters(), stitch_before))
    tail_moved = [not torch.equal(p, q) for (_, p), q in zip(model.tail_named_parameters(), tail_before)]
    assert sum(tail_moved) > 0.9 * len(tail_moved)
    assert all(torch.equal(p, q) for p, q in zip(reward.vision.parameters(), teacher_before))
    assert not model.training
    # the final checkpoint holds the trained critic
    loaded = load_stitchvm(tmp_path / "ckpt", transformer, reward, embeds, pooled)
    z = torch.randn(2, 4, LATENT, LATENT)
    with torch.no_grad():
        assert torch.equal(loaded.value(z, 0.5, ["a", "b"]), model.value(z, 0.5, ["a", "b"]))


def test_gradient_accumulation_matches_one_big_batch():
    data = image_batches(8, 8)
    results = []
    for micro in (8, 4):
        model, _, reward, _, _ = tiny_stitchvm(j=1)
        cfg = DistillConfig(lr=1e-3, warmup_steps=0, batch_size=8, micro_batch_size=micro, max_steps=1,
                            progress=False)
        stats = distill(model, reward, TinyEncoder(), data, cfg)
        results.append((stats["distill/loss"][0], [p.detach().clone() for p in model.stitch_parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for p, q in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_rows_with_their_own_latent_start_from_it():
    # the encoder maps every image to zeros; rows flagged `own` carry a latent of 1000s, so the student's
    # z_t = (1 - σ) z0 + σ ε is ~1000 exactly on those rows, and only noise on the others
    model, _, reward, _, _ = tiny_stitchvm(j=1)
    seen = []
    model.head.register_forward_pre_hook(lambda _, args: seen.append((args[0].detach().clone(),
                                                                      args[1].detach().clone())))
    images = torch.rand(8, 3, 32, 32)
    own = torch.tensor([True, False, False, True, False, True, False, False])
    latents = torch.where(own.view(-1, 1, 1, 1), 1000.0, 0.0).expand(8, 4, LATENT, LATENT).clone()
    zeros = lambda x: torch.zeros(x.shape[0], 4, LATENT, LATENT)  # noqa: E731
    cfg = DistillConfig(lr=1e-3, warmup_steps=0, batch_size=8, micro_batch_size=4, max_steps=1, progress=False,
                        sigma_sampling="uniform")
    distill(model, reward, zeros, [(images, None, latents, own)], cfg)
    z_t = torch.cat([z for z, _ in seen])
    sigma = torch.cat([t for _, t in seen]).view(-1, 1, 1, 1)
    noise_part = z_t - (1 - sigma) * latents
    assert noise_part.abs().max() < 10 * sigma.max()  # σ ε with |ε| < 10: z0 was 1000 on own rows, 0 elsewhere
    assert (z_t[own].abs().mean() > 100) and (z_t[~own].abs().mean() < 5)
    with pytest.raises(ValueError, match="carries latents"):
        distill(model, reward, zeros, [(images, None, latents[:, :2], own)], cfg)


def test_a_decoded_teacher_scores_the_image_of_the_students_own_latent():
    """teacher_input 'decoded': the teacher scores decode_fn(z0) of the very z0 the student's z_t is noised from (own
    rows' latents included), so a run on images B whose latents decode to images A is, step for step, the run on A
    with the teacher on the images themselves: same losses, same weights."""
    import copy

    model, _, reward, _, _ = tiny_stitchvm(j=1)
    g = torch.Generator().manual_seed(5)
    images_a, images_b = torch.rand(8, 3, 32, 32, generator=g), torch.rand(8, 3, 32, 32, generator=g)
    encoded = TinyEncoder()(images_a)  # what E gives for the rows without their own latent
    own = torch.tensor([True, False, True, False, False, False, True, False])
    given = torch.randn(8, 4, LATENT, LATENT, generator=g)
    z0 = torch.where(own.view(-1, 1, 1, 1), given, encoded)  # the student's clean latents
    decoded_from = []

    def encode(x):  # E: row k of images_a or images_b → row k of `encoded`
        k = [int(torch.argmin(torch.minimum((images_a - r).flatten(1).abs().sum(1),
                                            (images_b - r).flatten(1).abs().sum(1)))) for r in x]
        return encoded[k]

    def decode(z):  # a planted decoder: z0 row k → images_a row k
        decoded_from.append(z.clone())
        k = [int(torch.argmin((z0 - r).flatten(1).abs().sum(1))) for r in z]
        return images_a[k]

    cfg = DistillConfig(lr=1e-3, warmup_steps=0, batch_size=8, micro_batch_size=4, max_steps=2, progress=False,
                        sigma_sampling="uniform", check_teacher=False)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    stats_a = distill(a, reward, encode, [(images_a, None, given, own)], cfg)
    stats_b = distill(b, reward, encode, [(images_b, None, given, own)],
                      DistillConfig(**{**cfg.__dict__, "teacher_input": "decoded"}), decode_fn=decode)
    assert torch.equal(torch.cat(decoded_from[:2]), z0)  # the first step's two micro-batches
    assert stats_b["distill/loss"] == pytest.approx(stats_a["distill/loss"], rel=1e-6)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)
    stats_image = distill(copy.deepcopy(model), reward, encode, [(images_b, None, given, own)], cfg)
    assert stats_image["distill/loss"][0] != pytest.approx(stats_a["distill/loss"][0], rel=1e-3)  # B's own teacher
    with pytest.raises(ValueError, match="pass decode_fn"):
        distill(model, reward, TinyEncoder(), image_batches(8, 4), DistillConfig(**{**cfg.__dict__,
                                                                                    "teacher_input": "decoded"}))
    with pytest.raises(ValueError, match="teacher_input must be one of"):
        DistillConfig(teacher_input="x0")


def test_smooth_l1_loss_runs_and_reports_score_loss():
    model, _, reward, _, _ = tiny_stitchvm(j=1, score_kind="image")
    cfg = DistillConfig(loss="smooth_l1", lr=1e-3, warmup_steps=0, batch_size=4, max_steps=2, progress=False)
    stats = distill(model, reward, TinyEncoder(), image_batches(8, 4), cfg)
    assert len(stats["distill/score_loss"]) == 2
    parts = [stats[f"distill/{k}"][0] for k in ("token_loss", "embed_loss", "score_loss")]
    assert stats["distill/loss"][0] == pytest.approx(sum(parts))


def test_distill_fails_loudly():
    model, _, reward, _, _ = tiny_stitchvm(j=1)
    cfg = DistillConfig(batch_size=4, max_steps=1, progress=False)
    reward.preprocess = ClipPreprocess((32, 32), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # differs from tail's
    with pytest.raises(ValueError, match="teacher tower disagrees with reward.image_embed"):
        distill(model, reward, TinyEncoder(), image_batches(4, 4), cfg)
    model, _, reward, _, _ = tiny_stitchvm(j=1)
    with pytest.raises(ValueError, match="fewer than batch_size = 8"):
        distill(model, reward, TinyEncoder(), image_batches(4, 4), DistillConfig(batch_size=8, progress=False))
    model.tail = model.tail.__class__(reward.vision)  # tail sharing the teacher's weights
    with pytest.raises(ValueError, match="shares parameters with the teacher"):
        distill(model, reward, TinyEncoder(), image_batches(4, 4), cfg)
    model, _, reward, _, _ = tiny_stitchvm(j=1)
    with pytest.raises(ValueError, match="no batch in epoch 2 of 2: pass a re-iterable dataset"):
        distill(model, reward, TinyEncoder(), iter(list(image_batches(4, 4))), DistillConfig(batch_size=4, epochs=2,
                                                                                         progress=False))
    model, _, reward, _, _ = tiny_stitchvm(j=1)
    with pytest.raises(ValueError, match="encode_fn gives latents"):
        distill(model, reward, lambda x: F.avg_pool2d(x, 4).repeat(1, 2, 1, 1)[:, :4], image_batches(4, 4), cfg)


def test_caption_score_term_is_the_mean_squared_score_error_over_the_captions():
    """E Δᵀ M Δ with M = mean t tᵀ equals E · mean_c (ẽ_S·t_c − ẽ_T·t_c)² (planted captions), M has trace 1, and
    an isotropic caption set (±e_k) gives back ‖Δ‖²."""
    g = torch.Generator().manual_seed(0)
    s_emb, t_emb = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    texts = torch.randn(40, 6, generator=g) * 3  # caption_metric normalises
    tok = torch.zeros(5, 2, 3)
    M = caption_metric(texts)
    assert torch.trace(M).item() == pytest.approx(1.0, abs=1e-6)
    out = stitchvm_distill_loss(s_emb, tok, t_emb, tok, 1.0, M, lambda_score=2.0)
    t = F.normalize(texts, dim=-1)
    scores = (F.normalize(s_emb, dim=-1) @ t.T - F.normalize(t_emb, dim=-1) @ t.T).pow(2).mean()
    assert out.score_loss.item() == pytest.approx(6 * scores.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(out.embed_loss.item() + 2.0 * out.score_loss.item(), rel=1e-6)
    iso = caption_metric(torch.cat([torch.eye(6), -torch.eye(6)]))
    iso_out = stitchvm_distill_loss(s_emb, tok, t_emb, tok, 1.0, iso, lambda_score=1.0)
    assert iso_out.score_loss.item() == pytest.approx(iso_out.embed_loss.item(), rel=1e-5)
    assert stitchvm_distill_loss(s_emb, tok, t_emb, tok).score_loss.item() == 0.0  # off without a metric


def test_own_caption_score_term_is_the_squared_error_of_each_images_own_score():
    """E (Δ·t_b)² with t_b image b's own caption: E · mean_b (ẽ_S·t_b − ẽ_T·t_b)²; an error orthogonal to the caption
    costs nothing; per-image captions all equal to one t give the caption-score term of M = t tᵀ."""
    g = torch.Generator().manual_seed(1)
    s_emb, t_emb, texts = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    tok = torch.zeros(5, 2, 3)
    out = stitchvm_distill_loss(s_emb, tok, t_emb, tok, own_text=3 * texts, lambda_own_score=0.5)
    t = F.normalize(texts, dim=-1)
    err = ((F.normalize(s_emb, dim=-1) - F.normalize(t_emb, dim=-1)) * t).sum(-1)
    assert out.own_score_loss.item() == pytest.approx(6 * err.pow(2).mean().item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(out.embed_loss.item() + 0.5 * out.own_score_loss.item(), rel=1e-6)
    one = texts[:1].expand(5, 6)
    M = caption_metric(texts[:1])
    assert stitchvm_distill_loss(s_emb, tok, t_emb, tok, own_text=one).own_score_loss.item() == pytest.approx(
        stitchvm_distill_loss(s_emb, tok, t_emb, tok, caption_metric=M).score_loss.item(), rel=1e-5)
    # the student's unit embedding turned about the caption axis: same score, no own-score error
    e1, e2, e3 = torch.eye(3)
    student, teacher = (0.6 * e1 + 0.8 * e2)[None], (0.6 * e1 + 0.8 * e3)[None]
    zero = stitchvm_distill_loss(student, tok[:1], teacher, tok[:1], own_text=e1[None], lambda_own_score=1.0)
    assert zero.own_score_loss.item() == pytest.approx(0.0, abs=1e-7) and zero.embed_loss.item() > 1
    assert stitchvm_distill_loss(s_emb, tok, t_emb, tok).own_score_loss.item() == 0.0  # off without captions
    with pytest.raises(ValueError, match="one caption embedding per image"):
        stitchvm_distill_loss(s_emb, tok, t_emb, tok, own_text=texts[:3])


def own_text_fn(width: int, calls: list | None = None):
    """A stand-in for the reward's text_embed: a fixed random embedding per caption (by its text)."""
    def embed(captions: list[str]) -> torch.Tensor:
        if calls is not None:
            calls.append(list(captions))
        return torch.stack([torch.randn(width, generator=torch.Generator().manual_seed(sum(map(ord, c))))
                            for c in captions])
    return embed


def test_own_caption_score_term_trains_on_the_real_captions():
    model, _, reward, _, _ = tiny_stitchvm(j=1)
    width = reward.image_embed(torch.rand(1, 3, 32, 32)).shape[-1]
    data = [(x, [f"caption {k} {i}" for i in range(x.shape[0])]) for k, x in enumerate(image_batches(16, 4))]
    calls = []
    cfg = DistillConfig(lambda_own_score=2.0, max_steps=3, batch_size=4, warmup_steps=0, progress=False)
    stats = distill(model, reward, TinyEncoder(), data, cfg, text_embed_fn=own_text_fn(width, calls))
    assert calls == [data[k][1] for k in range(3)]  # every step scores its images against their own captions
    assert len(stats["distill/own_score_loss"]) == 3 and all(v > 0 for v in stats["distill/own_score_loss"])
    parts = [stats[f"distill/{k}"][0] for k in ("embed_loss", "token_loss", "own_score_loss")]
    assert stats["distill/loss"][0] == pytest.approx(parts[0] + parts[1] + 2.0 * parts[2], rel=1e-5)


def test_own_caption_score_term_needs_captions_and_the_text_side():
    with pytest.raises(ValueError, match="lambda_own_score must be >= 0"):
        DistillConfig(lambda_own_score=-1)
    with pytest.raises(ValueError, match="lambda_own_score is a term of the 'embed_token' loss"):
        DistillConfig(lambda_own_score=1, loss="smooth_l1")
    model, _, reward, _, _ = tiny_stitchvm(j=1)
    cfg = DistillConfig(lambda_own_score=1.0, max_steps=1, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="pass text_embed_fn"):
        distill(model, reward, TinyEncoder(), image_batches(), cfg)
    with pytest.raises(ValueError, match="needs each training image's caption"):
        distill(model, reward, TinyEncoder(), image_batches(), cfg, text_embed_fn=own_text_fn(8))


def test_caption_score_term_needs_its_metric_and_the_embed_token_loss():
    with pytest.raises(ValueError, match="lambda_score must be >= 0"):
        DistillConfig(lambda_score=-1)
    with pytest.raises(ValueError, match="term of the 'embed_token' loss"):
        DistillConfig(lambda_score=1, loss="smooth_l1")
    model, _, reward, _, _ = tiny_stitchvm()
    with pytest.raises(ValueError, match="needs the caption metric M"):
        distill(model, reward, TinyEncoder(), image_batches(), DistillConfig(lambda_score=1.0, max_steps=1,
                                                                             batch_size=4, progress=False))


def test_a_resumed_run_goes_on_as_if_it_had_not_stopped(tmp_path):
    """Four steps straight, against two steps, a checkpoint's DistillState written to files and read back, and two
    more steps from it: the same weights, optimizer moments and learning rate (every batch the same images, so the
    restarted data stream does not matter; the (σ, ε) generator is part of the state)."""
    import copy

    from critics.distill import STATE_JSON, STATE_TENSORS, DistillState

    model, _, reward, _, _ = tiny_stitchvm(j=1)
    g = torch.Generator().manual_seed(2)
    batch = torch.rand(4, 3, 32, 32, generator=g)
    data = [batch] * 8
    cfg = DistillConfig(lr=1e-3, warmup_steps=1, batch_size=4, max_steps=4, lr_decay="cosine", progress=False,
                        sigma_sampling="uniform", ckpt_every=2, ckpt_dir=str(tmp_path / "ckpt"))
    states = {}
    straight = copy.deepcopy(model)
    stats = distill(straight, reward, TinyEncoder(), data, cfg, state_fn=lambda f: states.setdefault(len(states), f))
    assert set(states[0]) == {STATE_TENSORS, STATE_JSON}
    for name, data_bytes in states[0].items():  # the step-2 checkpoint's state
        (tmp_path / name).write_bytes(data_bytes)
    state = DistillState.read(tmp_path)
    assert state.step == 2
    resumed = copy.deepcopy(model)  # the untrained start: the state's weights replace it
    more = distill(resumed, reward, TinyEncoder(), data, cfg, resume=state)
    assert len(more["distill/loss"]) == 2
    assert more["distill/lr"] == pytest.approx(stats["distill/lr"][2:])
    assert more["distill/loss"] == pytest.approx(stats["distill/loss"][2:], rel=1e-5)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b)
    state.interface = (state.interface[0] + 1, state.interface[1])
    with pytest.raises(ValueError, match=r"stitched at \(i, j\) = .*pin search.pinned"):
        distill(copy.deepcopy(model), reward, TinyEncoder(), data, cfg, resume=state)
    states.clear()  # a run that ends between checkpoints: its final save carries the final step's state
    distill(copy.deepcopy(model), reward, TinyEncoder(), data, replace(cfg, max_steps=3),
            state_fn=lambda f: states.setdefault(len(states), f))
    for name, data_bytes in states[len(states) - 1].items():
        (tmp_path / name).write_bytes(data_bytes)
    assert DistillState.read(tmp_path).step == 3
    (tmp_path / STATE_JSON).write_text("{not json")
    with pytest.raises(ValueError, match="training state in .* is damaged"):
        DistillState.read(tmp_path)
    with pytest.raises(ValueError, match="holds no stage-2 training state"):
        DistillState.read(tmp_path / "ckpt")  # a critic's files only
    with pytest.raises(ValueError, match="cannot tell which epoch it stopped in"):
        distill(copy.deepcopy(model), reward, TinyEncoder(), data, replace(cfg, max_steps=None, lr_decay="constant"),
                resume=state)


@pytest.mark.slow
def test_a_compiled_student_and_teacher_train_as_the_eager_ones():
    # torch.compile rounds differently, so the two runs agree to float32 tolerance, not bit for bit
    data = image_batches(8, 4)
    weights, losses = [], []
    for mode in ("none", "default"):
        model, _, reward, _, _ = tiny_stitchvm(j=1)
        cfg = DistillConfig(lr=1e-3, warmup_steps=0, batch_size=4, max_steps=2, progress=False, compile=mode)
        losses.append(distill(model, reward, TinyEncoder(), data, cfg)["distill/loss"])
        weights.append([p.detach().clone() for p in model.stitch_parameters()])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    for p, q in zip(*weights):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_an_unknown_compile_mode_is_refused():
    with pytest.raises(ValueError, match="compile must be one of"):
        DistillConfig(compile="max")
