"""``looped.hf`` and ``looped export hf`` against ``LoopedTransformer`` itself: logits, loss, generation, weights.

Every reference is our own model on the same weights (its forward, ``loops=``, ``generate``,
``LoopedLM.compute_loss``), or ``transformers`` without the part under test (``generate`` with
``use_cache=False`` recomputes every step). All offline: checkpoints, tokenizers and run
directories are made here. Needs the ``[hf]`` extra; skipped cleanly without it.
"""

import json
import os
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from conftest import ROOT, tiny_model, tiny_module  # noqa: E402
from looped.contract import IGNORE  # noqa: E402
from looped.datamodules import LongestIncreasingSubsequence, PHop  # noqa: E402
from looped.errors import InputError  # noqa: E402
from looped.hf import LoopedCache, LoopedForCausalLM, byte_tokenizer, from_looped, to_looped, vocab_tokenizer  # noqa: E402
from looped.model import LoopedTransformer  # noqa: E402
from looped.tokenizer import ByteTokenizer  # noqa: E402
from looped.tools.export import export_hf  # noqa: E402

# Every shape and mixer family, and the config fields that change the forward (positions, norms, tying...).
VARIANTS = {
    "plain-3x1": dict(block_layers=3, loops=1),
    "looped-2x3": dict(block_layers=2, loops=3),
    "middle-1+2x2+1": dict(
        prelude_layers=1, block_layers=2, loops=2, coda_layers=1, pos_encoding="learned", tie_embeddings=True
    ),
    "relaxed-2x2": dict(block_layers=2, loops=2, lora_rank=3, norm="rmsnorm", n_kv_heads=2, qk_norm=True),
    "linear-1x3": dict(block_layers=1, loops=3, attention="linear", mixer_options={"linear": {"chunk_size": 4}}),
    "sparse-fixed-2x2": dict(
        block_layers=2, loops=2, attention="sparse", mixer_options={"sparse": {"pattern": "fixed", "stride": 4}}
    ),
    "hybrid-middle": dict(
        prelude_layers=1,
        block_layers=3,
        loops=2,
        coda_layers=1,
        attention=["linear", "sparse", "softmax"],
        mixer_options={"linear": {"chunk_size": 4}, "sparse": {"pattern": "local", "window": 5}},
        norm="rmsnorm",
        activation="swiglu",
        bias=True,
        input_injection="add",
    ),
}
BIG = dict(max_seq_len=24, d_model=32, n_heads=4, d_ff=64, init_std=0.3)  # large weights: every change shows


def save_checkpoint(module, path):
    """A checkpoint as Lightning writes it for ``LoopedLM`` (what ``LoopedLM.load_from_checkpoint`` reads)."""
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "global_step": 7,
            "pytorch-lightning_version": L.__version__,
        },
        path,
    )
    return path


def exported(tmp_path, seed=0, **fields):
    """``(our LoopedTransformer, the transformers model loaded back from its export)``."""
    module = tiny_module(seed, **fields)
    out = export_hf(str(save_checkpoint(module, tmp_path / "model.ckpt")), str(tmp_path / "out"))
    return module.model.eval(), AutoModelForCausalLM.from_pretrained(out).eval()


def ids(batch, length, vocab=11, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
def test_exported_logits_loops_and_hidden_states_equal_ours(tmp_path, variant):
    ours, hf = exported(tmp_path, **BIG, **VARIANTS[variant])
    assert isinstance(hf, LoopedForCausalLM) and type(hf.model) is LoopedTransformer
    x = ids(3, 20)
    loops = ours.config.loops
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), atol=1e-5, rtol=0)
        for n in (1, loops + 2):  # num_loops is our loops=: fewer and more than trained
            torch.testing.assert_close(hf(x, num_loops=n).logits, ours(x, loops=n), atol=1e-5, rtol=0)
        out = hf(x, num_loops=loops + 1, output_hidden_states=True)
        _, states = ours(x, loops=loops + 1, return_loop_states=True)
    assert len(out.hidden_states) == loops + 2  # the block's input, then the state after every loop
    for got, want in zip(out.hidden_states[1:], states, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # The weights on disk are the checkpoint's, tensor for tensor (a tied head is stored once).
    saved = load_file(tmp_path / "out" / "model.safetensors")
    for name, value in ours.state_dict().items():
        if f"model.{name}" in saved:
            assert torch.equal(saved[f"model.{name}"], value), name
        else:
            assert name == "head.weight" and ours.config.tie_embeddings
    assert hf.model.head.weight is hf.model.embed.weight or not ours.config.tie_embeddings


def test_to_looped_and_from_looped_round_trip(tmp_path):
    ours = tiny_model(**BIG, **VARIANTS["hybrid-middle"])
    from_looped(ours, eos_token_id=3).save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    back = to_looped(hf)
    assert type(back) is LoopedTransformer and back.config == ours.config and hf.config.eos_token_id == 3
    assert back.state_dict().keys() == ours.state_dict().keys()
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in back.state_dict().items())
    x = ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours(x), atol=0, rtol=0)


