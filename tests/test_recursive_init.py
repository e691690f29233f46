"""Recursive initialisations (``looped.convert.recursive``): which source layers the block starts from, average as
the mean, angular distance finding a span planted in a model, a shape too large for the source."""

import pytest
import torch

from looped.errors import InputError

VOCAB = 61


def source_layers(n: int = 6):
    """A random ``(n⊗1)`` in our own form: its config, per-layer weights and the rest."""
    from looped.model import LoopedConfig, LoopedTransformer

    torch.manual_seed(0)
    config = LoopedConfig(vocab_size=VOCAB, max_seq_len=32, d_model=16, n_heads=2, d_ff=32, block_layers=n,
                          norm="rmsnorm", activation="swiglu")  # fmt: skip
    model = LoopedTransformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    layers = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in model.block]
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith("block.")}
    return config, layers, rest, model


@pytest.mark.parametrize(
    "n, shape, init, expected",
    [
        (6, (0, 3, 2, 0), "stepwise", [[0], [2], [5]]),  # int(linspace(0, 5, 3))
        (18, (0, 9, 2, 0), "stepwise", [[0], [2], [4], [6], [8], [10], [12], [14], [17]]),
        (8, (1, 2, 3, 1), "stepwise", [[1], [6]]),  # the middle is layers 1..6
        (8, (1, 2, 3, 1), "lower", [[1], [2]]),
        (8, (1, 2, 3, 1), "upper", [[5], [6]]),
        (6, (0, 2, 3, 0), "average", [[0, 2, 4], [1, 3, 5]]),  # application n·k + j replaces layer n·k + j
        (8, (1, 1, 2, 1), "average", [[1, 6]]),  # 2 applications spread over the middle 1..6, the rest dropped
    ],
)
def test_recursive_inits_take_the_documented_layers(n, shape, init, expected):
    from looped.convert.recursive import Shape, recursive_init

    config, layers, rest, _ = source_layers(n)
    out = recursive_init(config, layers, rest, Shape(*shape), init)
    assert out.block_from == expected
    p, c = shape[0], shape[3]
    for j, sources in enumerate(expected):
        for name in layers[0]:
            mean = sum(layers[s][name] for s in sources) / len(sources)  # average is the mean; one source: a copy
            torch.testing.assert_close(out.state[f"block.{j}.{name}"], mean)
    for i in range(p):
        assert torch.equal(out.state[f"prelude.{i}.attn.q_proj.weight"], layers[i]["attn.q_proj.weight"])
    for i in range(c):
        assert torch.equal(out.state[f"coda.{i}.ffn.w2.weight"], layers[n - c + i]["ffn.w2.weight"])
    from looped.model import LoopedTransformer

    LoopedTransformer(out.config).load_state_dict(out.state, strict=True)  # a complete (p, k⊗L, c) model


def test_random_init_keeps_prelude_and_coda_and_draws_the_block():
    from looped.convert.recursive import Shape, recursive_init

    config, layers, rest, _ = source_layers(6)
    out = recursive_init(config, layers, rest, Shape(1, 2, 2, 1), "random")
    assert torch.equal(out.state["prelude.0.ffn.w1.weight"], layers[0]["ffn.w1.weight"])
    block = out.state["block.0.ffn.w1.weight"]
    assert not any(torch.equal(block, layer["ffn.w1.weight"]) for layer in layers)
    assert abs(block.std().item() - config.init_std) < 0.005


def test_angular_distance_finds_a_planted_span():
    """Layers 2 and 3 of six are made identities (zero output projections): that span changes nothing."""
    from looped.convert.recursive import Shape, angular_distances, recursive_init

    config, layers, rest, model = source_layers(6)
    with torch.no_grad():
        for i in (2, 3):
            model.block[i].attn.o_proj.weight.zero_()
            model.block[i].ffn.w2.weight.zero_()
    layers = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in model.block]
    distances = angular_distances(model.eval(), torch.randint(0, VOCAB, (2, 24)), span=2, first=0, last=5)
    assert sorted(distances) == [0, 1, 2, 3, 4]
    assert distances[2] < 1e-3 < min(d for s, d in distances.items() if s != 2)
    out = recursive_init(config, layers, rest, Shape(0, 2, 3, 0), "angular", distances)
    assert out.block_from == [[2], [3]]


def test_a_shape_larger_than_the_source_is_one_line():
    from looped.convert.recursive import Shape

    with pytest.raises(InputError, match=r"p \+ k·L \+ c = 1 \+ 2·3 \+ 1 = 8 exceeds the source's 6 layers"):
        Shape(1, 2, 3, 1).check(6)
