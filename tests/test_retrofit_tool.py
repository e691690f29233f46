"""``looped retrofit`` (``looped/tools/retrofit.py``) end to end: a ``transformers`` folder or one of our checkpoints
in, a checkpoint ``LoopedLM.load_from_checkpoint`` loads out — the plain import and the full-rank relaxation give
``transformers``' logits, the plain import exports back as a stock Llama, every ``recipes/retrofit/`` row trains on
from a retrofitted checkpoint, and every mistake is one line before a weight is read."""

import subprocess
from dataclasses import asdict

import pytest
import torch

pytest.importorskip("transformers")

from test_llama_family import batch, save_source  # noqa: E402
from test_lm_recipes import SMALL  # noqa: E402  (the LM rows' toy size: the retrofit rows are LM rows)

from conftest import RECIPES, console_script  # noqa: E402
from looped.errors import InputError  # noqa: E402
from looped.model import LoopedConfig  # noqa: E402
from looped.tools import retrofit  # noqa: E402
from looped.tools.export import export_llama_folder  # noqa: E402
from looped.training.module import LoopedLM  # noqa: E402
from pile_data import prepared_text  # noqa: E402


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3")
    return folder, save_source(folder, "qwen3-like")


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("smollm")
    reference = save_source(folder, "smollm2-like")
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a test model\n")
    return folder, reference


def loaded_logits(path, ids, mask=None):
    model = LoopedLM.load_from_checkpoint(path, map_location="cpu").model.eval()
    with torch.no_grad():
        return model(ids, attention_mask=mask)


def test_plain_import_is_the_source_and_exports_back_as_llama(smollm, tmp_path, capsys):
    folder, reference = smollm
    retrofit.main([str(folder), str(tmp_path / "plain.ckpt"), "--block", "3"])
    summary = capsys.readouterr().out
    assert "shape: 3⊗1," in summary and "licence apache-2.0" in summary and "dropped: none" in summary
    ids, mask = batch()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs = reference(ids, attention_mask=mask, position_ids=positions).logits
    ours = loaded_logits(tmp_path / "plain.ckpt", ids, mask)
    assert (ours[mask.bool()] - theirs[mask.bool()]).abs().max() <= 1e-4
    out = export_llama_folder(str(tmp_path / "plain.ckpt"), str(tmp_path / "llama"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in out.iterdir()}
    assert "license: apache-2.0" in (out / "README.md").read_text()
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (again(ids).logits - reference(ids).logits).abs().max() <= 1e-4


def test_full_rank_relaxation_through_the_tool_is_the_source(qwen3, tmp_path, capsys):
    folder, reference = qwen3
    args = [str(folder), str(tmp_path / "r.ckpt"), "--block", "1", "--loops", "3", "--init", "average"]
    retrofit.main([*args, "--lora-rank", "full"])
    summary = capsys.readouterr().out
    # Qwen3-like: q 32 -> 64, k/v 32 -> 32, o 64 -> 32, MLP 32 <-> 96: full = 32, the o and q maps' inner width
    assert "LoRA: rank 32 per loop (full)" in summary and "block layer j from source layers [[0, 1, 2]]" in summary
    ids, _ = batch()
    with torch.no_grad():
        assert (loaded_logits(tmp_path / "r.ckpt", ids) - reference(ids).logits).abs().max() <= 1e-4


def test_angular_prints_every_candidate(smollm, tmp_path, capsys):
    folder, _ = smollm
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(f"w{i % 50}" for i in range(300)))
    retrofit.main(
        [str(folder), str(tmp_path / "a.ckpt"), "--block", "2", "--init", "angular", "--calibration", str(text)]
    )
    summary = capsys.readouterr().out
    assert "angular distance by span start: 0: " in summary and ", 1: " in summary and "(chosen: " in summary


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--block", "2", "--loops", "2"], r"p \+ k·L \+ c = 0 \+ 2·2 \+ 0 = 4 exceeds the source's 3 layers"),
        (["--block", "1", "--lora-rank", "0"], "--lora-rank: '0' is not a rank"),
        (["--block", "1", "--lora-rank", "high"], "--lora-rank: 'high' is not a rank"),
        (["--block", "1", "--init", "angular"], "--init angular: needs --calibration FILE"),
    ],
)
def test_bad_flags_are_one_line_before_any_weight_is_read(smollm, tmp_path, monkeypatch, flags, message):
    monkeypatch.setattr(retrofit, "read_weights", lambda *_: pytest.fail("read weights before refusing"))
    with pytest.raises(InputError, match=message) as err:
        retrofit.main([str(smollm[0]), str(tmp_path / "x.ckpt"), *flags])
    assert "\n" not in str(err.value)


@pytest.mark.slow  # spawns a process
def test_an_unsupported_architecture_exits_2_with_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    done = subprocess.run(
        [console_script("looped"), "retrofit", str(tmp_path), str(tmp_path / "x.ckpt"), "--block", "1"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"looped: error: SOURCE: {tmp_path} is a GPT2LMHeadModel; supported: "
        "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"
    ]


# --- recipes/retrofit/: every row trains on from a retrofitted checkpoint of our own plain model ---------------

ROWS = {  # row -> the retrofit flags that make its shape
    "cpu_2x2": ["--block", "2", "--loops", "2", "--init", "stepwise"],
    "cpu_1x4": ["--block", "1", "--loops", "4", "--init", "average"],
    "cpu_middle": ["--prelude", "1", "--block", "1", "--loops", "2", "--coda", "1", "--init", "lower"],
    "cpu_2x2_lora": ["--block", "2", "--loops", "2", "--lora-rank", "full"],
    # converted at L = 1 (p + k + c = 4 layers); the row trains at a mean recurrence ramped up to 4
    "cpu_recurrence": "--prelude 1 --block 2 --loops 1 --coda 1 --init upper --adapter concat --state-noise 1".split(),
}


def test_rows_are_every_file():
    assert {p.stem for p in (RECIPES / "retrofit").glob("cpu_*.yaml")} == set(ROWS)


@pytest.fixture(scope="module")
def own_source(tmp_path_factory):
    """Prepared text and a plain (4⊗1) LoopedLM checkpoint of the LM recipes' shape at test width."""
    root = tmp_path_factory.mktemp("retrofit_rows")
    data = prepared_text(root, n=60, tokenizer=None)
    config = LoopedConfig(
        vocab_size=300, max_seq_len=32, d_model=32, n_heads=2, d_ff=64, block_layers=4, norm="rmsnorm"
    )
    module = LoopedLM(config=config)
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": {"config": asdict(config)}, "global_step": 300},
        root / "source.ckpt",
    )
    return data, root / "source.ckpt", module


@pytest.mark.parametrize("row", sorted(ROWS))
def test_row_trains_on_from_a_retrofitted_checkpoint(row, own_source, tmp_path, run_dir):
    from looped.cli import LoopedCLI

    data, source, module = own_source
    out = tmp_path / f"{row}.ckpt"
    retrofit.main([str(source), str(out), *ROWS[row]])
    args = ["fit", "--config", str(RECIPES / "retrofit" / f"{row}.yaml"), "--data.path", str(data)]
    args += ["--model.init_args.init_weights", str(out), *(x for item in SMALL.items() for x in item)]
    if row.endswith("lora"):
        args += ["--model.init_args.config.lora_rank", "32"]  # full rank at the test width
    cli = LoopedCLI(args=args)
    assert cli.trainer.global_step == 2 and cli.trainer.logger.name == f"retrofit/{row}"
    start = module.model.embed.weight  # the retrofitted start, moved by two small steps only
    assert (cli.model.model.embed.weight - start).abs().max() < 0.01
