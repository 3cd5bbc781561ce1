"""``IPAttnProcessor`` built on its own (exported API): real weights on the default device, a usable layer."""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention

from patchdpo_fast.models import IPAttnProcessor


def test_processor_built_alone_has_real_weights_and_runs():
    torch.manual_seed(0)
    hidden, cross, tokens = 32, 24, 4
    proc = IPAttnProcessor(hidden, cross, num_tokens=tokens, backend="eager")
    for name, param in proc.named_parameters():
        assert param.device == torch.empty(0).device and not param.is_meta, name
    assert torch.equal(proc.ref_k_ip.weight, proc.to_k_ip.weight)
    assert torch.equal(proc.ref_v_ip.weight, proc.to_v_ip.weight)
    init = torch.randn(hidden, cross)
    copied = IPAttnProcessor(hidden, cross, num_tokens=tokens, init_k=init, init_v=init)
    assert torch.equal(copied.to_k_ip.weight, init) and torch.equal(copied.ref_k_ip.weight, init)

    attn = Attention(query_dim=hidden, cross_attention_dim=cross, heads=2, dim_head=16)
    attn.set_processor(proc)
    x = torch.randn(2, 5, hidden)
    context = torch.randn(2, 7 + tokens, cross)
    out = attn(x, encoder_hidden_states=context)
    ref = attn(x, encoder_hidden_states=context, use_reference=True)
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().max() < 100
    torch.testing.assert_close(out, ref)  # the reference copy equals the policy at construction

    # the image branch by hand: text attention + scale * attention over to_k_ip/to_v_ip of the IP tokens
    def heads(t):
        return t.view(2, -1, 2, 16).transpose(1, 2)

    q = heads(attn.to_q(x))
    text, ip = context[:, :7], context[:, 7:]
    a = torch.softmax(q @ heads(attn.to_k(text)).transpose(-1, -2) / 4, -1) @ heads(attn.to_v(text))
    b = torch.softmax(q @ heads(proc.to_k_ip(ip)).transpose(-1, -2) / 4, -1) @ heads(proc.to_v_ip(ip))
    want = attn.to_out[0]((a + proc.scale * b).transpose(1, 2).reshape(2, 5, hidden))
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
