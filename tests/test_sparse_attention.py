"""Sparse attention mixer against an independent per-(t, s) reference."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_model
from looped.model import LoopedConfig, LoopedTransformer
from looped.model.mixers import SoftmaxAttention, build_mixer
from looped.model.mixers.sparse import SparseAttention, dense_mask


def visible(pattern: str, window: int, stride: int, t: int, s: int) -> bool:
    """The pattern's definition, written out per query/key pair (module docstring)."""
    if s > t:
        return False
    if pattern == "local":
        return t - window < s
    if pattern == "strided":
        return t - s < stride or (t - s) % stride == 0
    if pattern == "fixed":
        return s // stride == t // stride or s % stride == stride - 1
    raise AssertionError(pattern)


def reference_attend(q, k, v, pattern, window, stride):
    """softmax(q kᵀ/√e + mask) v in float64, with the mask built by a Python loop."""
    t, e = q.shape[-2], q.shape[-1]
    bias = torch.full((t, t), -math.inf, dtype=torch.float64)
    for i in range(t):
        for j in range(t):
            if visible(pattern, window, stride, i, j):
                bias[i, j] = 0.0
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(e) + bias
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    return (weights / weights.sum(-1, keepdim=True)) @ v.double()


CASES = [
    ("local", 1, 4, 7),
    ("local", 3, 4, 10),
    ("local", 5, 4, 16),
    ("strided", 4, 1, 9),
    ("strided", 4, 3, 10),
    ("strided", 4, 4, 16),
    ("fixed", 4, 1, 9),
    ("fixed", 4, 3, 11),
    ("fixed", 4, 4, 16),
    ("fixed", 4, 5, 13),
]


@pytest.mark.parametrize("pattern,window,stride,t", CASES)
def test_attend_matches_reference_forward_and_grad(pattern, window, stride, t):
    torch.manual_seed(0)
    mixer = SparseAttention(d_model=16, n_heads=2, pattern=pattern, window=window, stride=stride).double()
    q, k, v = (torch.randn(2, 2, t, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(2, 2, t, 8, dtype=torch.float64)

    out = mixer.attend(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref = reference_attend(q, k, v, pattern, window, stride)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)

    torch.testing.assert_close(out, ref)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)


@pytest.mark.parametrize("pattern", ["local", "strided", "fixed"])
@pytest.mark.parametrize("size", [1, 2, 5])
def test_mask_is_causal_with_diagonal(pattern, size):
    mask = dense_mask(pattern, size, size, 12, torch.device("cpu"))
    assert mask.dtype == torch.bool
    assert mask.diagonal().all()
    assert not mask.triu(1).any()
    expected = torch.tensor([[visible(pattern, size, size, i, j) for j in range(12)] for i in range(12)])
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("window", [12, 64])
def test_wide_local_window_equals_dense_softmax(window):
    torch.manual_seed(0)
    sparse = build_mixer("sparse", 32, 4, 0.0, False, pattern="local", window=window)
    dense = SoftmaxAttention(d_model=32, n_heads=4)
    dense.load_state_dict(sparse.state_dict())
    x = torch.randn(2, 12, 32)
    torch.testing.assert_close(sparse(x), dense(x), rtol=0, atol=0)


@pytest.mark.parametrize("attention", ["sparse", ["sparse", "softmax"]])
def test_looped_model_is_causal(attention):
    options = {"sparse": {"pattern": "strided", "stride": 4}}
    model = tiny_model(block_layers=2, loops=3, attention=attention, mixer_options=options)
    ids = torch.randint(0, 11, (2, 14))
    with torch.no_grad():
        base = model(ids)
        for cut in (0, 5, 13):
            changed = ids.clone()
            changed[:, cut] = (changed[:, cut] + 1) % 11
            logits = model(changed)
            torch.testing.assert_close(logits[:, :cut], base[:, :cut], rtol=0, atol=0)
            assert not torch.allclose(logits[:, cut], base[:, cut])


@pytest.mark.parametrize(
    "options,field",
    [
        ({"pattern": "bogus"}, "mixer_options.sparse.pattern"),
        ({"window": 0}, "mixer_options.sparse.window"),
        ({"stride": -1}, "mixer_options.sparse.stride"),
        ({"widow": 3}, "mixer_options.sparse"),
    ],
)
def test_bad_options_raise(options, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        config = LoopedConfig(
            vocab_size=5, max_seq_len=8, d_model=16, n_heads=2, attention="sparse", mixer_options={"sparse": options}
        )
        LoopedTransformer(config)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention path needs a CUDA GPU")
@pytest.mark.parametrize("pattern", ["local", "strided", "fixed"])
def test_flex_attention_matches_masked_sdpa(pattern):
    torch.manual_seed(0)
    t = 300  # not a multiple of the 128-wide FlexAttention tile nor of the stride
    mixer = SparseAttention(d_model=128, n_heads=2, pattern=pattern, window=37, stride=24).cuda()
    q, k, v = (torch.randn(2, 2, t, 64, device="cuda", requires_grad=True) for _ in range(3))
    grad_out = torch.randn(2, 2, t, 64, device="cuda")

    out = mixer.attend(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    mask = dense_mask(pattern, 37, 24, t, q.device)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)

    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=2e-3, atol=2e-3)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("pattern", ["local", "strided", "fixed"])
def test_block_mask_forward_on_cpu_matches_masked_sdpa(pattern):
    """The same mask_mod survives FlexAttention's vmap/block-mask machinery (forward only: no CPU backward)."""
    from torch.nn.attention.flex_attention import flex_attention

    from looped.model.mixers.sparse import block_mask

    torch.manual_seed(0)
    t = 300  # spans three 128-wide tiles, the last one partial
    q, k, v = (torch.randn(1, 2, t, 16) for _ in range(3))
    out = flex_attention(q, k, v, block_mask=block_mask(pattern, 37, 24, t, torch.device("cpu")))
    mask = dense_mask(pattern, 37, 24, t, torch.device("cpu"))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
