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


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    x, mask = ids(2, 6), torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    return x, mask


def test_export_and_fullgraph_compile_with_an_attention_mask():
    """Defect 3: no data-dependent branch on the mask's values (a traced graph takes the padded path)."""
    hf = model()
    x, mask = padded_batch()
    with torch.no_grad():
        want = hf(x, attention_mask=mask).logits
        program = torch.export.export(hf, (), dict(input_ids=x, attention_mask=mask))
        torch.testing.assert_close(program.module()(input_ids=x, attention_mask=mask)["logits"], want)
        ones = torch.ones_like(mask)  # all ones, as generate() passes: the same graph, exact too
        torch.testing.assert_close(program.module()(input_ids=x, attention_mask=ones)["logits"], hf(x).logits)
        compiled = torch.compile(hf, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x, attention_mask=mask).logits, want)


def test_export_of_a_greedy_decode_step_and_of_generate():
    """Defect 3: ``transformers``' exporter walks the cache's tensors; a slot no longer points back at its cache."""
    import copy

    from transformers.exporters import DynamoConfig, DynamoExporter

    hf = model()
    x, mask = padded_batch()
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    with torch.no_grad():
        prefill = hf(x, attention_mask=mask, use_cache=True)
        token = prefill.logits[:, -1].argmax(-1, keepdim=True)
        want = hf(token, attention_mask=step_mask, cache=copy.deepcopy(prefill.cache)).logits
    assert all(not hasattr(slot, "owner") for slot in prefill.cache.decode.layers)
    exporter = DynamoExporter()
    inputs = dict(input_ids=token, attention_mask=step_mask, cache=copy.deepcopy(prefill.cache))
    program, _ = exporter.export_program(hf, inputs, DynamoConfig())
    got = program.module()(input_ids=token, attention_mask=step_mask, cache=copy.deepcopy(prefill.cache))
    torch.testing.assert_close(got["logits"], want)
    exported = exporter.export_for_generation(hf, dict(input_ids=x, attention_mask=mask), DynamoConfig())
    assert set(exported.components) == {"prefill", "decode"}


def test_crop_equals_a_recomputed_cache():
    """Defect 4: dropping the last positions of every slot, then reading them again, is the full forward."""
    hf = model(prelude_layers=1, coda_layers=1)
    x = ids(2, 10)
    with torch.no_grad():
        out = hf(x, use_cache=True)
        assert out.cache.is_croppable
        out.cache.crop(-4)
        assert out.cache.get_seq_length() == 6
        again = hf(x[:, 6:], cache=out.cache).logits
        torch.testing.assert_close(again, hf(x).logits[:, 6:], atol=1e-5, rtol=0)
        fresh = hf(x, use_cache=True).cache
    for got, want in zip(out.cache.decode.layers, fresh.decode.layers, strict=True):
        torch.testing.assert_close(got._keys[:, :, :10], want._keys[:, :, :10], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"crop\(-3\)"):
        out.cache.crop(3)


def test_crop_of_a_recurrent_slot_is_a_clear_refusal():
    hf = model(attention="linear")
    with torch.no_grad():
        cache = hf(ids(1, 5), use_cache=True).cache
    assert not cache.is_croppable
    with pytest.raises(ValueError, match="running sum") as err:
        cache.crop(-1)
    assert "\n" not in str(err.value)


def test_assisted_and_prompt_lookup_decoding_give_greedy_search_tokens():
    """Defect 4 and self-speculation through transformers: a cache by default, cropped after each verification."""
    hf = model(init_std=0.05)  # small weights: the draft often agrees, so both acceptance and rejection happen
    x = ids(1, 6)
    kwargs = dict(max_new_tokens=20, do_sample=False)
    want = hf.generate(x, **kwargs)
    out = hf.generate(x, return_dict_in_generate=True, **kwargs)
    assert torch.equal(out.sequences, want) and type(out.cache).__name__ == "LoopedCache"  # made by default
    assert torch.equal(hf.generate(x, prompt_lookup_num_tokens=3, **kwargs), want)
    assert torch.equal(hf.generate(x, assistant_model=hf.draft_model(1), **kwargs), want)
    assert torch.equal(hf.generate(x, assistant_model=model(seed=5), **kwargs), want)  # another model entirely
    assert torch.equal(hf.model.generate(x, 20, draft_loops=1), want)  # ours, the draft sharing the cache
    draft = hf.draft_model(1)
    assert draft.model is hf.model and draft.config.loops == 1 and hf.config.loops == 2
    with pytest.raises(ValueError, match=r"pick 1\.\.1"):
        hf.draft_model(2)


