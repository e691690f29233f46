"""The soak run: a recipe killed with SIGKILL at seeded moments, restarted by torchrun, against an uninterrupted run.

Two runs of the same recipe (and overrides), in one folder:

* ``reference``: ``looped fit --config RECIPE``, uninterrupted;
* ``killed``: the same under ``torchrun --max-restarts KILLS ... --ckpt_path auto``, with
  ``looped.callbacks.SimulatedFaults(kills=KILLS, seed=SEED)`` added to the recipe's callbacks: SIGKILL after
  a step, inside a save (torn, or written but unpublished) or between the renames that publish it, at
  seeded moments; each restart resumes by itself from the newest complete checkpoint.

It prints every kill (step, place), how many landed inside a save, the losses both runs logged at their
last step, and whether every loss the killed run logged equals the reference's at the same step.

    python benchmarks/soak.py recipes/quickstart.yaml --kills 20 --seed 0 --last-every 10 -- --trainer.max_steps 300

The last line is the killed run's final loss over the reference's (1.000000 when nothing was lost).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from looped.callbacks.faults import recorded
from looped.cli.app import resolve_recipe
from looped.tools.report import logged_by_step


def recipe_with_faults(
    recipe: str, overrides: list[str], out: Path, name: str, faults: dict | None, last_every: int | None
) -> Path:
    """A recipe file: RECIPE and the overrides, its runs under ``out/runs/NAME``, SimulatedFaults added, and
    ``looped.callbacks.Checkpoint``'s ``last_every_n_steps`` set to ``last_every`` (when given)."""
    resolved = yaml.safe_load(resolve_recipe(recipe, *overrides))
    callbacks = resolved["trainer"].get("callbacks") or []
    for callback in callbacks:
        if callback.get("class_path") == "looped.callbacks.Checkpoint" and last_every is not None:
            callback["init_args"]["last_every_n_steps"] = last_every
    if faults is not None:
        callbacks.append({"class_path": "looped.callbacks.SimulatedFaults", "init_args": faults})
    resolved["trainer"]["callbacks"] = callbacks
    resolved["trainer"]["logger"]["init_args"].update(save_dir=str(out / "runs"), name=name)
    resolved["trainer"]["log_every_n_steps"] = 1
    resolved["trainer"]["enable_progress_bar"] = False
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(resolved, sort_keys=False))
    return path


def looped_fit(recipe: Path, launcher: list[str]) -> None:
    looped = Path(sys.executable).with_name("looped")
    command = [*launcher, str(looped), "fit", "--config", str(recipe), "--ckpt_path", "auto"]
    done = subprocess.run(
        command, cwd=recipe.parent, env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True, capture_output=True
    )
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first-step", type=int, default=1)
    parser.add_argument(
        "--last-every",
        type=int,
        default=None,
        help="Checkpoint's last_every_n_steps (a kill loses at most this many steps; default: the recipe's)",
    )
    parser.add_argument("--dir", default=None, help="where the two runs go (default: a temporary folder)")
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []  # the recipe's overrides, after --
    args = parser.parse_args(argv[: len(argv) - len(overrides) - ("--" in argv)])
    args.overrides = overrides

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(args.dir or scratch).absolute()
        out.mkdir(parents=True, exist_ok=True)
        faults = {"kills": args.kills, "seed": args.seed, "first_step": args.first_step}
        looped_fit(recipe_with_faults(args.recipe, args.overrides, out, "reference", None, args.last_every), [])
        torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node=1"]
        torchrun += [f"--max-restarts={args.kills}", "--no-python"]
        looped_fit(recipe_with_faults(args.recipe, args.overrides, out, "killed", faults, args.last_every), torchrun)

        kills = recorded(out / "runs" / "killed" / "faults.jsonl")
        for kill in kills:
            print(f"kill {kill['kill']:>2}: step {kill['global_step']:>5}, {kill['where']}")
        inside = sum(kill["place"] != "step" for kill in kills)
        reference, killed = (
            logged_by_step(out / "runs" / "reference", "train/loss"),
            logged_by_step(out / "runs" / "killed", "train/loss"),
        )
        last = max(reference)
        # A kill right after a save loses that step's log line (Lightning logs it after the save): never its loss.
        missing = sorted(set(reference) - set(killed))
        equal = all(abs(value - reference[step][0]) <= 1e-6 for step, values in killed.items() for value in values)
        print(f"{len(kills)} kills ({inside} inside a save), {len(kills)} restarts; last step {last}")
        print(f"final loss: reference {reference[last][0]:.6f}, killed {killed[last][-1]:.6f}")
        print(f"every logged loss equal to the reference's at its step: {equal} ({len(missing)} steps not logged)")
        print(f"final loss killed / reference: {killed[last][-1] / reference[last][0]:.6f}")


if __name__ == "__main__":
    main()
