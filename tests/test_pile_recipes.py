"""Every Pile recipe row parses into the paper's architecture, and the 4⊗6 recipe trains on CPU at smoke size."""

import subprocess

import pytest
import torch

from conftest import RECIPES, ROOT
from looped.cli import LoopedCLI
from looped.training.optim import Adafactor
from pile_data import prepared_pile

# row -> (prelude, k, L, coda, regulariser (k, λ) or None): the paper's Tables 3-4 and Figure 3.
ROWS = {
    "pile/24x1": (0, 24, 1, 0, None),
    "pile/12x1": (0, 12, 1, 0, None),
    "pile/12x2": (0, 12, 2, 0, None),
    "pile/middle": (4, 4, 4, 4, None),
    "pile/8x1": (0, 8, 1, 0, None),
    "pile/8x3": (0, 8, 3, 0, None),
    "pile/6x1": (0, 6, 1, 0, None),
    "pile/6x4": (0, 6, 4, 0, None),
    "pile/4x1": (0, 4, 1, 0, None),
    "pile_1b_4x6": (0, 4, 6, 0, None),
    "pile/24x1_reg_k4_lam1": (0, 24, 1, 0, (4, 1.0)),
    "pile/24x1_reg_k4_lam10": (0, 24, 1, 0, (4, 10.0)),
    "pile/24x1_reg_k6_lam10": (0, 24, 1, 0, (6, 10.0)),
    "pile/24x1_reg_k8_lam10": (0, 24, 1, 0, (8, 10.0)),
    "pile/24x1_reg_k12_lam10": (0, 24, 1, 0, (12, 10.0)),
    **{f"pile/4x{L}": (0, 4, L, 0, None) for L in (2, 3, 9, 12)},
    **{f"pile/{4 * L}x1": (0, 4 * L, 1, 0, None) for L in (9, 12)},
}
# The recipe's own ModelParallelStrategy (FSDP2 on a 1-rank CPU mesh, looped.training.optim.Adafactor) and its
# full validation list (pile + the four primitives sets), at a size a CPU trains in seconds.
SMOKE = [
    "--trainer.devices",
    "1",
    "--trainer.num_nodes",
    "1",
    "--trainer.precision",
    "32-true",
    "--trainer.max_steps",
    "3",
    "--trainer.val_check_interval",
    "3",
    "--model.init_args.config.d_model",
    "64",
    "--model.init_args.config.n_heads",
    "2",
    "--model.init_args.config.d_ff",
    "128",
    "--data.seq_len",
    "64",
    "--data.batch_size",
    "2",
    "--data.num_workers",
    "0",
    "--data.val_batches",
    "2",
    "--data.primitives_size",
    "32",
    "--model.init_args.warmup_steps",
    "1",
]


@pytest.fixture(scope="module")
def tiny_pile(tmp_path_factory):
    return prepared_pile(tmp_path_factory.mktemp("tinypile"), shards=2, per_shard=80, val_fraction=0.2, workers=1)


def test_rows_cover_the_paper_and_every_file_is_a_row():
    files = {str(p.relative_to(RECIPES).with_suffix("")) for p in RECIPES.glob("pile*.yaml")}
    files |= {str(p.relative_to(RECIPES).with_suffix("")) for p in (RECIPES / "pile").glob("*.yaml")}
    assert files - {"pile/_base"} == set(ROWS)


@pytest.mark.parametrize("row", sorted(ROWS))
def test_row_parses_to_the_paper_model(row, tiny_pile, run_dir):
    """Parse the row (base + its differences) and build the full-size model on the meta device."""
    with torch.device("meta"):
        cli = LoopedCLI(args=["--config", str(RECIPES / f"{row}.yaml"), "--data.path", str(tiny_pile)], run=False)
    c, model = cli.model.config, cli.model
    assert (c.d_model, c.n_heads, c.d_ff, c.max_seq_len) == (2048, 32, 5120, 1280)  # the shared 1B setup
    assert (c.prelude_layers, c.block_layers, c.loops, c.coda_layers) == ROWS[row][:4]
    reg = ROWS[row][4]
    assert (None if model.regularizer is None else (model.regularizer.block_layers, model.regularizer.weight)) == reg
    assert cli.trainer.max_steps == 400_000 and cli.datamodule.batch_size * 64 == 512
    assert cli.trainer.logger.name == row.replace("pile_1b_", "pile/")
    # The optimiser training builds: Adafactor that steps FSDP2-sharded parameters (torch's cannot).
    model.trainer = cli.trainer
    assert type(model.configure_optimizers()["optimizer"]) is Adafactor
    layers = c.prelude_layers + c.block_layers + c.coda_layers
    per_layer = 4 * 2048 * 2048 + 2 * 2048 * 5120
    assert (
        abs(sum(p.numel() for p in model.parameters()) - layers * per_layer)
        < 0.02 * layers * per_layer + 2 * 257 * 2048 + 1e5
    )


@pytest.mark.slow
def test_pile_1b_4x6_smoke_run_on_cpu(tiny_pile, run_dir):
    """Exactly the README's smoke command: `lightning run recipes/pile_1b_4x6.yaml --data.path DIR` + overrides."""
    lightning = ROOT / ".venv" / "bin" / "lightning"
    command = (
        [str(lightning)]
        if lightning.exists()
        else ["python", "-c", "from looped.cli import lightning_main; lightning_main()"]
    )
    out = subprocess.run(
        [*command, "run", str(RECIPES / "pile_1b_4x6.yaml"), "--data.path", str(tiny_pile), *SMOKE],
        capture_output=True,
        text=True,
        timeout=1200,  # a hang guard, with room for a loaded 2-core machine
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    run = run_dir / "runs" / "pile" / "4x6" / "version_0"
    assert (run / "config.yaml").exists() and (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "checkpoints" / "last.ckpt" / ".metadata").exists()  # a sharded (DCP) checkpoint: FSDP2 ran
    # One evaluation table: a row per named set, the pooled row last, a loss for each.
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith(("  pile", "  primitives", "  all "))]
    names = ["pile", "primitives_math_d0", "primitives_math_d1", "primitives_code_d0", "primitives_code_d1", "all"]
    assert [row[0] for row in rows] == names, out.stdout[-3000:]
