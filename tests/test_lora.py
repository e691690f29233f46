"""Per-loop LoRA (``looped/model/lora.py``): at full rank, initialised from (original − shared), the relaxed
``(k⊗L)`` computes the source model; fresh, it is the plain looped model; loops beyond L repeat loop L's block;
ranks are clipped to each weight's full rank."""

from dataclasses import replace

import pytest
import torch

from looped.convert.recursive import Shape, recursive_init, relax
from looped.model import LoopedConfig, LoopedTransformer

VOCAB = 37


def source(n: int = 6):
    """A random plain ``(n⊗1)`` with every kind of block vector (norm scales, q/k norms, q/k/v biases) and GQA."""
    torch.manual_seed(0)
    config = LoopedConfig(vocab_size=VOCAB, max_seq_len=32, d_model=16, n_heads=4, n_kv_heads=2, d_ff=24,
                          block_layers=n, norm="rmsnorm", activation="swiglu", qk_norm=True, qkv_bias=True)  # fmt: skip
    model = LoopedTransformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    layers = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in model.block]
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith("block.")}
    return config, layers, rest, model


def relaxed(rank: int, shape=(0, 3, 2, 0), init="stepwise"):
    config, layers, rest, original = source()
    rec = recursive_init(config, layers, rest, Shape(*shape), init)
    model = LoopedTransformer(replace(rec.config, lora_rank=rank)).eval()
    missing, unexpected = model.load_state_dict(rec.state, strict=False)
    assert not unexpected and all(k.startswith("lora.") for k in missing)
    return model, rec, layers, original


def test_full_rank_relaxation_is_the_source_model():
    model, rec, layers, original = relaxed(rank=10_000)  # clipped to each weight's full rank
    relax(model, rec, layers)
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        assert (model(ids) - original(ids)).abs().max() <= 1e-4


def test_adapters_tied_to_the_block_are_the_plain_looped_model():
    model, rec, _, _ = relaxed(rank=4)
    model.lora.tie_to(model.block)
    plain = LoopedTransformer(rec.config).eval()
    plain.load_state_dict(rec.state, strict=True)
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(ids), plain(ids))
        assert (model(ids, loops=3) - plain(ids, loops=3)).abs().max() == 0


def test_loops_beyond_l_repeat_loop_l():
    """(3⊗2) relaxed at full rank from layers 0..5: a third loop is layers 3, 4, 5 again."""
    model, rec, layers, _ = relaxed(rank=10_000)
    relax(model, rec, layers)
    order = [0, 1, 2, 3, 4, 5, 3, 4, 5]
    reference = LoopedTransformer(replace(rec.config, block_layers=len(order), loops=1)).eval()
    reference.load_state_dict(
        {
            **{k: v for k, v in rec.state.items() if not k.startswith("block.")},
            **{f"block.{i}.{name}": w for i, s in enumerate(order) for name, w in layers[s].items()},
        }  # fmt: skip
    )
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        assert (model(ids, loops=3) - reference(ids)).abs().max() <= 1e-4


def test_rank_is_clipped_to_each_weights_full_rank():
    model, _, _, _ = relaxed(rank=12)
    ranks = model.lora.ranks()
    # q: 16 -> 16, k/v: 16 -> 8 (2 kv heads of 4), w1/w3: 16 -> 24, w2: 24 -> 16
    assert ranks["block.0.attn.q_proj.weight"] == 12
    assert ranks["block.0.attn.k_proj.weight"] == 8
    assert ranks["block.0.ffn.w2.weight"] == 12


def test_lora_rank_must_not_be_negative():
    from looped.errors import InputError

    with pytest.raises(InputError, match="lora_rank: must be >= 0"):
        LoopedConfig(lora_rank=-1)


def test_the_adapters_train_alone_with_train_only():
    from looped.errors import InputError
    from looped.training.module import LoopedLM

    config = LoopedConfig(vocab_size=VOCAB, max_seq_len=16, d_model=16, n_heads=2, d_ff=32, loops=2, lora_rank=2)
    module = LoopedLM(config=config, train_only=["lora."])
    trained = {id(p) for group in module.parameter_groups() for p in group["params"]}
    assert trained == {id(p) for p in module.model.lora.parameters()}
    ids = torch.randint(0, VOCAB, (2, 8))
    loss = module.compute_loss(module.model(ids), ids)
    loss.backward()
    assert module.model.block[0].attn.q_proj.weight.grad is None
    assert module.model.lora.loops[1][0].a["attn__q_proj__weight"].grad is not None
    with pytest.raises(InputError, match=r"train_only: \['lorra.'\] names no parameter"):
        LoopedLM(config=config, train_only=["lorra."])
    with pytest.raises(InputError, match="activation_checkpointing: cannot recompute a block applied with per-loop"):
        LoopedLM(config=config, activation_checkpointing=True)
