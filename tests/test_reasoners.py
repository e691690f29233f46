"""The recursive reasoners' model pieces against independent references: non-causal attention, TRM's MLP over
positions, and TRM's and HRM's supervision steps unrolled by hand (``looped/model/recursion.py``)."""

import pytest
import torch
import torch.nn.functional as F

from looped import LoopedConfig, LoopedTransformer
from looped.errors import InputError
from looped.model.mixers import PositionMLP

T = 12


def make(**overrides) -> LoopedTransformer:
    torch.manual_seed(0)
    base = dict(vocab_size=7, max_seq_len=T, d_model=16, n_heads=2, d_ff=32, block_layers=2)
    return LoopedTransformer(LoopedConfig(**{**base, **overrides})).eval()


def tokens(batch: int = 3) -> torch.Tensor:
    return torch.randint(0, 7, (batch, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("causal", [True, False])
def test_non_causal_attention_sees_later_tokens(causal):
    model = make(causal=causal, loops=2)
    ids = tokens()
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 7
    with torch.no_grad():
        before, after = model(ids), model(changed)
    earlier_moved = not torch.allclose(before[:, :-1], after[:, :-1])
    assert earlier_moved == (not causal)
    assert not torch.allclose(before[:, -1], after[:, -1])  # the changed position itself always moves


def test_non_causal_model_refuses_to_decode():
    model = make(causal=False)
    with pytest.raises(ValueError, match="non-causal .*cannot decode"):
        model.generate(tokens()[:, :4], max_new_tokens=2)


def test_position_mlp_matches_a_per_channel_reference():
    torch.manual_seed(0)
    mlp = PositionMLP(d_model=5, n_heads=1, seq_len=T, causal=False, expansion=2.0, multiple_of=8)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, T, 5)
    expected = torch.empty_like(x)
    w1, w3, w2 = mlp.w1.weight, mlp.w3.weight, mlp.w2.weight
    for b in range(2):  # every channel's column of T values through the same T -> f -> T SwiGLU, one at a time
        for c in range(5):
            column = x[b, :, c]
            hidden = [F.silu((w1[j] * column).sum()) * (w3[j] * column).sum() for j in range(w1.shape[0])]
            expected[b, :, c] = torch.stack([(w2[i] * torch.stack(hidden)).sum() for i in range(T)])
    assert mlp.w1.out_features == 16  # round(2 · 12 · 2/3) = 16, a multiple of 8
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-5)


def test_mlp_mixer_in_a_model_is_non_causal_and_counted():
    model = make(attention="mlp", causal=False)
    ids = tokens()
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 7
    with torch.no_grad():
        assert not torch.allclose(model(ids)[:, 0], model(changed)[:, 0])
    c, f = model.config, model.block[0].attn.w1.out_features
    per_layer = 6 * f * c.d_model + 4 * c.d_model * c.d_ff  # mixer: 6·f per channel; gelu FFN: 4·d·d_ff
    assert model.flops_per_token(T) == 2 * per_layer + 2 * c.d_model * c.vocab_size


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(causal=False, attention="linear"), "causal"),
        (dict(attention="mlp"), "causal"),
        (dict(recursion="hrm"), "high_layers"),
        (dict(recursion="trm", high_layers=2), "high_layers"),
        (dict(recursion="trm", lora_rank=2), "lora_rank"),
        (dict(recursion="trm", loops=3), "loops"),
        (dict(recursion="trm", latent_steps=0), "latent_steps"),
    ],
)
def test_bad_settings_name_the_key(overrides, field):
    with pytest.raises(InputError, match=rf"^model\.init_args\.config\.{field}: "):
        LoopedConfig(vocab_size=7, max_seq_len=T, d_model=16, n_heads=2, **overrides)


def net(layers, h, rope):
    """The block by hand: each layer in turn (post-norm here, as TRM's and HRM's blocks)."""
    for layer in layers:
        h = layer(h, rope)
    return h


def trm_reference(model, ids, y, z, n, t):
    x = model.embed(ids)
    with torch.no_grad():
        for _ in range(t - 1):
            for _ in range(n):
                z = net(model.block, z + y + x, model.rope)
            y = net(model.block, y + z, model.rope)
    for _ in range(n):
        z = net(model.block, z + y + x, model.rope)
    y = net(model.block, y + z, model.rope)
    return y, z


def hrm_reference(model, ids, high, low, n, t):
    x = model.embed(ids)
    updates = [("L", None)] * n + [("H", None)]
    schedule = [kind for kind, _ in updates] * t
    for i, kind in enumerate(schedule):
        grad = i >= len(schedule) - 2  # the one-step gradient: the last low and high updates
        with torch.set_grad_enabled(grad):
            if kind == "L":
                low = net(model.block, low + high + x, model.rope)
            else:
                high = net(model.high, high + low, model.rope)
    return high, low


@pytest.mark.parametrize("recursion", ["trm", "hrm"])
def test_supervision_step_equals_the_unrolled_recursion(recursion):
    extra = dict(high_layers=1) if recursion == "hrm" else {}
    model = make(recursion=recursion, causal=False, norm_placement="post", norm="rmsnorm", q_head=True, **extra)
    model.train()  # gradients, no dropout (0)
    n, t = model.config.latent_steps, model.config.answer_steps
    ids = tokens()
    start = (torch.randn(2, 3, T, 16) * 0.5).requires_grad_()  # a carried state, as a leaf
    logits, q, state = model.reason(ids, start)
    reference = (trm_reference if recursion == "trm" else hrm_reference)(model, ids, start[0], start[1], n, t)
    torch.testing.assert_close(state, torch.stack(reference))
    torch.testing.assert_close(logits, model.head(model.norm(reference[0])))
    assert q.shape == (3, 2) and torch.allclose(q, torch.tensor([-5.0, -5.0]))  # zero weight, bias -5 at the start
    # The carried state enters only through no-grad rounds (T >= 2): no gradient reaches it ...
    logits.sum().backward()
    assert start.grad is None
    # ... and the parameters get the gradient of the last round(s) only, as the reference's.
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.head(model.norm(torch.stack(reference)[0])).sum().backward()
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(grads[name], p.grad, msg=name)


def test_loop_step_from_a_fresh_state_is_the_ordinary_forward():
    model = make(loops=3, input_injection="add")
    ids = tokens()
    logits, q, state = model.reason(ids)
    assert q is None and state.shape == (1, 3, T, 16)
    assert torch.equal(logits, model(ids))


def test_recursion_counts_its_applications():
    trm = make(recursion="trm", causal=False, latent_steps=6, answer_steps=3)
    hrm = make(recursion="hrm", causal=False, high_layers=3, latent_steps=2, answer_steps=2)
    assert trm.config.block_applications() == 3 * 7 * 2  # T · (n + 1) · k
    assert hrm.config.block_applications() == 2 * (2 * 2 + 3)  # T · (n · k + k_H)
    c = trm.config
    per_layer = 8 * c.d_model**2 + 4 * c.d_model * c.d_ff + 4 * T * c.d_model
    assert trm.flops_per_token(T) == 42 * per_layer + 2 * c.d_model * c.vocab_size
    with pytest.raises(ValueError, match="supervision steps, not loops"):
        trm(tokens())
