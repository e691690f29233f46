"""Every paper recipe family trains and tests on this CPU in its own settings, so a GPU run meets no code path first.

Each case is ``looped run RECIPE`` (fit, then test on the best checkpoint) for 2 steps with the recipe's own
precision (``bf16-mixed``: bf16 autocast, and under FSDP2 bf16 parameters), strategy (one device, or
``ModelParallelStrategy``: FSDP2 on a one-process mesh), optimiser, callbacks, evaluation sets, and
``compile`` / ``activation_checkpointing`` flags; only the width, the sequence length (the task's problem
size) and the data sizes shrink, through the command-line overrides a user would type. The one Pile case
with both flags on runs what docs/pile_fsdp.md recommends for GPUs.
"""

import pytest

from conftest import RECIPES
from looped.cli import run
from pile_data import prepared_pile

STEPS = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1"]
TINY = [
    *("--model.init_args.config.d_model", "16", "--model.init_args.config.n_heads", "2"),
    *("--model.init_args.config.d_ff", "32"),
]
SYNTHETIC_DATA = [
    *("--data.batch_size", "4", "--data.eval_batch_size", "8", "--data.train_size", "8"),
    *("--data.val_size", "8", "--data.test_size", "8", "--data.num_workers", "0"),
]
PILE_DATA = [
    *("--trainer.devices", "1", "--trainer.num_nodes", "1", "--data.seq_len", "32", "--data.batch_size", "2"),
    *("--data.num_workers", "0", "--data.val_batches", "1", "--data.primitives_size", "4"),
]
# recipe -> its own problem, made small: sequence length through the task's size.
CASES = {
    "phop/p16_2x3.yaml": ["--data.length", "48", *SYNTHETIC_DATA],
    "addition/2x6.yaml": ["--data.train_operands", "[2, 4]", "--data.eval_operands", "[2, 4]", *SYNTHETIC_DATA],
    "igsm/2x4.yaml": ["--data.num_operations", "3", "--data.num_edges", "6", *SYNTHETIC_DATA],
    "cot/arithmetic/cot_1x3.yaml": ["--data.size", "2", *SYNTHETIC_DATA],
    "pile_1b_4x6.yaml": PILE_DATA,
    "pile/middle.yaml": PILE_DATA,
    "pile/24x1_reg_k4_lam1.yaml": PILE_DATA,
    "pile_1b_4x6.yaml (checkpointing, compile)": [
        *PILE_DATA,
        *("--model.init_args.activation_checkpointing", "true", "--model.init_args.compile", "true"),
    ],
}


@pytest.fixture(scope="module")
def tiny_pile(tmp_path_factory):
    return prepared_pile(tmp_path_factory.mktemp("paperpile"), shards=2, per_shard=40, val_fraction=0.2, workers=1)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_paper_recipe_runs_in_its_own_settings(case, tiny_pile, run_dir):
    recipe = case.split(" ")[0]
    overrides = list(CASES[case])
    if recipe.startswith("pile"):
        overrides += ["--data.path", str(tiny_pile)]
    cli = run([str(RECIPES / recipe), *TINY, *STEPS, *overrides])
    trainer = cli.trainer
    assert trainer.global_step == 2
    assert trainer.precision == "bf16-mixed"  # every paper recipe's own
    assert trainer.callback_metrics, "the test on the best checkpoint logged nothing"
    assert all(v.isfinite() for v in trainer.callback_metrics.values())
