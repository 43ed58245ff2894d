"""SD3's triple text encoder (CLIP-L + CLIP-G + T5) through diffusers' own encode_prompt, at tiny configs."""

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from policies.testing import TINY_WORDS, tiny_transformer
from policies.text_encoders import SD3TextEncoders, word_tokenizer


def _clip(hidden, proj, tok, seed):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=tok.model_max_length, projection_dim=proj,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return CLIPTextModelWithProjection(cfg).eval()


@pytest.fixture(scope="module")
def encoders():
    tok = word_tokenizer(TINY_WORDS, max_length=16)
    torch.manual_seed(2)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=2)).eval()
    return SD3TextEncoders(_clip(8, 16, tok, 0), tok, _clip(8, 16, tok, 1), tok, t5, tok, max_sequence_length=16)


def test_sd3_conditioning_layout(encoders):
    """prompt_embeds = [pad(CLIP-L ++ CLIP-G, to T5 width) ; T5] along the sequence; pooled = CLIP-L ++ CLIP-G."""
    prompts = ["a red circle", "two blue squares above a green triangle"]
    embeds, pooled = encoders.encode(prompts)
    assert embeds.shape == (2, 16 + 16, 32) and pooled.shape == (2, 32)
    ids = encoders._pipe.tokenizer(prompts, padding="max_length", max_length=16, truncation=True,
                                   return_tensors="pt").input_ids
    with torch.no_grad():
        out_l = encoders.text_encoder(ids, output_hidden_states=True)
        out_g = encoders.text_encoder_2(ids, output_hidden_states=True)
        t5 = encoders.text_encoder_3(ids)[0]
    torch.testing.assert_close(pooled, torch.cat([out_l.text_embeds, out_g.text_embeds], -1))
    clip = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], -1)  # SD3 uses the penultimate layer
    torch.testing.assert_close(embeds[:, :16, :16], clip)
    assert embeds[:, :16, 16:].abs().max() == 0
    torch.testing.assert_close(embeds[:, 16:], t5)


def test_sd3_encoders_drive_a_transformer(encoders):
    from policies.flow import FlowPolicy
    from policies.testing import tiny_vae

    policy = FlowPolicy(tiny_transformer(joint_dim=32, pooled_dim=32), tiny_vae(), encoders)
    traj = policy.sample(["a red circle"], num_steps=2)
    assert torch.isfinite(traj.z_tau).all()
    with pytest.raises(TypeError, match="list of strings"):
        encoders.encode("a red circle")


def test_without_t5_the_t5_stream_is_zeros_of_the_transformers_width():
    # from_pretrained(load_t5=False): diffusers pads with zeros of transformer.config.joint_attention_dim
    tok = word_tokenizer(TINY_WORDS, max_length=16)
    enc = SD3TextEncoders(_clip(8, 16, tok, 0), tok, _clip(8, 16, tok, 1), tok, max_sequence_length=16,
                          joint_attention_dim=32)
    embeds, pooled = enc.encode(["a red circle"])
    assert embeds.shape == (1, 16 + 16, 32) and pooled.shape == (1, 32)
    assert embeds[:, 16:].abs().max() == 0  # the T5 stream
    assert embeds[:, :16, :16].abs().max() > 0  # CLIP-L ++ CLIP-G
    from policies.flow import FlowPolicy
    from policies.testing import tiny_vae

    policy = FlowPolicy(tiny_transformer(joint_dim=32, pooled_dim=32), tiny_vae(), enc)
    assert torch.isfinite(policy.sample(["a red circle"], num_steps=2).z_tau).all()