def test_output_attentions_is_refused_in_one_line():
    """Defect 5: the flag used to return None silently."""
    hf = model()
    with pytest.raises(ValueError, match="forms no attention weights") as err:
        hf(ids(1, 4), output_attentions=True)
    assert "\n" not in str(err.value)
    assert hf(ids(1, 4), output_attentions=False).logits.shape == (1, 4, 99)


def test_gradient_checkpointing_recomputes_each_layer_application_with_the_same_gradients():
    """Defect 5: ``gradient_checkpointing_enable`` works, recomputing every layer application in backward."""
    x = ids(2, 8)
    grads = []
    for checkpointing in (False, True):
        hf = model(prelude_layers=1, coda_layers=1).train()
        if checkpointing:
            hf.gradient_checkpointing_enable()
        calls = []
        hf.model.block[0].attn.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        hf(x, labels=x).loss.backward()
        grads.append({n: p.grad for n, p in hf.named_parameters()})
        assert len(calls) == TINY["loops"] * (2 if checkpointing else 1)  # recomputed once per loop in backward
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, atol=1e-6, rtol=1e-5, msg=name)


def test_inputs_embeds_stand_for_token_embeddings_in_forward_and_generate():
    """Defect 5: soft prompts, multimodal front ends, continuous thoughts pass vectors, not ids."""
    hf = model(pos_encoding="learned")
    x = ids(2, 6)
    with torch.no_grad():
        embeds = hf.get_input_embeddings()(x)
        torch.testing.assert_close(hf(inputs_embeds=embeds).logits, hf(x).logits)
        soft = torch.randn(2, 3, TINY["d_model"], generator=torch.Generator().manual_seed(0))  # a soft prompt
        whole = hf(inputs_embeds=torch.cat([soft, embeds], dim=1)).logits
        cached = hf(inputs_embeds=soft, use_cache=True)
        torch.testing.assert_close(hf(x, cache=cached.cache).logits, whole[:, 3:], atol=1e-5, rtol=0)
    kwargs = dict(max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(hf.generate(inputs_embeds=embeds, **kwargs), hf.generate(x, **kwargs)[:, 6:])
    with pytest.raises(ValueError, match="one of them"):
        hf(x, inputs_embeds=embeds)


def test_config_counts_hidden_layers_as_layer_applications():
    """Defect 5: ``num_hidden_layers``, p + k·L + c: one decode-cache slot each."""
    config = LoopedHFConfig(**{**TINY, "prelude_layers": 1, "coda_layers": 1})
    assert config.num_hidden_layers == 1 + 2 * 2 + 1
    hf = LoopedForCausalLM(config).eval()
    with torch.no_grad():
        assert len(hf(ids(1, 3), use_cache=True).cache.decode.layers) == config.num_hidden_layers


def test_hidden_states_start_with_the_embeddings_then_one_per_loop():
    """Defect 6: ``hidden_states[0]`` is the embeddings (transformers' index 0), ``hidden_states[n]`` the state
    after loop n, so ``readout(hidden_states[-1])`` is the logits."""
    hf = model(pos_encoding="learned")
    x = ids(2, 5)
    with torch.no_grad():
        out = hf(x, output_hidden_states=True, num_loops=3)
        assert len(out.hidden_states) == 3 + 1
        embeddings = hf.model.embed(x) + hf.model.pos_embed.weight[:5]
        torch.testing.assert_close(out.hidden_states[0], embeddings)
        torch.testing.assert_close(hf.model.readout(out.hidden_states[-1]), out.logits)
        for n in (1, 2):
            torch.testing.assert_close(hf.model.readout(out.hidden_states[n]), hf(x, num_loops=n).logits)
