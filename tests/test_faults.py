"""Faults a cluster job meets, injected: nothing is lost (issue 34).

SIGKILL at seeded moments (after a step, a save torn half way, a save written but not published, between
the renames that publish it) under ``torchrun --max-restarts``, in one process and in a 2-rank gloo FSDP2
run: the job resumes by itself (``--ckpt_path auto``) and logs the losses of an uninterrupted run, step for
step. A full disk during a save; a damaged data chunk; corrupt, partial and foreign checkpoints given to
``auto``. docs/recipes.md's "When something goes wrong" has the table of them.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from conftest import RECIPES
from conftest import console_script as _console
from looped import LoopedConfig, LoopedLM
from looped.callbacks import Checkpoint, SimulatedFaults
from looped.callbacks.faults import recorded
from looped.cli import main
from looped.cli.errors import user_message
from looped.datamodules import PHop, PileDataModule
from looped.errors import InputError
from looped.tools.report import logged_by_step, read_scalars
from looped.training.checkpoint import read_checkpoint
from looped.training.saving import (
    CheckpointWriteError,
    checkpoint_files,
    find_resume,
    partial_path,
    previous_path,
    publish,
)

STEPS = 24


def write_recipe(folder: Path, name: str, base: Path, steps: int, callbacks: list[str], rest: str) -> Path:
    """``folder/name.yaml``: a row of ``base`` logging every step under ``folder/runs/name``, with ``callbacks``
    (flow-style YAML items) and ``rest`` (the model and data lines)."""
    items = "".join(f"  - {c}\n" for c in callbacks)
    text = f"""config: {base}
trainer.max_steps: {steps}
trainer.log_every_n_steps: 1
trainer.enable_progress_bar: false
trainer.logger.init_args.save_dir: {folder / "runs"}
trainer.logger.init_args.name: {name}
trainer.callbacks:
{items}{rest}"""
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def tiny_recipe(folder: Path, name: str, *callbacks: str, steps: int = STEPS, fsdp: bool = False) -> Path:
    """The quickstart at toy size: d=32, 2 hops over 16 letters, validation every 8 steps, last.ckpt every 3."""
    strategy = (
        "trainer.strategy: {class_path: lightning.pytorch.strategies.ModelParallelStrategy}\ntrainer.devices: 2\n"
        "trainer.accelerator: cpu\n"
        if fsdp
        else ""
    )
    checkpoint = (
        "{class_path: looped.callbacks.Checkpoint, "
        "init_args: {monitor: val/exact_match, mode: max, last_every_n_steps: 3}}"
    )
    rest = f"""{strategy}trainer.val_check_interval: 8
