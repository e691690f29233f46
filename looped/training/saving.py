"""Crash-safe checkpoint saves, and the newest complete checkpoint of a run for ``--ckpt_path auto``.

A checkpoint becomes visible under its name only when it is complete. ``save_checkpoint`` has the
trainer write it under a temporary name beside its target (``.NAME.partial``: a file, or the folder
of shards ``ModelParallelStrategy`` writes), waits until every rank has written its part, and only
then has rank 0 publish it with a rename. The checkpoint it replaces stays on disk until then:

* a file replaces the old one with one ``os.replace`` (atomic: the name holds the old or the new);
* a folder cannot be replaced by a rename, so the old one is first renamed ``.NAME.previous``, the
  new one takes the name, and the old one is deleted. A kill between those renames leaves a complete
  ``.NAME.previous``, which ``complete_checkpoints`` still offers for a resume.

Lightning writes a single file through an fsspec transaction whose temporary file lives in the
system's temporary folder, so the final ``shutil.move`` is a copy when that is another filesystem;
and ``ModelParallelStrategy`` writes its shards *into* an existing folder. Neither survives a kill in
the middle (issue 34); both survive it here. A kill (SIGKILL, the OOM killer, a pre-emption) leaves
the operating system's page cache to finish the write; a power loss or a kernel crash does not, and
``fsync=True`` syncs the files before they are published for that (torch.distributed.checkpoint already
syncs its shards; measured on this machine's disk, a single file with it took 0.7-1.7x Lightning's save
time, as the page cache's writeback allowed, and 0.86-1.07x without: docs/benchmarks.md).

A full disk during a save (ENOSPC) removes the partial write and raises ``CheckpointWriteError`` (an
``InputError``: one line, exit status 2) naming the checkpoint that is still intact.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from looped.errors import InputError, exception_chain

PARTIAL = ".partial"
PREVIOUS = ".previous"
LAST = "last.ckpt"
INTERRUPTED = "interrupted.ckpt"
KEPT = re.compile(r"^last-step=(\d+)\.ckpt$")
"""A former ``last.ckpt`` kept under its step's name (``Checkpoint(keep_last=K)``)."""


class CheckpointWriteError(InputError):
    """A save that could not be written (a full disk); the previous checkpoint is untouched."""


def partial_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}{PARTIAL}")


def previous_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}{PREVIOUS}")


def kept_name(step: int) -> str:
    return f"last-step={step:07d}.ckpt"


def save_checkpoint(
    trainer: Any,
    path: str | Path,
    weights_only: bool = False,
    keep_as: str | Path | None = None,
    fsync: bool = False,
) -> None:
    """``trainer.save_checkpoint(path)``, crash-safe: written as ``.NAME.partial``, renamed once every rank is done.

    ``keep_as``: rename the checkpoint ``path`` held until now to this name instead of deleting it. ``fsync``:
    sync the files to the disk before publishing (survives a power loss too). Every rank calls this (as it calls
    ``trainer.save_checkpoint``).
    """
    path = Path(path)
    partial = partial_path(path)
    strategy = trainer.strategy
    if trainer.is_global_zero:
        remove(partial)  # a save a kill interrupted
        path.parent.mkdir(parents=True, exist_ok=True)
    strategy.barrier("looped.save_checkpoint:clean")
    try:
        trainer.save_checkpoint(partial, weights_only)
    except Exception as error:
        if trainer.is_global_zero:
            remove(partial)
        if disk_full(error):
            kept = path if path.exists() else None
            raise CheckpointWriteError(
                f"the disk is full: saving {path} failed (No space left on device) and the partial write was removed; "
                + (f"{kept} is intact. " if kept else "")
                + "Free space (or point the run's save_dir elsewhere) and re-run the same command with --ckpt_path auto"
            ) from error
        raise
    strategy.barrier("looped.save_checkpoint:written")  # every rank's part is on disk
    if trainer.is_global_zero:
        for logger in trainer.loggers:  # what was logged up to here reaches the disk with the checkpoint
            logger.save()
        publish(partial, path, keep_as, fsync)
    strategy.barrier("looped.save_checkpoint:published")


