"""Smoke test of ``benchmarks/datagen.py``: it runs against the current code and its ratios follow from its columns."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _number(text: str) -> float:
    return float(text.replace(",", "").rstrip("x"))


@pytest.mark.slow
@pytest.mark.parametrize("label", ["PHop p=16", "NaryAddition", "ARC-AGI-1"])  # fixed set; stream; puzzles
def test_datagen_prints_consistent_headroom(label):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "datagen.py"),
            "--seconds",
            "0.3",
            "--floor-steps",
            "50",
            "--only",
            label,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    row = next(line for line in lines if line.startswith(label))
    *_, generated, fixed, flop_bound, loop_bound, headroom, vs_flops, host, host_vs_flops = row[len(label) :].split()
    assert _number(generated) > 0
    assert (fixed == "(streams)") == (host == "(streams)")  # both or neither: the fixed-set path
    delivered = _number(generated) if fixed == "(streams)" else _number(fixed)
    from_host = _number(generated) if host == "(streams)" else _number(host)
    if host != "(streams)":
        assert from_host > delivered  # indices alone are cheaper than indices and the gather
    eaten = min(_number(flop_bound), _number(loop_bound))
    assert _number(headroom) == pytest.approx(delivered / eaten, rel=0.01)
    assert _number(vs_flops) == pytest.approx(delivered / _number(flop_bound), rel=0.01)
    assert _number(host_vs_flops) == pytest.approx(from_host / _number(flop_bound), rel=0.01)
    assert lines[-1].startswith("smallest headroom:") and label in lines[-1]


@pytest.mark.slow
def test_decode_benchmark_prints_its_ratios_from_its_columns():
    """``benchmarks/decode.py`` runs against the current code (the exact decoders agree, or it stops) and its
    ratio lines follow from its rows: transformers' ``generate`` over ours, each exit rule over fixed L in both
    schedules, end to end and decoding alone (beside L / its mean loops), KV shared over per application (the
    cache bytes: 1/L, no prelude or coda)."""
    pytest.importorskip("transformers")
    args = ["--rounds", "1", "--new-tokens", "6", "--prompt-len", "8", "--d-model", "32", "--vocab", "64"]
    args += ["--exit", "stable_1", "fixed"]
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "decode.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    names = ("cached (generate)", "full forward per token", "transformers generate", "exit stable_1", "exit fixed")
    names += ("kv shared", "exit stable_1 depthwise")
    rows = {line.split("  ")[0].strip(): line for line in lines if "ratio" not in line}
    rate = {name: _number(rows[name][len(name) :].split()[1]) for name in names}
    loops = {name: _number(rows[name][len(name) :].split()[2]) for name in names}
    assert all(r > 0 for r in rate.values())
    assert loops["exit fixed"] == 3 and 1 <= loops["exit stable_1"] <= 3

    def ratio(prefix: str) -> list[float]:
        line = next(line for line in lines if line.startswith(prefix))
        return [_number(word.rstrip(",;)")) for word in line.split(":", 1)[1].split() if word[0].isdigit()]

    assert ratio("transformers generate / our")[0] == pytest.approx(
        rate["transformers generate"] / rate["cached (generate)"], abs=0.02
    )
    decoding_line = next(line for line in lines if "decode tokens/s: " in line).split("tokens/s: ")[1]
    decode_rate = {name: _number(rate) for name, rate in (part.rsplit(" ", 1) for part in decoding_line.split(", "))}
    for name in ("exit stable_1", "exit stable_1 depthwise"):
        measured, decoding, mean, ideal, share = ratio(f"{name} / fixed")
        assert measured == pytest.approx(rate[name] / rate["cached (generate)"], abs=0.02)
        assert decoding == pytest.approx(decode_rate[name] / decode_rate["cached (generate)"], abs=0.02)
        assert mean == pytest.approx(loops[name], abs=0.01) and ideal == pytest.approx(3 / mean, abs=0.01)
        assert share == pytest.approx(decoding / ideal, abs=0.02)
    speed, size = ratio("kv shared / kv per application")
    assert speed == pytest.approx(rate["kv shared"] / rate["cached (generate)"], abs=0.02)
    assert size == pytest.approx(1 / 3, abs=0.01)


@pytest.mark.slow  # about a minute: the 1B recipe on meta, FSDP2 on gloo, torch.compile
def test_gpu_check_dry_run_runs_every_path_on_the_cpu():
    """benchmarks/gpu_check.py at toy size on the CPU: FlexAttention vs SDPA, the recipe's 1B model eager and
    compiled under FSDP2, the plan's peak, the loop overhead; its table has every row and ends with the ratio."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    for row in ("max |diff|", "eager: tokens/s", "compiled: tokens/s", "peak memory, looped plan", "loop overhead"):
        assert any(row in line for line in lines), row
    diff = next(line for line in lines if "max |diff|" in line).split()[-1]
    assert float(diff) < 0.05  # bf16 rounding, not a different pattern
    assert lines[-1].startswith("(4⊗6)/(24⊗1) tokens/s ratio") and float(lines[-1].split()[-1]) > 0