def test_loss_follows_transformers_labels_and_equals_ours(tmp_path):
    """``labels`` are shifted inside (transformers' convention). Our data's labels are already shifted:
    appending the last label as an input and prepending -100 gives transformers' labels, and the same loss."""
    module = tiny_module(**BIG, block_layers=2, loops=2)
    hf = from_looped(module.model).eval()
    data = PHop(length=10, hops=2, supervise="all", batch_size=6)
    inputs, labels = (torch.from_numpy(a) for a in data.fresh_batch(np.random.default_rng(0), 6))
    assert (labels == IGNORE).any() and (labels != IGNORE).any()
    with torch.no_grad():
        ours = module.compute_loss(module.model(inputs), labels)
        extended = torch.cat([inputs, labels[:, -1:].clamp(min=0)], dim=1)
        hf_labels = torch.cat([torch.full_like(labels[:, :1], IGNORE), labels], dim=1)
        assert hf(extended, labels=hf_labels).loss.item() == pytest.approx(ours.item(), rel=1e-6)
        # labels=input_ids is language modelling: position t scored on token t + 1.
        logits = hf(inputs).logits
        want = F.cross_entropy(logits[:, :-1].flatten(0, 1), inputs[:, 1:].flatten())
        assert hf(inputs, labels=inputs).loss.item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("variant", ["looped-2x3", "hybrid-middle"])
def test_generate_equals_ours_token_for_token(variant):
    ours = tiny_model(**BIG, **VARIANTS[variant])
    hf = from_looped(ours).eval()
    prompt = ids(4, 6, seed=2)
    for loops in (None, ours.config.loops + 1):  # generate(..., num_loops=N) is our loops=N
        want = ours.generate(prompt, 12, loops=loops)
        kwargs = dict(max_new_tokens=12, do_sample=False, num_loops=loops)
        assert torch.equal(hf.generate(prompt, **kwargs), want)
        assert torch.equal(hf.generate(prompt, use_cache=False, **kwargs), want)  # no cache: the reference path
    # Left-padded prompts of different lengths: each row continues as its prompt alone does.
    prompts = [ids(1, n, seed=n)[0] for n in (7, 3, 5)]
    padded = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, p in enumerate(prompts):
        padded[i, 7 - len(p) :], mask[i, 7 - len(p) :] = p, 1
    out = hf.generate(padded, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for i, p in enumerate(prompts):
        assert torch.equal(out[i, 7:], ours.generate(p[None], 8)[0, len(p) :])


def test_beam_search_reorders_the_looped_cache():
    """Beam search moves rows between beams: with ``LoopedCache.reorder_cache`` it equals the uncached search."""
    hf = from_looped(tiny_model(**BIG, **VARIANTS["hybrid-middle"])).eval()
    prompt = ids(2, 5, seed=3)
    kwargs = dict(max_new_tokens=8, do_sample=False, num_beams=3, num_return_sequences=2, early_stopping=False)
    assert torch.equal(hf.generate(prompt, **kwargs), hf.generate(prompt, use_cache=False, **kwargs))


def test_cache_is_a_looped_cache_with_one_slot_per_layer_application():
    hf = from_looped(tiny_model(**BIG, **VARIANTS["middle-1+2x2+1"])).eval()
    with torch.no_grad():
        out = hf(ids(2, 6), use_cache=True)
        assert isinstance(out.cache, LoopedCache) and out.cache.get_seq_length() == 6
        assert len(out.cache.decode.layers) == hf.model.applications()
        step = hf(ids(2, 1), cache=out.cache, attention_mask=torch.ones(2, 7))
        torch.testing.assert_close(step.logits[:, -1], hf(torch.cat([ids(2, 6), ids(2, 1)], 1)).logits[:, -1])
        assert hf(ids(2, 6)).cache is None  # a plain forward copies no K/V
        assert torch.equal(hf(ids(2, 6), return_dict=False)[0], hf(ids(2, 6)).logits)  # a tuple when asked
        with pytest.raises(ValueError, match="keep `loops` the same"):
            hf(ids(2, 1), cache=out.cache, num_loops=5)


def test_tokenizers_keep_the_training_ids(tmp_path):
    data = LongestIncreasingSubsequence()  # multi-character tokens (10, 11...) and <eos>
    x, _ = data.generate(np.random.default_rng(0), 3)
    tokenizer = vocab_tokenizer(data.vocab, data.seq_len, data.eos_id)
    tokenizer.save_pretrained(tmp_path / "vocab")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "vocab")
    assert len(loaded) == data.vocab_size and loaded.eos_token_id == data.eos_id
    for row in x.tolist():
        assert loaded(loaded.decode(row)).input_ids == row
    text = "héllo wörld ✓"
    assert byte_tokenizer(64)(text).input_ids == ByteTokenizer().encode(text)
    with pytest.raises(ValueError, match="without spaces"):
        vocab_tokenizer(["a", "b c"], 8)