def publish(partial: Path, path: Path, keep_as: str | Path | None = None, fsync: bool = False) -> None:
    """Give the complete ``partial`` the name ``path``; the old ``path`` is kept as ``keep_as`` or deleted."""
    if fsync:
        sync(partial)
    if keep_as is not None and path.exists():
        os.replace(path, keep_as)
    if partial.is_dir() or path.is_dir():
        previous = previous_path(path)
        remove(previous)
        if path.exists():
            os.replace(path, previous)
        os.replace(partial, path)
        remove(previous)
    else:
        os.replace(partial, path)  # atomic: the name holds the old checkpoint or the new one
    if fsync:
        sync_folder(path.parent)  # the renames, on the disk


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def sync(path: Path) -> None:
    """fsync a file, or every file of a folder, and the folder itself."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    if path.is_dir():
        sync_folder(path)


def sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory file descriptors (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def disk_full(error: BaseException) -> bool:
    """True when ``error`` (or what it wraps: DCP's CheckpointException, torch's writer errors) is ENOSPC."""
    return any(
        getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e) for e in exception_chain(error)
    )


# -- finding a run's checkpoints again ------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A checkpoint ``--ckpt_path auto`` may resume: its path, run version and step (``-1`` when unreadable)."""

    path: Path
    version: int | None
    step: int


def is_partial(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(PARTIAL)


def checkpoint_files(folder: Path) -> list[Path]:
    """The published checkpoints in ``folder`` (``*.ckpt`` files and shard folders) and a ``.NAME.previous``
    left between the two renames of a folder's publication; never a ``.partial`` one."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        if is_partial(path):
            continue
        if path.name.endswith(".ckpt") and not path.name.startswith("."):
            found.append(path)
        elif path.name.startswith(".") and path.name.endswith(".ckpt" + PREVIOUS):
            if not (folder / path.name[1 : -len(PREVIOUS)]).exists():  # only when the new one never took the name
                found.append(path)
    return sorted(found)


def version_number(folder: Path) -> int | None:
    match = re.fullmatch(r"version_(\d+)", folder.name)
    return int(match.group(1)) if match else None


@dataclass
class Resume:
    """What ``--ckpt_path auto`` found: the checkpoint to resume (None: a fresh start), its run version, and every
    checkpoint it passed over with the reason (incomplete, corrupt, another recipe's)."""

    path: Path | None
    version: int | None
    step: int | None
    skipped: list[str]


def find_resume(run_dir: str | Path, recipe_config: dict[str, Any] | None, folders: list[Path] = ()) -> Resume:
    """The newest complete checkpoint of the run ``run_dir`` (``save_dir/name`` of its logger) that fits the recipe.

    The newest run version that holds one wins (a re-run continues the run it restarts, not an older one), and in
    it the highest step (interrupted, last, periodic or best alike). Each candidate is read (its small parts only)
    and checked against the recipe's ``LoopedConfig``; one that fails is passed over and named in ``skipped``.
    ``folders``: checkpoint folders a recipe names itself (a ``dirpath``), searched after the versions.
    """
    from looped.training.checkpoint import check_same_model, read_checkpoint

    run_dir = Path(run_dir)
    groups: list[tuple[int | None, Path]] = []
    if run_dir.is_dir():
        versions = [(version_number(p), p) for p in run_dir.iterdir() if p.is_dir()]
        groups = [(n, p / "checkpoints") for n, p in sorted((v for v in versions if v[0] is not None), reverse=True)]
    groups += [(None, Path(folder)) for folder in folders]
    skipped: list[str] = []
    for version, folder in groups:
        readable = []
        for path in checkpoint_files(folder):
            try:
                state = read_checkpoint(path, "--ckpt_path auto:")
                if recipe_config is not None:
                    check_same_model(state, recipe_config, path)
            except InputError as error:
                skipped.append(f"{path} ({short_reason(error)})")
                continue
            readable.append((int(state.get("global_step", -1)), path.stat().st_mtime, path))
        if readable:
            step, _, path = max(readable, key=lambda item: (item[0], item[1]))
            return Resume(path, version, step, skipped)
    return Resume(None, None, None, skipped)


def short_reason(error: InputError) -> str:
    """Why a candidate was passed over, in a few words."""
    text = str(error)
    changes = text.partition("checkpoint → recipe: ")[2].partition(")")[0]
    reasons = {
        "is truncated or corrupt": "truncated or corrupt",
        "is a directory but not a sharded checkpoint": "an incomplete shard folder (no .metadata or meta.pt)",
        "holds another model than the recipe": f"another recipe's model: {changes}",
        "not a checkpoint": "not a checkpoint",
        "not a Lightning checkpoint": "not a Lightning checkpoint",
    }
    return next((reason for marker, reason in reasons.items() if marker in text), text.split(";")[0])
