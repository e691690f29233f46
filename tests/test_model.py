"""The looped transformer against independent references: an unrolled copy, per-call loops, causality, FLOPs."""

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import tiny_model
from looped import LoopedConfig, LoopedTransformer
from looped.errors import InputError


def make(**overrides) -> LoopedTransformer:
    return tiny_model(**{**dict(max_seq_len=24, d_model=32, n_heads=4, d_ff=64, block_layers=2, loops=3), **overrides})


def tokens(model: LoopedTransformer, batch: int = 3, length: int = 24) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))


def unrolled_copy(looped: LoopedTransformer) -> LoopedTransformer:
    """The ``(kL⊗1)`` model whose L blocks hold copies of the looped model's one block."""
    c = looped.config
    deep_config = dataclasses.replace(c, block_layers=c.block_layers * c.loops, loops=1)
    deep = LoopedTransformer(deep_config).eval()
    state = {}
    for name, value in looped.state_dict().items():
        if name.startswith("block."):
            index, rest = name.split(".", 2)[1:]
            for n in range(c.loops):
                state[f"block.{int(index) + n * c.block_layers}.{rest}"] = value
        else:
            state[name] = value
    deep.load_state_dict(state)
    return deep


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"prelude_layers": 1, "coda_layers": 1},  # middle looping
        {"pos_encoding": "learned", "norm": "rmsnorm", "activation": "swiglu", "tie_embeddings": True},
    ],
    ids=["plain", "middle", "learned-rms-swiglu-tied"],
)
def test_looped_equals_unrolled_copies(overrides):
    looped = make(**overrides)
    deep = unrolled_copy(looped)
    x = tokens(looped)
    assert looped.num_parameters() < deep.num_parameters()
    torch.testing.assert_close(looped(x), deep(x), atol=1e-5, rtol=0)


def test_loop_states_match_separate_forwards():
    model = make(prelude_layers=1, coda_layers=1, input_injection="add")
    x = tokens(model)
    logits, states = model(x, loops=5, return_loop_states=True)
    assert len(states) == 5
    torch.testing.assert_close(logits, model(x, loops=5), atol=1e-6, rtol=0)
    for n, state in enumerate(states, start=1):
        # Each loop's readout equals a separate forward run with that many loops (fewer and more than trained).
        torch.testing.assert_close(model.readout(state), model(x, loops=n), atol=1e-5, rtol=0)
    assert model(x).shape == (3, 24, 11)
    torch.testing.assert_close(model(x), model(x, loops=3))
    # One pass read out at loop 3 and run on to 5 for its states: loop 3's logits, every state unchanged.
    early, deeper = model(x, loops=5, return_loop_states=True, readout_after=3)
    torch.testing.assert_close(early, model(x, loops=3), atol=1e-5, rtol=0)
    for state, again in zip(deeper, states, strict=True):
        torch.testing.assert_close(state, again, atol=0, rtol=0)
    with pytest.raises(ValueError, match="readout_after=6 needs"):
        model(x, loops=5, return_loop_states=True, readout_after=6)
    # The same pass keeping only some positions of each state: those positions, the same logits.
    keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) < 0.3
    picked_logits, picked = model(x, loops=5, return_loop_states=True, readout_after=3, state_positions=keep)
    torch.testing.assert_close(picked_logits, early, atol=0, rtol=0)
    for state, full in zip(picked, states, strict=True):
        torch.testing.assert_close(state, full[keep], atol=0, rtol=0)
    with pytest.raises(ValueError, match="state_positions picks"):
        model(x, loops=5, state_positions=keep)


def test_readout_at_positions_selects_rows():
    model = make()
    x = tokens(model)
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[:, -1] = True
    mask[0, 3] = True
    full = model(x)
    torch.testing.assert_close(model.readout(model(x, return_loop_states=True)[1][-1], positions=mask), full[mask])


@pytest.mark.parametrize("pos_encoding", ["rope", "learned"])
@pytest.mark.parametrize("prelude,coda", [(0, 0), (1, 1)])
def test_causal(pos_encoding, prelude, coda):
    model = make(pos_encoding=pos_encoding, prelude_layers=prelude, coda_layers=coda)
    x = tokens(model)
    cut = 10
    changed = x.clone()
    changed[:, cut:] = (changed[:, cut:] + 1) % model.config.vocab_size
    before, after = model(x), model(changed)
    torch.testing.assert_close(before[:, :cut], after[:, :cut], atol=1e-6, rtol=0)
    assert not torch.allclose(before[:, cut:], after[:, cut:])


def test_gradients_reach_shared_block_from_every_loop():
    model = make(loops=4).train()
    x = tokens(model)
    model(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.block.parameters())


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_flops_formula_matches_flop_counter(activation):
    model = make(activation=activation, prelude_layers=1, coda_layers=1)
    x = tokens(model, batch=2, length=24)
    counter = FlopCounterMode(display=False)
    # The math backend spells attention as matmuls the counter sees (the fused CPU kernel it does not).
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(x)
    measured = counter.get_total_flops()
    assert model.flops_per_token(24) * x.numel() == pytest.approx(measured, rel=0.01)
    # More loops cost exactly more block applications.
    assert model.flops_per_token(24, loops=6) > model.flops_per_token(24)


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"d_model": 30, "n_heads": 4}, "d_model"),
        ({"block_layers": 0}, "block_layers"),
        ({"loops": 0}, "loops"),
        ({"attention": "bogus"}, "attention"),
        ({"d_model": 12, "n_heads": 4}, "n_heads"),  # odd head width cannot rotate (RoPE)
    ],
)
def test_bad_config_names_the_field(fields, field):
    """The message names the key as a recipe sets it, and it is an InputError (one line on the command line)."""
    base = dict(vocab_size=11, max_seq_len=16)
    with pytest.raises(InputError, match=rf"^model\.init_args\.config\.{field}: "):
        LoopedConfig(**{**base, **fields})


def test_too_long_input_names_max_seq_len():
    model = make(max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_unset_vocab_names_the_link():
    with pytest.raises(ValueError, match="vocab_size is not set"):
        LoopedTransformer(LoopedConfig(max_seq_len=8))
