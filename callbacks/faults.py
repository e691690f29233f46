"""``SimulatedFaults``: SIGKILL this job at seeded moments, to show that a restart loses nothing.

A cluster job dies without warning: an OOM kill, a lost node, a pre-emption with no grace period. This
callback is that death on demand, for the fault-injection tests and the soak run (docs/recipes.md, "When
something goes wrong"). Run a recipe with it under a restarter — ``torchrun --max-restarts N ... --ckpt_path
auto`` — and the job is killed ``kills`` times, each time restarted, each time resuming by itself.

The moments are drawn from ``seed`` and printed before each kill, so a failure can be replayed. Each one is a
step and a place:

* ``step``: after that optimiser step (between saves);
* ``torn``: inside the first save at or after that step, its write half done (the partial checkpoint cut
  to half its bytes, or half its shard files deleted: what a kill mid-write leaves);
* ``written``: inside that save, every byte written on this rank but not yet published;
* ``publishing``: inside that save's publication, between its renames (rank 0, which publishes);
* ``sigterm``: after that step, SIGTERM instead of SIGKILL — a pre-emption with a grace period. Lightning
  finishes the step, ``InterruptCheckpoint`` saves ``interrupted.ckpt`` and prints the command that resumes,
  and the job exits with status 143 (128 + SIGTERM). Drawn only when ``places`` names it.

In a multi-process job one rank (drawn too) kills itself; the restarter kills the rest. Each kill is appended
to ``record`` (JSON lines, fsync'ed before the kill) and the next attempt reads it to move on to the next
moment; the moments' steps increase, so every restart makes progress and the job ends.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
from pathlib import Path

import lightning as L

from looped.training import saving

PLACES = ("step", "torn", "written", "publishing")  # the default draw: SIGKILLs
SIGTERM_PLACE = "sigterm"


class SimulatedFaults(L.Callback):
    """Kill the job with SIGKILL (or SIGTERM) at ``kills`` seeded moments in steps ``first_step..last_step``.

    Args:
        kills: how many times to kill the job (the restarter needs ``--max-restarts`` at least this).
        seed: draws the moments (step, place, rank).
        first_step, last_step: the steps the moments are drawn from (``last_step`` defaults to
            ``trainer.max_steps - 1``).
        places: the places to draw from (``step``, ``torn``, ``written``, ``publishing``; ``sigterm``).
        record: where the kills are recorded; default ``<save_dir>/<name>/faults.jsonl`` (beside the
            run's ``version_N`` folders, so every attempt reads the same one).
    """

    def __init__(
        self,
        kills: int = 1,
        seed: int = 0,
        first_step: int = 1,
        last_step: int | None = None,
        places: tuple[str, ...] = PLACES,
        record: str | None = None,
    ) -> None:
        known = (*PLACES, SIGTERM_PLACE)
        unknown = [p for p in places if p not in known]
        if unknown or not places:
            raise ValueError(f"places must be some of {', '.join(known)}; got {', '.join(places) or 'none'}")
        self.kills, self.seed, self.first_step, self.last_step = kills, seed, first_step, last_step
        self.places = tuple(places)
        self.record = record
        self.plan: list[dict] = []
        self.done = 0

    def moments(self, last_step: int, world_size: int) -> list[dict]:
        """The seeded plan: ``kills`` moments at distinct, increasing steps."""
        rng = random.Random(self.seed)
        span = range(self.first_step, last_step + 1)
        if self.kills > len(span):
            raise ValueError(f"{self.kills} kills need as many distinct steps; steps {span.start}..{last_step}")
        steps = sorted(rng.sample(span, self.kills))
        plan = []
        for i, step in enumerate(steps):
            place = rng.choice(self.places)
            rank = 0 if place == "publishing" else rng.randrange(world_size)
            plan.append(dict(kill=i + 1, of=self.kills, seed=self.seed, step=step, place=place, rank=rank))
        return plan

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.record is None:
            self.record = str(Path(trainer.log_dir or trainer.default_root_dir).parent / "faults.jsonl")
        last = self.last_step if self.last_step is not None else max(trainer.max_steps - 1, self.first_step)
        self.plan = self.moments(last, trainer.world_size)
        self.done = len(recorded(self.record))
        if trainer.is_global_zero:
            print(f"SimulatedFaults (seed {self.seed}): {self.done} of {self.kills} kills done", file=sys.stderr)
        self._wrap_saves(trainer)

    @property
    def next(self) -> dict | None:
        return self.plan[self.done] if self.done < len(self.plan) else None

    def _due(self, trainer: L.Trainer, places: tuple[str, ...]) -> dict | None:
        moment = self.next
        if moment is None or moment["place"] not in places or trainer.global_step < moment["step"]:
            return None
        return moment if trainer.global_rank == moment["rank"] else None

    def on_train_batch_end(self, trainer: L.Trainer, *args, **kwargs) -> None:
        moment = self._due(trainer, ("step", SIGTERM_PLACE))
        if moment is not None:
            self._kill(moment, trainer, "after the step")

    def _wrap_saves(self, trainer: L.Trainer) -> None:
        """Kill points inside a save: after this rank's write (torn or whole), and between publication's renames."""
        original_save = trainer.save_checkpoint

        def save_checkpoint(filepath, *args, **kwargs):
            original_save(filepath, *args, **kwargs)
            moment = self._due(trainer, ("torn", "written"))
            if moment is not None and saving.is_partial(Path(filepath)):
                if moment["place"] == "torn":
                    tear(Path(filepath), trainer.global_rank)
                self._kill(moment, trainer, f"inside the save of {Path(filepath).name[1 : -len(saving.PARTIAL)]}")

        trainer.save_checkpoint = save_checkpoint
        original_publish = saving.publish

        def publish(partial, path, keep_as=None, fsync=False):
            moment = self._due(trainer, ("publishing",))
            if moment is None:
                return original_publish(partial, path, keep_as, fsync)
            renames = 0
            replace = os.replace

            def replace_then_die(src, dst):
                nonlocal renames
                replace(src, dst)
                renames += 1
                if renames == 1:  # the old checkpoint moved aside (a folder) or replaced (a file)
                    self._kill(moment, trainer, f"between the renames publishing {path.name}")

            saving.os.replace = replace_then_die  # this process dies inside the call: nothing to restore
            original_publish(partial, path, keep_as, fsync)

        saving.publish = publish

    def _kill(self, moment: dict, trainer: L.Trainer, where: str) -> None:
        entry = {**moment, "global_step": trainer.global_step, "where": where, "pid": os.getpid()}
        with open(self.record, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        kill = signal.SIGTERM if moment["place"] == SIGTERM_PLACE else signal.SIGKILL
        print(
            f"SimulatedFaults: kill {moment['kill']}/{moment['of']} (seed {moment['seed']}): {kill.name} rank "
            f"{moment['rank']} at step {trainer.global_step}, {where}",
            file=sys.stderr,
            flush=True,
        )
        os.kill(os.getpid(), kill)  # SIGTERM returns: Lightning stops after this step


def recorded(path: str | Path) -> list[dict]:
    """The kills a run's record holds (each attempt appends the one it dies of)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tear(partial: Path, rank: int) -> None:
    """Leave ``partial`` as a kill in the middle of its write would: a file cut to half, or half its files gone."""
    if partial.is_dir():
        files = sorted(p for p in partial.iterdir() if p.is_file())
        for file in files[len(files) // 2 :]:
            file.unlink(missing_ok=True)
    elif partial.is_file() and rank == 0:
        size = partial.stat().st_size
        with open(partial, "r+b") as f:
            f.truncate(size // 2)