def fake_run(root, module, loops_accuracy):
    """``runs/x/version_0`` as ``looped run`` leaves it: config.yaml, TensorBoard events, checkpoints/."""
    from torch.utils.tensorboard import SummaryWriter

    run = root / "runs" / "tiny" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(
        "data:\n  class_path: looped.datamodules.PHop\n  init_args: {alphabet_size: 4, length: 10, hops: 2, seed: 0}\n"
    )
    writer = SummaryWriter(str(run))
    for n, value in enumerate(loops_accuracy, start=1):
        writer.add_scalar(f"test/exact_match_loop{n}", value, 100)
    writer.add_scalar("test/exact_match", loops_accuracy[module.config.loops - 1], 100)
    writer.add_scalar("test/samples", 1600, 100)  # a throughput counter: not a metric for the card
    writer.close()
    return save_checkpoint(module, run / "checkpoints" / "best.ckpt")


def test_export_writes_tokenizer_and_model_card_from_the_run(tmp_path):
    data = PHop(length=10, hops=2)
    module = tiny_module(vocab_size=data.vocab_size, max_seq_len=data.seq_len, block_layers=1, loops=2)
    checkpoint = fake_run(tmp_path, module, [0.25, 0.875, 0.5, 0.375])
    out = export_hf(str(checkpoint), str(tmp_path / "out"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("a b c d =").input_ids == [0, 1, 2, 3, 4]
    card = (out / "README.md").read_text()
    assert "(1⊗2)" in card and "looped.datamodules.PHop" in card and "hops=2" in card and "step 7" in card
    assert "| loops | 1 | 2* | 3 | 4 |" in card and "| acc % | 25.0 | 87.5 | 50.0 | 37.5 |" in card
    assert "one state per *loop*, not per layer: `hidden_states[0]` is the embeddings" in card  # where users look
    assert "| test/exact_match | 0.875 |" in card and "test/samples" not in card
    assert json.loads((out / "config.json").read_text())["model_type"] == "looped"


def test_bad_input_is_one_clear_input_error(tmp_path):
    module = tiny_module()
    checkpoint = save_checkpoint(module, tmp_path / "ok.ckpt")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}}, foreign)
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"<|endoftext|>": 0, "x": 1}, unk_token="x")).save(str(tmp_path / "small.json"))
    Tokenizer(models.WordLevel({"x": 0}, unk_token="x")).save(str(tmp_path / "no_eos.json"))
    cases = [
        ((str(foreign), str(tmp_path / "a")), "is not a looped checkpoint"),
        ((str(text), str(tmp_path / "b")), "torch cannot read"),
        ((str(tmp_path / "missing.ckpt"), str(tmp_path / "c")), "does not exist"),
        ((str(tmp_path), str(tmp_path / "d")), "not a sharded checkpoint"),
        ((str(checkpoint), str(tmp_path / "e"), str(tmp_path / "small.json")), "has 2 token ids but the model's vocab"),
        ((str(checkpoint), str(tmp_path / "f"), str(tmp_path / "no_eos.json")), "--tokenizer: .*no end-of-document"),
        ((str(checkpoint), str(tmp_path)), "already exists; pass --overwrite"),
    ]
    for args, message in cases:
        with pytest.raises(InputError, match=message) as err:
            export_hf(*args)
        assert "\n" not in str(err.value)
    first = export_hf(str(checkpoint), str(tmp_path / "again"))
    export_hf(str(checkpoint), str(first), overwrite=True)  # replaces its own export
    assert (first / "model.safetensors").is_file()


