"""Every ``recipes/lm/`` row resolves to its shape and trains 2 steps on prepared text, with per-loop perplexity."""

import math

import pytest

from conftest import RECIPES
from looped.cli import LoopedCLI
from pile_data import prepared_text

# row -> (prelude, k, L, coda, regulariser (k, λ) or None, exit objective or None, kv_sharing)
ROWS = {
    "cpu_1x4": (0, 1, 4, 0, None, None, False),
    "cpu_4x1": (0, 4, 1, 0, None, None, False),
    "cpu_1x1": (0, 1, 1, 0, None, None, False),
    "cpu_middle": (1, 1, 2, 1, None, None, False),
    "cpu_regularised": (0, 4, 1, 0, (1, 10.0), None, False),
    "cpu_1x4_exit": (0, 1, 4, 0, None, "ouro", False),
    "cpu_1x4_kv_shared": (0, 1, 4, 0, None, None, True),
    "cpu_4x4_exit_bytes": (0, 4, 4, 0, None, "ouro", False),
    "cpu_1x4_mor_expert": (0, 1, 4, 0, None, None, False),
    "cpu_1x4_mor_token": (0, 1, 4, 0, None, None, False),
}
ROUTED = {"cpu_1x4_mor_expert": "expert_choice", "cpu_1x4_mor_token": "token_choice"}  # the rest: router none
SMALL = {
    "--trainer.max_steps": "2",
    "--trainer.val_check_interval": "2",
    "--trainer.enable_progress_bar": "false",
    "--model.init_args.config.d_model": "32",
    "--model.init_args.config.n_heads": "2",
    "--model.init_args.config.d_ff": "64",
    "--data.seq_len": "32",
    "--data.batch_size": "2",
    "--data.num_workers": "0",
    "--data.val_batches": "2",
    "--data.primitives_size": "2",
    "--model.init_args.warmup_steps": "1",
}


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    return prepared_text(tmp_path_factory.mktemp("lmtext"), n=60, tokenizer=None)  # a trained BPE, as the README's


def test_rows_are_every_file():
    assert {p.stem for p in (RECIPES / "lm").glob("cpu_*.yaml")} == set(ROWS)


@pytest.mark.parametrize("row", sorted(ROWS))
def test_row_trains_two_steps_and_logs_per_loop_perplexity(row, text_data, run_dir):
    args = ["fit", "--config", str(RECIPES / "lm" / f"{row}.yaml"), "--data.path", str(text_data)]
    cli = LoopedCLI(args=[*args, *(x for item in SMALL.items() for x in item)])
    c = cli.model.config
    assert (c.prelude_layers, c.block_layers, c.loops, c.coda_layers) == ROWS[row][:4]
    reg = cli.model.regularizer
    assert (None if reg is None else (reg.block_layers, reg.weight)) == ROWS[row][4]
    exit = cli.model.exit
    assert (None if exit is None else exit.objective, c.kv_sharing) == ROWS[row][5:]
    assert c.exit_gate == (exit is not None)
    assert c.router == ROUTED.get(row, "none")
    assert c.vocab_size == 300 and cli.trainer.global_step == 2
    assert cli.trainer.logger.name == f"lm/{row}"
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    loops = 2 * c.loops  # PerLoopAccuracy's default: up to twice the trained L
    assert [f"val/perplexity_loop{n}_pile" in metrics for n in range(1, loops + 2)] == [True] * loops + [False]
    # Read out after the trained L, the callback's one forward agrees with the module's own evaluation.
    assert math.isclose(metrics[f"val/perplexity_loop{c.loops}_pile"], metrics["val/perplexity_pile"], rel_tol=1e-4)
    assert math.isclose(metrics["val/perplexity_pile"], math.exp(metrics["val/loss_pile"]), rel_tol=1e-4)
    assert "isoplot/log_perplexity" not in metrics  # written to the loggers, not logged through the module
    points = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "IsoplotRecorder").points
    assert points[-1]["step"] == 2 and "val/exact_match_primitives_code_d1" in points[-1]