# Every script in benchmarks/, at toy size: what it needs to run through every code path in seconds. A script
# added without a row here fails test_every_benchmark_has_a_toy_run, so none can rot unseen.
TOY_RUNS = {
    "attention_scaling.py": ["--d-model", "32", "--seq-lens", "16", "32", "--repeats", "1"],
    "checkpoint_save.py": ["--d-model", "32", "--layers", "1", "--rounds", "2"],
    "cot_generation.py": [],
    "datagen.py": ["--seconds", "0.2", "--floor-steps", "20", "--only", "NaryAddition"],
    "decode.py": ["--d-model", "32", "--prompt-len", "4", "--new-tokens", "4", "--vocab", "11", "--rounds", "1"],
    "eval_pass.py": ["--d-model", "32", "--samples", "64", "--rounds", "1"],
    "lm_throughput.py": ["--vocab", "64", "--seq-len", "16", "--batch", "2", "--rounds", "2"],
    "loop_overhead.py": ["--d-model", "32", "--seq-len", "16", "--batch", "2", "--rounds", "2"],
    "mor_step_time.py": ["--d-model", "32", "--seq-len", "16", "--batch", "2", "--vocab", "11", "--rounds", "2"],
    "per_loop_eval.py": ["--d-model", "32", "--seq-len", "16", "--batch", "2", "--vocab", "11", "--rounds", "2"],
    "plan_pile.py": ["--only", "pile/4x1.yaml"],
    "soak.py": [
        str(ROOT / "recipes" / "quickstart.yaml"),
        "--kills",
        "1",
        "--first-step",
        "3",
        "--",
        "--trainer.max_steps=12",
        "--trainer.val_check_interval=6",
        "--model.init_args.config.d_model=32",
        "--data.init_args.val_size=64",
        "--data.init_args.test_size=64",
    ],
    "self_speculative.py": ["--d-model", "32", "--prompt-len", "4", "--new-tokens", "8", "--loops", "3", "--hf"],
}
NEEDS = {"lm_throughput.py": "litgpt"}  # compared against a library that is not a dependency of the project
# Scripts whose toy run is a test of its own, with checks of their output beyond the last line (not run twice).
OWN_TEST = {"gpu_check.py": test_gpu_check_dry_run_runs_every_path_on_the_cpu}


def test_every_benchmark_has_a_toy_run():
    assert sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")) == sorted([*TOY_RUNS, *OWN_TEST])


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(TOY_RUNS))
def test_every_benchmark_runs_at_toy_size_and_prints_its_ratio_last(script):
    if script in NEEDS:
        pytest.importorskip(NEEDS[script])
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *TOY_RUNS[script]],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert re.search(r"\d", last), last  # a benchmark prints the number it exists for last
