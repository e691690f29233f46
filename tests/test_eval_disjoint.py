"""No recipe ever trains on a validation or test sample, for every synthetic task."""

import importlib

import pytest

from conftest import RECIPE_ROWS, golden
from looped.datamodules.base import SyntheticTask, rows_as_keys


def data_class(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def synthetic_data_settings():
    """Distinct (data class, arguments, training batches) over the recipes; rows of a table share one."""
    settings = {}
    for path in RECIPE_ROWS:
        recipe = golden(path)  # base and defaults included, as tests/test_recipes.py checks
        class_path = recipe.get("data", {}).get("class_path", "")
        if not class_path or not issubclass(data_class(class_path), SyntheticTask):
            continue
        if class_path.endswith(".Arc"):  # ARC's evaluation sets are its tasks' test pairs, not draws of a size:
            continue  # tests/test_arc.py (test_training_never_holds_an_evaluation_row) checks them
        args = {k: v for k, v in recipe["data"].get("init_args", {}).items() if k != "num_workers"}
        key = class_path + repr(sorted(args.items()))
        batches = max(recipe["trainer"]["max_steps"], settings.get(key, (None, None, 0, ""))[2])
        settings[key] = (class_path, args, batches, path.stem)
    # The paper-sized sets (10^4-10^5 evaluation samples) take seconds each: slow; the CPU-sized stay everyday.
    return [
        pytest.param(*values, marks=[] if values[1].get("test_size", 0) <= 4096 else [pytest.mark.slow])
        for values in settings.values()
    ]


@pytest.mark.parametrize(
    "class_path, args, max_steps, name", synthetic_data_settings(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_no_training_sample_is_evaluated(class_path, args, max_steps, name):
    """Every training sample a recipe's run can draw (up to 50k here) is absent from every val and test set."""
    # A fixed training set (data.train_size) is drawn chunk by chunk, so its first 20k samples are
    # exactly the set a smaller train_size draws: check that prefix instead of building millions.
    if args.get("train_size"):
        args = {**args, "train_size": min(args["train_size"], 20_000)}
    task = data_class(class_path)(**args)
    eval_keys: set[bytes] = set()
    for purpose, size in ((1, task.val_size), (2, task.test_size)):
        for name in task.eval_names or [None]:  # each named set, or the single one
            keys = rows_as_keys(task.eval_set(purpose, name)[0])
            assert len(set(keys)) == len(keys) == size
            assert not eval_keys & set(keys)  # disjoint from every set drawn before
            eval_keys |= set(keys)
    for index in range(min(max_steps, 50_000 // task.batch_size)):
        x, _ = task.train_batch(rank=0, index=index)
        assert not eval_keys.intersection(rows_as_keys(x))