@pytest.mark.slow
def test_looped_registers_with_transformers_in_any_import_order(tmp_path):
    """A fresh process: ``import looped`` loads no transformers; with it imported before or after
    transformers, ``AutoModelForCausalLM.from_pretrained`` finds the type; without it, it does not."""
    from_looped(tiny_model()).save_pretrained(tmp_path)
    load = f"from transformers import AutoModelForCausalLM as A\nA.from_pretrained({str(tmp_path)!r})"
    code = {
        "light": "import looped, sys; assert 'transformers' not in sys.modules",
        "before": f"import looped.datamodules\n{load}",
        "after": f"{load.replace('A.', 'import looped; A.')}",
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for name, source in code.items():
        result = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, (name, result.stderr[-2000:])
    result = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0 and "looped" in result.stderr


@pytest.mark.slow
def test_sharded_checkpoint_exports_the_same_weights_as_one_file(tmp_path):
    """A 2-process FSDP2 run saves a sharded directory; its export equals the export of a single-file
    checkpoint holding the same (gathered) weights, tensor for tensor."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    sharded = tmp_path / "sharded.ckpt"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fsdp_run.py"), str(tmp_path), "run", "--devices", "2"]
        + ["--max-steps", "2", "--save", str(sharded)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert sharded.is_dir() and len(list(sharded.glob("*.distcp"))) == 2
    run = torch.load(tmp_path / "run.pt", weights_only=False)
    import fsdp_run

    from looped import LoopedLM

    module = LoopedLM(fsdp_run.config(run["end"]["embed.weight"].shape[0], 13))
    module.model.load_state_dict(run["end"])
    one_file = save_checkpoint(module, tmp_path / "one.ckpt")
    a = load_file(export_hf(str(sharded), str(tmp_path / "a")) / "model.safetensors")
    b = load_file(export_hf(str(one_file), str(tmp_path / "b")) / "model.safetensors")
    assert a.keys() == b.keys() == {f"model.{k}" for k in run["end"]}
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_num_loops_reproduces_the_per_loop_accuracy_callback():
    """The README's snippet (exact match of the last position after ``num_loops=n``) is what
    ``PerLoopAccuracy`` logs, read from one forward's loop states."""
    from looped.callbacks.per_loop import exact_match_per_loop

    data = PHop(length=10, hops=2, test_size=64, eval_batch_size=32)
    data.setup("test")
    ours = tiny_model(vocab_size=data.vocab_size, **{**BIG, "max_seq_len": data.seq_len})
    hf = from_looped(ours).eval()
    with torch.no_grad():
        for batch in data.test_dataloader():
            want = exact_match_per_loop(ours, batch["input_ids"], batch["labels"], loops=4)
            got = [
                hf(batch["input_ids"], num_loops=n).logits[:, -1].argmax(-1) == batch["labels"][:, -1]
                for n in (1, 2, 3, 4)
            ]
            assert torch.equal(torch.stack(got), want)
            assert 0 < want.sum() < want.numel()  # some right, some wrong: the comparison is not vacuous
