"""One evaluation table: a row per evaluation set (pooled last), a column per metric; the returned metrics unchanged."""

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import tiny_config
from looped import LoopedLM
from looped.callbacks import PerLoopAccuracy
from looped.cli import evaluate
from looped.datamodules import NaryAddition
from looped.tools.eval_table import POOLED, cell, eval_rows, eval_table, merge_results, perplexity_loop_table


def test_keys_split_into_sets_and_metrics():
    names = ["n8", "n16", "match"]  # "match": a set whose name ends exact_match, which must stay pooled
    metrics = {"test/exact_match": 0.5, "test/loss": 1.0, "test/exact_match_loop10": 0.3}
    for n in (2, 1):
        metrics[f"test/exact_match_loop{n}"] = n / 10
    for name in names:
        metrics |= {f"test/exact_match_{name}": 0.1, f"test/loss_{name}": 2.0, f"test/exact_match_loop2_{name}": 0.2}
    columns, rows = eval_rows(metrics, "test", names)
    assert columns == ["exact_match", "loss", "exact_match_loop1", "exact_match_loop2", "exact_match_loop10"]
    assert list(rows) == [*names, POOLED]  # the sets in the data module's order, pooled last
    assert rows[POOLED] == {"exact_match": 0.5, "loss": 1.0, "exact_match_loop1": 0.1, "exact_match_loop2": 0.2} | {
        "exact_match_loop10": 0.3
    }
    assert rows["match"] == {"exact_match": 0.1, "loss": 2.0, "exact_match_loop2": 0.2}


def test_adaptive_exit_metrics_stay_in_their_own_table():
    metrics = {"test/exact_match": 1.0, "test/adaptive/kl_0.1/exact_match": 0.9, "test/adaptive/kl_0.1/mean_loops": 2}
    columns, rows = eval_rows(metrics, "test", [])
    assert columns == ["exact_match"] and rows == {POOLED: {"exact_match": 1.0}}


def test_per_loop_perplexity_is_its_own_table():
    metrics = {"val/loss": 2.0, "val/loss_pile": 3.0, "val/perplexity": 7.4}
    for n in (1, 2):
        metrics |= {f"val/perplexity_loop{n}": 10.0 / n, f"val/perplexity_loop{n}_pile": 20.0 / n}
    columns, _ = eval_rows(metrics, "val", ["pile", "code"])
    assert columns == ["loss", "perplexity"]  # the per-loop perplexities stay out of the main table
    table = perplexity_loop_table(metrics, "val", ["pile", "code"], trained_loops=2)
    assert [c.header for c in table.columns] == ["set", "loop1", "loop2*"]
    assert list(table.columns[0].cells) == ["pile", POOLED]  # a set without per-loop numbers has no row
    assert list(table.columns[2].cells) == ["10.00", "5.00"]
    assert perplexity_loop_table({"val/loss": 1.0}, "val") is None


def test_supervision_steps_are_columns_and_cell_accuracy_stays_out():
    metrics = {"test/exact_match": 0.5}
    for n in (10, 2, 1):
        metrics |= {f"test/exact_match_step{n}": n / 10, f"test/cell_accuracy_step{n}": 0.9}
    columns, _ = eval_rows(metrics, "test", [])
    assert columns == ["exact_match", "exact_match_step1", "exact_match_step2", "exact_match_step10"]
    table = eval_table(metrics, "test", trained_steps=2)
    assert [c.header for c in table.columns] == ["set", "exact match %", "step1", "step2*", "step10"]
    assert list(table.columns[3].cells) == ["20.0"]


def test_one_dataloader_without_names_is_one_row():
    columns, rows = eval_rows({"val/exact_match": 1.0, "val/perplexity": 2.5}, "val", [])
    assert columns == ["exact_match", "perplexity"] and list(rows) == [POOLED]
    assert merge_results([{"a": 1}, {"a": 1, "b": 2}]) == {"a": 1.0, "b": 2.0}


def test_the_table_shows_what_trainer_test_returns_and_changes_nothing(tmp_path, capsys):
    """Against Lightning's own run: the same returned metrics and logged scalars, shown once, by set."""
    data = NaryAddition(digits=1, train_operands=[2, 3], eval_operands=[2, 3], batch_size=8, val_size=16, test_size=16)
    model = LoopedLM(tiny_config(vocab_size=data.vocab_size, max_seq_len=data.seq_len, loops=2))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=[PerLoopAccuracy(max_eval_loops=3)],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    lightning_printed = trainer.test(model, datamodule=data, verbose=True)
    capsys.readouterr()
    ours = evaluate(trainer, "test", model=model, datamodule=data)
    printed = capsys.readouterr().out
    assert ours == lightning_printed  # trainer.test's result is untouched
    assert len(ours) == 2 and "Test metric" not in printed  # two dataloaders, no per-dataloader tables
    metrics = merge_results(ours)
    columns, _ = eval_rows(metrics, "test", ["n2", "n3"])
    assert columns[-3:] == ["exact_match_loop1", "exact_match_loop2", "exact_match_loop3"]
    header = next(line for line in printed.splitlines() if "exact match %" in line)
    assert header.split()[-3:] == ["loop1", "loop2*", "loop3"]  # the trained L = 2 starred
    lines = {line.split()[0]: line.split()[1:] for line in printed.splitlines() if line.startswith("  n")}
    lines[POOLED] = next(line.split()[1:] for line in printed.splitlines() if line.startswith(f"  {POOLED} "))
    for row, suffix in (("n2", "_n2"), ("n3", "_n3"), (POOLED, "")):
        assert lines[row] == [cell(c, metrics[f"test/{c}{suffix}"]) for c in columns], row
    events = EventAccumulator(trainer.logger.log_dir).Reload()
    assert set(metrics) <= set(events.Tags()["scalars"])  # and all of it went to TensorBoard
