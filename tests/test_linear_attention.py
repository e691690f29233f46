"""Causal linear attention: chunked form == recurrent form == a naive O(t²) reference."""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from looped import LoopedConfig, LoopedTransformer
from looped.model.mixers.linear import LinearAttention

B, H, T, E = 2, 3, 37, 8


def naive(q, k, v, phi, eps):
    """Written from the paper's Eq. 3 without chunks or states: an explicit causal mask, row-normalised."""
    scores = phi(q) @ phi(k).transpose(-1, -2)  # [b h t t]
    t = q.shape[-2]
    mask = torch.tril(torch.ones(t, t, dtype=torch.bool))
    scores = torch.where(mask, scores, torch.zeros_like(scores))
    return (scores @ v) / (scores.sum(-1, keepdim=True) + eps)


def recurrent(mixer, q, k, v):
    """Run ``step`` token by token, as decoding does."""
    state = mixer.init_state(q.shape[0], q.device, q.dtype)
    outs = []
    for i in range(q.shape[-2]):
        out, state = mixer.step(q[:, :, i], k[:, :, i], v[:, :, i], state)
        outs.append(out)
    return torch.stack(outs, dim=-2)


def qkv(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, E, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


def outputs_and_grads(fn, q, k, v, seed=1):
    out = fn(q, k, v)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    return out.detach(), grads


@pytest.mark.parametrize("feature_map", ["elu", "relu"])
@pytest.mark.parametrize("chunk_size", [1, 5, 8, 16, 37, 64])
def test_chunked_equals_recurrent_and_naive_float64(chunk_size, feature_map):
    mixer = LinearAttention(H * E, H, feature_map=feature_map, chunk_size=chunk_size)
    q, k, v = qkv()
    chunked = outputs_and_grads(mixer.attend, q, k, v)
    stepped = outputs_and_grads(lambda *x: recurrent(mixer, *x), q, k, v)
    reference = outputs_and_grads(lambda *x: naive(*x, mixer.phi, mixer.eps), q, k, v)
    for other in (stepped, reference):
        torch.testing.assert_close(chunked[0], other[0], atol=1e-5, rtol=1e-5)
        for a, b in zip(chunked[1], other[1]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_chunked_equals_recurrent_float32():
    mixer = LinearAttention(H * E, H, chunk_size=6)
    q, k, v = qkv(torch.float32)
    chunked = outputs_and_grads(mixer.attend, q, k, v)
    stepped = outputs_and_grads(lambda *x: recurrent(mixer, *x), q, k, v)
    torch.testing.assert_close(chunked[0], stepped[0], atol=1e-4, rtol=1e-4)
    for a, b in zip(chunked[1], stepped[1]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_naive_reference_is_itself_right_at_one_position():
    """The reference's last row, summed by hand from the formula in the paper."""
    phi = lambda x: F.elu(x) + 1  # noqa: E731
    q, k, v = (x.detach() for x in qkv())
    s = sum(torch.einsum("bhe,bhf->bhef", phi(k[:, :, i]), v[:, :, i]) for i in range(T))
    z = sum(phi(k[:, :, i]) for i in range(T))
    last = torch.einsum("bhe,bhef->bhf", phi(q[:, :, -1]), s) / (
        torch.einsum("bhe,bhe->bh", phi(q[:, :, -1]), z)[..., None] + 1e-6
    )
    torch.testing.assert_close(naive(q, k, v, phi, 1e-6)[:, :, -1], last)


def test_bf16_autocast_computes_in_float32():
    mixer = LinearAttention(H * E, H, chunk_size=8)
    q, k, v = (x.detach().float() for x in qkv())
    exact = naive(q.double(), k.double(), v.double(), mixer.phi, mixer.eps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mixer.attend(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    # Only the bf16 rounding of the inputs and the output remains.
    torch.testing.assert_close(out.double(), exact, atol=0.1, rtol=0.05)


def model(attention, **kw):
    return tiny_model(
        **{**dict(vocab_size=50, max_seq_len=32, d_model=32, n_heads=4, d_ff=64), **kw}, attention=attention
    )


@pytest.mark.parametrize(
    "attention, kw",
    [
        ("linear", dict(mixer_options={"linear": {"chunk_size": 5}})),
        (["linear", "softmax"], dict(block_layers=2, loops=3, mixer_options={"linear": {"chunk_size": 4}})),
    ],
)
def test_future_tokens_never_change_the_past(attention, kw):
    net = model(attention, **kw)
    ids = torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = net(ids)
        for cut in (1, 7, 12, 23):
            changed = ids.clone()
            changed[:, cut:] = (changed[:, cut:] + 1) % 50
            out = net(changed)
            torch.testing.assert_close(out[:, :cut], base[:, :cut], atol=1e-5, rtol=1e-5)
            assert not torch.allclose(out[:, cut:], base[:, cut:])


def test_model_trains_a_step_through_linear_attention():
    net = model("linear").train()
    ids = torch.randint(0, 50, (2, 16))
    loss = F.cross_entropy(net(ids).flatten(0, 1), ids.flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_bad_feature_map_names_the_option():
    with pytest.raises(ValueError, match=r"mixer_options\.linear\.feature_map.*bogus"):
        LoopedTransformer(
            LoopedConfig(
                vocab_size=50, max_seq_len=16, attention="linear", mixer_options={"linear": {"feature_map": "bogus"}}
            )
        )


def test_unknown_option_names_the_mixer():
    with pytest.raises(ValueError, match=r"mixer_options\.linear.*window"):
        LoopedTransformer(
            LoopedConfig(vocab_size=50, max_seq_len=16, attention="linear", mixer_options={"linear": {"window": 3}})
        )
