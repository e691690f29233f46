"""``LoopedForCausalLM`` as ``transformers``' own model tests see it (issue 36): missing weights, export and
compile with a mask, assisted and prompt-lookup decoding, ``inputs_embeds``, attentions, checkpointing.

References are independent of the part under test: our forward on token ids, ``generate`` without the
feature (plain greedy search), a cache recomputed from scratch, a freshly built model's initial values.
"""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file, save_file  # noqa: E402

from looped.hf import LoopedForCausalLM, LoopedHFConfig  # noqa: E402

TINY = dict(vocab_size=99, max_seq_len=48, d_model=32, n_heads=4, d_ff=64, block_layers=2, loops=2)


def model(seed: int = 0, **fields) -> LoopedForCausalLM:
    """The tiny model transformers' mixins test: d 32, a 2-layer block looped twice, vocab 99."""
    torch.manual_seed(seed)
    return LoopedForCausalLM(LoopedHFConfig(**{**TINY, **fields})).eval()


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 99, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tie", [False, True])
def test_missing_weights_are_reported_and_initialised(tmp_path, tie):
    """Defects 1 and 2: a norm (1-D) or the tied embedding missing from the file is reported and gets its
    initial value, not uninitialised memory or the meta device."""
    fresh = model(tie_embeddings=tie)
    fresh.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = {"model.norm.weight", "model.block.1.ffn_norm.weight", "model.embed.weight"}
    save_file({k: v for k, v in weights.items() if k not in dropped}, tmp_path / "model.safetensors")
    loaded, info = LoopedForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert dropped <= set(info["missing_keys"])
    for name, p in loaded.named_parameters():
        assert p.device.type == "cpu", name
        if name in dropped and name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name not in dropped:  # what the file holds is kept (a tied head is the embedding: not listed)
            assert torch.equal(p, fresh.state_dict()[name]), name
    embed = loaded.model.embed.weight
    assert 0.5 * TINY_STD < embed.std() < 2 * TINY_STD  # drawn again at init_std
    assert (loaded.model.head.weight is embed) == tie
    with torch.no_grad():
        assert torch.isfinite(loaded(ids(2, 5)).logits).all()


TINY_STD = LoopedHFConfig(**TINY).init_std


def test_an_empty_state_dict_initialises_every_weight():
    """``from_pretrained(None, config=..., state_dict={})`` (transformers' ``test_can_init_all_missing_weights``)."""
    for tie in (False, True):
        config = LoopedHFConfig(**TINY, tie_embeddings=tie)
        loaded = LoopedForCausalLM.from_pretrained(None, config=config, state_dict={})
        fresh = model(tie_embeddings=tie)
        for (name, p), (_, want) in zip(loaded.named_parameters(), fresh.named_parameters(), strict=True):
            assert p.device.type == "cpu" and torch.isfinite(p).all(), name
            if p.dim() < 2:
                assert torch.equal(p, want), name  # norms at 1, biases at 0: as a model built fresh
            else:
                assert 0.5 < p.std() / want.std() < 2, name  # the same distribution (residual outputs scaled)
        with torch.no_grad():
            assert torch.isfinite(loaded(ids(2, 5)).logits).all()
