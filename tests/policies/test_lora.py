"""LoRA adapters: named adapters, reference policy, EMA, state round trip, diffusers export."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from policies import lora, samplers
from policies.testing import tiny_policy


def _perturb(transformer, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.adapter_parameters(transformer, name).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture()
def policy():
    policy = tiny_policy()
    lora.add_lora(policy.transformer, lora.LoraSpec(r=4, alpha=8))
    _perturb(policy.transformer, "default", 0)
    return policy


def _sample(policy, guidance=1.0):
    cond = policy.encode_prompts(["a red circle", "two blue squares"])
    z_T = policy.noise(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        return policy.decode(samplers.sample(policy.velocity_fn(cond, guidance), z_T, policy.sigmas(6)).z_tau)


def test_new_adapter_is_identity_and_reference_disables():
    policy = tiny_policy()
    base = _sample(policy)
    lora.add_lora(policy.transformer, lora.LoraSpec(r=4, alpha=8))
    torch.testing.assert_close(_sample(policy), base, rtol=0, atol=0)  # B = 0 at init
    _perturb(policy.transformer, "default", 1)
    assert not torch.allclose(_sample(policy), base)
    with lora.reference_policy(policy.transformer):
        torch.testing.assert_close(_sample(policy), base, rtol=0, atol=0)
    assert not torch.allclose(_sample(policy), base)  # re-enabled on exit


def test_named_adapters_copy_and_ema(policy):
    t = policy.transformer
    lora.add_lora(t, lora.LoraSpec(r=4, alpha=8), "old")
    lora.set_active(t, "default")
    cur = {k: v.clone() for k, v in lora.adapter_parameters(t, "default").items()}
    old0 = {k: v.clone() for k, v in lora.adapter_parameters(t, "old").items()}
    lora.ema_update(t, "default", "old", decay=0.75)
    for k, v in lora.adapter_parameters(t, "old").items():
        torch.testing.assert_close(v, 0.75 * old0[k] + 0.25 * cur[k])
    lora.copy_adapter(t, "default", "old")
    with lora.using_adapter(t, "old"):
        old_sample = _sample(policy)
    torch.testing.assert_close(old_sample, _sample(policy), rtol=0, atol=0)
    assert t.active_adapters() == ["default"]
    # only the active adapter is trainable
    trainable = {n for n, p in t.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)


def test_ema_of_a_bf16_adapter_follows_the_float32_recursion(policy):
    # theta_dst after n steps towards a fixed theta_src: src + (dst0 - src) d^n. In place in bf16 each step
    # (1 - d)|src - dst| rounds away once it falls below half an ulp of dst, and the average stalls.
    t = policy.transformer.to(torch.bfloat16)
    lora.add_lora(t, lora.LoraSpec(r=4, alpha=8), "ema")
    _perturb(t, "ema", 3)
    src = {k: v.float() for k, v in lora.adapter_parameters(t, "default").items()}
    dst0 = {k: v.float() for k, v in lora.adapter_parameters(t, "ema").items()}
    d, n = 0.98, 50
    for _ in range(n):
        lora.ema_update(t, "default", "ema", d)
    for k, v in lora.adapter_parameters(t, "ema").items():
        assert v.dtype == torch.bfloat16
        expected = src[k] + (dst0[k] - src[k]) * d ** n
        torch.testing.assert_close(v.float(), expected, rtol=2 ** -8, atol=1e-6)  # one bf16 rounding
    # a value loaded into the adapter (checkpoint, keep_best) restarts the shadow from it
    with torch.no_grad():
        for p in lora.adapter_parameters(t, "ema").values():
            p.zero_()
    lora.ema_update(t, "default", "ema", 0.5)
    for k, v in lora.adapter_parameters(t, "ema").items():
        torch.testing.assert_close(v.float(), (0.5 * src[k]).bfloat16().float(), rtol=0, atol=0)


def _bf16_ema_policy():
    policy = tiny_policy()
    t = policy.transformer.to(torch.bfloat16)
    lora.add_lora(t, lora.LoraSpec(r=4, alpha=8))
    lora.add_lora(t, lora.LoraSpec(r=4, alpha=8), "ema")
    return policy


def _train_and_average(t, steps):
    """Stand-in for training: the trained adapter moves each step, the EMA follows at decay 0.98."""
    for s in steps:
        _perturb(t, "default", 100 + s)
        lora.ema_update(t, "default", "ema", 0.98)


def test_bf16_ema_resumes_bit_exact_with_its_float32_shadow():
    # Uninterrupted: 30 steps. Resumed: 20 steps, the adapters and the shadow saved and loaded into a fresh policy,
    # 10 more. The shadow holds the average below bf16's resolution, so without it the resumed EMA drifts.
    full = _bf16_ema_policy().transformer
    _train_and_average(full, range(30))
    reference = lora.adapter_state_dict(full, "ema")

    first = _bf16_ema_policy().transformer
    _train_and_average(first, range(20))
    saved = {name: lora.adapter_state_dict(first, name) for name in ("default", "ema")}
    shadow = lora.ema_shadow_state(first, "ema")
    assert shadow and all(v.dtype == torch.float32 for v in shadow.values())
    assert lora.ema_shadow_state(first, "default") == {}  # never averaged into

    def resumed(with_shadow):
        t = _bf16_ema_policy().transformer
        for name, state in saved.items():
            lora.load_adapter_state_dict(t, state, name)
        if with_shadow:
            lora.load_ema_shadow_state(t, "ema", shadow)
        _train_and_average(t, range(20, 30))
        return lora.adapter_state_dict(t, "ema")

    got = resumed(with_shadow=True)
    for k, v in reference.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    without = resumed(with_shadow=False)
    assert any(not torch.equal(without[k], v) for k, v in reference.items())

    # a float32 adapter (the run resumed in full precision) takes the exact average
    t32 = tiny_policy().transformer
    lora.add_lora(t32, lora.LoraSpec(r=4, alpha=8), "ema")
    lora.load_adapter_state_dict(t32, {k: v.float() for k, v in saved["ema"].items()}, "ema")
    lora.load_ema_shadow_state(t32, "ema", shadow)
    for k, p in lora.adapter_parameters(t32, "ema").items():
        torch.testing.assert_close(p.detach(), shadow[k], rtol=0, atol=0)

    # a run resumed in another low precision (fp16) continues from the exact average, without error
    t16 = tiny_policy().transformer.to(torch.float16)
    lora.add_lora(t16, lora.LoraSpec(r=4, alpha=8))
    lora.add_lora(t16, lora.LoraSpec(r=4, alpha=8), "ema")
    for name, state in saved.items():
        lora.load_adapter_state_dict(t16, {k: v.half() for k, v in state.items()}, name)
    lora.load_ema_shadow_state(t16, "ema", shadow)
    for k, p in lora.adapter_parameters(t16, "ema").items():
        torch.testing.assert_close(p.detach(), shadow[k].half(), rtol=0, atol=0)
    assert lora.ema_shadow_state(t16, "ema").keys() == shadow.keys()  # kept as its shadow

    with pytest.raises(ValueError, match="different rank"):
        lora.load_ema_shadow_state(first, "ema", {k: v[:1] for k, v in shadow.items()})
    with pytest.raises(ValueError, match="keys the adapter lacks"):
        lora.load_ema_shadow_state(first, "ema", {"nope.lora_A.weight": torch.zeros(1)})


def test_state_dict_round_trip_and_errors(policy):
    t = policy.transformer
    state = lora.adapter_state_dict(t)
    ref = _sample(policy)
    _perturb(t, "default", 7)
    lora.load_adapter_state_dict(t, state)
    torch.testing.assert_close(_sample(policy), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="missing"):
        lora.load_adapter_state_dict(t, dict(list(state.items())[1:]))
    bad = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in state.items()}
    with pytest.raises(ValueError, match="different rank"):
        lora.load_adapter_state_dict(t, bad)


def test_unknown_target_module_error():
    policy = tiny_policy()
    with pytest.raises(ValueError, match=r"\['to_qq'\] not found.*to_q"):
        lora.add_lora(policy.transformer, lora.LoraSpec(target_modules=("to_qq", "to_k")))
    with pytest.raises(ValueError, match="rank"):
        lora.LoraSpec(r=0)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_export_loads_in_diffusers_pipeline(policy, tmp_path, guidance):
    ours = _sample(policy, guidance)
    out = lora.export_diffusers(policy.transformer, tmp_path / "lora")
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    # a fresh base transformer (same weights, no adapters) + load_lora_weights must reproduce our samples
    fresh = tiny_policy()
    pipe = StableDiffusion3Pipeline(transformer=fresh.transformer, vae=fresh.vae,
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=fresh.shift), text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None)
    pipe.load_lora_weights(out)
    cond, null = fresh.encode_prompts(["a red circle", "two blue squares"]), fresh.null_embeds().expand(2)
    with torch.no_grad():
        ref = pipe(prompt_embeds=cond.embeds, pooled_prompt_embeds=cond.pooled, negative_prompt_embeds=null.embeds,
                   negative_pooled_prompt_embeds=null.pooled, latents=fresh.noise(2, torch.Generator().manual_seed(0)),
                   num_inference_steps=6, guidance_scale=guidance, height=16, width=16, output_type="pt").images
    torch.testing.assert_close(ref, ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ref, _sample(tiny_policy(), guidance))  # the adapter matters