model.init_args.config.d_model: 32
model.init_args.config.d_ff: 64
model.init_args.warmup_steps: 4
data.init_args.length: 16
data.init_args.hops: 2
data.init_args.batch_size: 16
data.init_args.val_size: 64
data.init_args.test_size: 64
"""
    callbacks = [checkpoint, "looped.callbacks.InterruptCheckpoint", *callbacks]
    return write_recipe(folder, name, RECIPES / "quickstart.yaml", steps, callbacks, rest)


def losses(run: Path) -> dict[int, list[float]]:
    """Every ``train/loss`` a run logged, by step (a step redone after a restart logs again)."""
    return logged_by_step(run, "train/loss")


def fit(recipe: Path, *launcher: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [*launcher, _console("looped"), "fit", "--config", str(recipe), "--ckpt_path", "auto"]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=recipe.parent)


def torchrun(processes: int, restarts: int) -> list[str]:
    runner = Path(sys.executable).with_name("torchrun")
    return [str(runner), "--standalone", f"--nproc-per-node={processes}", f"--max-restarts={restarts}", "--no-python"]


def assert_same_losses(faulty: dict[int, list[float]], reference: dict[int, list[float]], kills: int) -> None:
    """Every loss the killed-and-restarted job logged (a step redone after a kill logs twice) is the reference's.

    Lightning logs a step's loss after the callbacks' ``on_train_batch_end``, where the checkpoint of that step is
    saved: a kill right after the save loses that one log line (the step itself is not redone). So the killed run
    may lack one logged step per kill, never its last one.
    """
    missing = sorted(set(reference) - set(faulty))
    assert len(missing) <= kills and max(reference) in faulty, missing
    assert not set(faulty) - set(reference)
    for step, values in faulty.items():
        for value in values:
            assert value == pytest.approx(reference[step][0], abs=1e-6), (step, values, reference[step])


# -- kills at seeded moments, restarted by torchrun -----------------------------------------------------------


@pytest.mark.slow
def test_sigkill_at_seeded_moments_single_process_resumes_by_itself(tmp_path):
    """Four SIGKILLs — after a step, a torn save, a written but unpublished save, between publication's renames —
    each restarted by torchrun; the job reaches its last step with the uninterrupted run's losses, step for step."""
    seed = 60  # its four moments cover the four places (asserted below, so a change of the draw is noticed)
    faults = f"{{class_path: looped.callbacks.SimulatedFaults, init_args: {{kills: 4, seed: {seed}, first_step: 2}}}}"
    reference = fit(tiny_recipe(tmp_path, "reference"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = fit(tiny_recipe(tmp_path, "killed", faults), *torchrun(1, restarts=4))
    assert killed.returncode == 0, killed.stderr[-3000:]
    kills = recorded(tmp_path / "runs" / "killed" / "faults.jsonl")
    print("\n".join(json.dumps(k) for k in kills))  # the seeded moments, to replay a failure
    assert [k["kill"] for k in kills] == [1, 2, 3, 4]
    assert {k["place"] for k in kills} == {"step", "torn", "written", "publishing"}, kills
    assert killed.stderr.count("--ckpt_path auto: resuming") == 4
    assert_same_losses(losses(tmp_path / "runs" / "killed"), losses(tmp_path / "runs" / "reference"), kills=4)
    # one run, one version folder, continued after every kill; its last state is the last step
    assert [p.name for p in (tmp_path / "runs" / "killed").glob("version_*")] == ["version_0"]
    last = tmp_path / "runs" / "killed" / "version_0" / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["global_step"] == STEPS
    assert not [p for p in last.parent.iterdir() if p.name.startswith(".")]  # no partial save left behind


@pytest.mark.slow
def test_sigkill_inside_a_sharded_save_two_ranks_fsdp2(tmp_path):
    """A 2-rank gloo FSDP2 run, one rank killed inside a sharded save, under torchrun --max-restarts 1: resumed
    from the newest complete shard folder, with the uninterrupted 2-rank run's losses. The uninterrupted run is
    started as on one machine without torchrun (``looped fit ... --trainer.devices 2``): Lightning starts the
    second rank by running the same command line again."""
    faults = (
        "{class_path: looped.callbacks.SimulatedFaults, init_args: {kills: 1, seed: 0, first_step: 10, places: [torn]}}"
    )
    reference = fit(tiny_recipe(tmp_path, "reference", steps=16, fsdp=True))
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in reference.stderr + reference.stdout
    killed = fit(tiny_recipe(tmp_path, "killed", faults, steps=16, fsdp=True), *torchrun(2, restarts=1))
    assert killed.returncode == 0, killed.stderr[-3000:]
    (kill,) = recorded(tmp_path / "runs" / "killed" / "faults.jsonl")
    print(json.dumps(kill))
    assert kill["place"] == "torn" and "inside the save" in kill["where"]
    assert "--ckpt_path auto: resuming" in killed.stderr
    assert_same_losses(losses(tmp_path / "runs" / "killed"), losses(tmp_path / "runs" / "reference"), kills=1)
    last = tmp_path / "runs" / "killed" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and read_checkpoint(last)["global_step"] == 16  # a shard folder, complete


def deep_supervision_recipe(folder: Path, name: str, *callbacks: str) -> Path:
    """A CPU Sudoku row at toy size: TRM's recursion under deep supervision, its carry and halting exploration."""
    rest = """trainer.val_check_interval: 4
model.init_args.config.d_model: 16
model.init_args.config.n_heads: 2
model.init_args.config.d_ff: 32
model.init_args.supervision_steps: 3
model.init_args.eval_steps: 3
model.init_args.warmup_steps: 2
data.init_args.batch_size: 8
data.init_args.train_size: 64
data.init_args.val_size: 16
data.init_args.test_size: 16
"""
    callbacks = ["looped.callbacks.InterruptCheckpoint", *callbacks]
    return write_recipe(folder, name, RECIPES / "sudoku" / "cpu_trm_mlp.yaml", 8, callbacks, rest)


@pytest.mark.slow
def test_sigterm_then_the_printed_command_resumes_a_deep_supervision_run(tmp_path):
    """A scheduler's SIGTERM mid-run: the run saves interrupted.ckpt, prints the command that resumes and exits 143;
    that command (a DeepSupervision recipe: arguments of its own, a carried state) continues with the
    uninterrupted run's losses, step for step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def looped_fit(recipe: Path, *args: str) -> subprocess.CompletedProcess:
        command = [_console("looped"), "fit", "--config", str(recipe), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)

    reference = looped_fit(deep_supervision_recipe(tmp_path, "reference"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    faults = "{class_path: looped.callbacks.SimulatedFaults, init_args: {places: [sigterm], seed: 0, first_step: 3}}"
    recipe = deep_supervision_recipe(tmp_path, "stopped", faults)
    stopped = looped_fit(recipe)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    printed = re.search(r"Resume with --ckpt_path (\S+)", stopped.stderr)
    assert printed is not None, stopped.stderr[-3000:]
    step = read_checkpoint(printed.group(1))["global_step"]
    assert 3 <= step < 8
    resumed = looped_fit(recipe, "--ckpt_path", printed.group(1))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_losses(losses(tmp_path / "runs" / "stopped"), losses(tmp_path / "runs" / "reference"), kills=1)
    # the resumed half (its own version_1) starts at the stop, not at step 0
    resumed_steps = [logged for logged, _ in read_scalars(tmp_path / "runs" / "stopped" / "version_1")["train/loss"]]
    assert resumed_steps == list(range(step, 8))


# -- the last state, crash-safe publication, keep-K -----------------------------------------------------------


def tiny_trainer(root: Path, callbacks: list, steps: int = 12, lr: float = 1e-3) -> tuple[L.Trainer, LoopedLM, PHop]:
    L.seed_everything(0)
    data = PHop(length=12, hops=2, batch_size=8, val_size=16, test_size=16)
    config = LoopedConfig(vocab_size=data.vocab_size, max_seq_len=data.seq_len, d_model=16, n_heads=2, d_ff=32)
    model = LoopedLM(config, warmup_steps=1, optimizer=functools.partial(torch.optim.AdamW, lr=lr))
    trainer = L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        max_steps=steps,
        val_check_interval=4,
        check_val_every_n_epoch=None,
        logger=TensorBoardLogger(root, name="run"),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return trainer, model, data


def test_last_checkpoint_is_the_last_state_whatever_the_metric(tmp_path):
    """Learning rate 0: the metric never improves after the first validation, yet last.ckpt follows every step
    boundary of its cadence and ends at the last step (Lightning's save_last stays at the first best)."""
    checkpoint = Checkpoint(monitor="val/exact_match", mode="max", last_every_n_steps=5, keep_last=3)
    trainer, model, data = tiny_trainer(tmp_path, [checkpoint], steps=12, lr=0.0)
    trainer.fit(model, datamodule=data)
    folder = Path(checkpoint.dirpath)
    assert read_checkpoint(folder / "last.ckpt")["global_step"] == 12
    # keep_last=3: the two last states before it, under their steps' names (saved at 4, 5, 8, 10, 12)
    kept = sorted(p.name for p in folder.glob("last-step=*.ckpt"))
    assert kept == ["last-step=0000008.ckpt", "last-step=0000010.ckpt"]
    assert [read_checkpoint(folder / n)["global_step"] for n in kept] == [8, 10]
    assert read_checkpoint(checkpoint.best_model_path)["global_step"] == 4  # the best: the first validation
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_publish_keeps_the_old_checkpoint_until_the_new_one_is_complete(tmp_path):
    """A file is replaced atomically; a folder is moved aside first, and a kill between the renames leaves it
    findable (``.NAME.previous``); a ``.partial`` save is never offered for a resume."""
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"old")
    partial_path(target).write_bytes(b"new")
    publish(partial_path(target), target)
    assert target.read_bytes() == b"new" and checkpoint_files(tmp_path) == [target]

    folder = tmp_path / "shards" / "last.ckpt"
    (folder).mkdir(parents=True)
    (folder / "old").write_text("old")
    new = partial_path(folder)
    new.mkdir()
    (new / "new").write_text("new")
    assert checkpoint_files(folder.parent) == [folder]  # the partial one is not offered
    os.replace(folder, previous_path(folder))  # publication's first rename, then a kill
    assert checkpoint_files(folder.parent) == [previous_path(folder)]  # the old one is still found
    publish(new, folder)  # the next attempt publishes again
    assert [p.name for p in folder.iterdir()] == ["new"] and checkpoint_files(folder.parent) == [folder]


def test_disk_full_during_a_save_stops_with_one_line_and_the_previous_checkpoint_resumes(tmp_path, monkeypatch):
    """ENOSPC on the second save: CheckpointWriteError (one line, exit status 2 from the CLI) naming the intact
    checkpoint; no partial file left; resuming from it continues to the end."""
    import fsspec.implementations.local as local

    writes = {"n": 0}
    write = local.LocalFileOpener.write

    def full_disk(self, data):
        writes["n"] += str(self.path).endswith(".partial")  # a checkpoint save, not a log file
        if writes["n"] >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, data)

    monkeypatch.setattr(local.LocalFileOpener, "write", full_disk)
    checkpoint = Checkpoint(last_every_n_steps=3, save_top_k=0)
    trainer, model, data = tiny_trainer(tmp_path, [checkpoint], steps=8)
    with pytest.raises(CheckpointWriteError, match=r"the disk is full: saving .*last.ckpt failed .* is intact"):
        trainer.fit(model, datamodule=data)
    folder = Path(checkpoint.dirpath)
    assert [p.name for p in folder.iterdir()] == ["last.ckpt"]  # the partial write removed
    assert read_checkpoint(folder / "last.ckpt")["global_step"] == 3
    message = user_message(CheckpointWriteError("x"), [])
    assert message == "x"  # printed as one line by the CLI (an InputError)

    monkeypatch.setattr(local.LocalFileOpener, "write", write)
    checkpoint = Checkpoint(last_every_n_steps=3, save_top_k=0)
    trainer, model, data = tiny_trainer(tmp_path / "again", [checkpoint], steps=8)
    trainer.fit(model, datamodule=data, ckpt_path=folder / "last.ckpt")
    assert read_checkpoint(Path(checkpoint.dirpath) / "last.ckpt")["global_step"] == 8


# -- --ckpt_path auto --------------------------------------------------------------------------------------


def test_auto_passes_over_partial_corrupt_incomplete_and_foreign_checkpoints(tmp_path, capsys):
    """The newest version's highest step wins, but only complete checkpoints of this recipe's model: each one
    passed over is named with its reason; an older good one is resumed, in its own version folder."""
    checkpoint = Checkpoint(last_every_n_steps=4, save_top_k=0)
    trainer, model, data = tiny_trainer(tmp_path / "runs", [checkpoint], steps=8)
    trainer.fit(model, datamodule=data)
    folder = Path(checkpoint.dirpath)  # runs/run/version_0/checkpoints
    good = folder / "last.ckpt"
    state = torch.load(good, weights_only=True)
    truncated = folder / "interrupted.ckpt"
    truncated.write_bytes(good.read_bytes()[:2000])
    foreign = folder / "epoch=0-step=50.ckpt"
    torch.save(
        {
            **state,
            "global_step": 50,
            "hyper_parameters": {
                **state["hyper_parameters"],
                "config": {**state["hyper_parameters"]["config"], "d_model": 64},
            },
        },
        foreign,
    )
    (folder / "epoch=0-step=60.ckpt").mkdir()  # a shard folder a kill left without .metadata and meta.pt
    partial_path(folder / "last.ckpt").write_bytes(b"half")
    config = dataclasses.asdict(model.config)

    found = find_resume(tmp_path / "runs" / "run", config)
    assert found.path == good and found.version == 0 and found.step == 8
    reasons = "\n".join(found.skipped)
    assert "interrupted.ckpt (truncated or corrupt)" in reasons
    assert "epoch=0-step=50.ckpt (another recipe's model: model.init_args.config.d_model: 64 → 16)" in reasons
    assert "epoch=0-step=60.ckpt (an incomplete shard folder" in reasons
    assert ".partial" not in reasons  # never a candidate at all
    assert find_resume(tmp_path / "runs" / "nothing", config).path is None


@pytest.mark.slow
def test_ckpt_path_auto_continues_the_same_version_and_says_so(run_dir, caplog):
    """A fresh start when there is nothing (said in one line); a re-run of the same command continues version_0
    and its TensorBoard log from the last state, instead of a version_1 from step 0."""
    recipe = tiny_recipe(run_dir, "auto", steps=6)
    with caplog.at_level(logging.INFO):  # Lightning's rank-zero log: stderr in a terminal
        main(["fit", "--config", str(recipe), "--ckpt_path", "auto"])
        assert "--ckpt_path auto: no complete checkpoint of" in caplog.text
        caplog.clear()
        main(["fit", "--config", str(recipe), "--ckpt_path", "auto", "--trainer.max_steps", "9"])
        assert "--ckpt_path auto: resuming" in caplog.text and "last.ckpt (step 6)" in caplog.text
    run = run_dir / "runs" / "auto"
    assert [p.name for p in run.iterdir() if p.is_dir()] == ["version_0"]
    assert sorted(losses(run)) == list(range(0, 9))  # steps 0..5, then 6..8 in the same log
    assert read_checkpoint(run / "version_0" / "checkpoints" / "last.ckpt")["global_step"] == 9


# -- data: a chunk lost or cut short ------------------------------------------------------------------------


def test_a_chunk_lost_mid_training_is_named_with_the_command_that_prepares_it(tmp_path):
    """The chunks disappear after training started: litdata's timeout becomes one line naming the chunk and the
    `looped prepare` command; at the next start the damage is found before any step."""
    sys.path.insert(0, str(Path(__file__).parent))
    from pile_data import prepared_pile

    data_dir = prepared_pile(tmp_path, shards=2, per_shard=60, val_fraction=0.1, workers=1)
    chunks = sorted((data_dir / "train").glob("chunk-*.bin"))
    assert len(chunks) > 3
    data = PileDataModule(path=str(data_dir), seq_len=16, batch_size=2, num_workers=0, val_batches=1, primitives_size=0)
    data.setup("fit")
    batches = iter(data.train_dataloader())
    next(batches)
    for chunk in chunks[1:]:
        chunk.unlink()
    with pytest.raises(Exception) as raised:
        for _ in batches:
            pass
    line = user_message(raised.value, [])
    assert line is not None and line.startswith("data.path: the prepared chunk ")
    assert "train/chunk-" in line and " is missing" in line and f"--output {data_dir}`" in line
    with pytest.raises(InputError, match=r"chunk .* is missing \(and \d+ more\)"):
        PileDataModule(
            path=str(data_dir), seq_len=16, batch_size=2, num_workers=0, val_batches=1, primitives_size=0
        ).train_dataloader()
    # a chunk cut short (a copy interrupted) is named with its size, before any step
    again = prepared_pile(tmp_path / "again", shards=2, per_shard=60, val_fraction=0.1, workers=1)
    chunk = sorted((again / "train").glob("chunk-*.bin"))[2]
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(InputError, match=rf"chunk {chunk} is truncated \(100 of \d+ bytes\); prepare the data"):
        PileDataModule(path=str(again), seq_len=16, batch_size=2, val_batches=1, primitives_size=0).train_dataloader()


def test_simulated_faults_plan_is_seeded_and_increasing():
    plan = SimulatedFaults(kills=5, seed=7).moments(last_step=40, world_size=2)
    assert plan == SimulatedFaults(kills=5, seed=7).moments(last_step=40, world_size=2)
    steps = [m["step"] for m in plan]
    assert steps == sorted(set(steps)) and all(1 <= s <= 40 for s in steps)
    assert all(m["rank"] == 0 for m in plan if m["place"] == "publishing")
    with pytest.raises(ValueError, match="places must be some of"):
        SimulatedFaults(places=("sideways",))
