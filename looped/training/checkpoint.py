"""What a checkpoint is checked for before a run starts from it: readable, the same model, the same data.

``--ckpt_path`` is read by ``LoopedCLI`` right after the command line is parsed — before
LightningCLI loads the checkpoint's hyper-parameters into the recipe, and before any data is
read or any step is taken — so each mistake is one line naming the path and what it is not:

* a path that does not exist, a file ``torch.save`` did not write, a file cut short
  (``read_checkpoint``);
* a directory that is not a sharded checkpoint (FSDP2 under ``ModelParallelStrategy`` saves
  a folder that torch.distributed.checkpoint wrote, with Lightning's ``meta.pt`` beside it);
* a recipe whose ``LoopedConfig`` differs from the one the checkpoint was trained with
  (``check_same_model``: every differing field, old → new);
* data whose tokenizer or vocabulary differs from the checkpoint's (``check_same_data``).
  ``LoopedLM.on_save_checkpoint`` records the data module's ``tokenizer_sha256`` under
  ``checkpoint["data"]`` for that.

Only the small parts of a checkpoint are read: a ``.ckpt`` file is memory-mapped, so its
tensors are never loaded here.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from looped.errors import MODEL_CONFIG, InputError

AUTO = "auto"
"""``--ckpt_path auto``: the run's newest complete checkpoint (``looped.training.saving.find_resume``)."""
SPECIAL_PATHS = ("last", "best", "hpc", AUTO)
"""``ckpt_path`` values resolved elsewhere (Lightning resolves all but ``auto``; and ``registry:...``): nothing to
read here."""
SHARDED_META = "meta.pt"
"""Lightning's non-tensor state in a sharded checkpoint folder (``lightning.fabric.utilities.load``)."""
SHARDED_INDEX = ".metadata"
"""torch.distributed.checkpoint's index of the shards in the folder."""
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive (since torch 1.6)


def is_local_path(ckpt_path: str | None) -> bool:
    """True for a path on this machine; False for None, Lightning's special values and URLs (s3://...)."""
    if not ckpt_path:
        return False
    text = str(ckpt_path)
    return text not in SPECIAL_PATHS and not text.startswith("registry") and "://" not in text


def read_checkpoint(ckpt_path: str | Path, flag: str = "--ckpt_path") -> dict[str, Any]:
    """The checkpoint's non-tensor state (``hyper_parameters``, ``global_step``, ``data``...), tensors memory-mapped.

    Raises ``InputError`` naming ``flag`` and the path when it is missing, not a checkpoint, or cut short.
    """
    path = Path(ckpt_path)
    if not path.exists():
        raise InputError(
            f"{flag} {path} does not exist; give a checkpoint a run wrote "
            "(runs/NAME/version_N/checkpoints/last.ckpt, or interrupted.ckpt after a stop)"
        )
    if path.is_dir():
        if not (path / SHARDED_META).is_file() or not (path / SHARDED_INDEX).is_file():
            raise InputError(
                f"{flag} {path} is a directory but not a sharded checkpoint (that is a folder written by "
                f"torch.distributed.checkpoint, with {SHARDED_INDEX} and {SHARDED_META}); "
                "give a .ckpt file or a sharded checkpoint folder itself"
            )
        return _torch_load(path / SHARDED_META, flag)
    state = _torch_load(path, flag)
    if not isinstance(state, dict) or "state_dict" not in state:
        raise InputError(
            f"{flag} {path} is a torch file but not a Lightning checkpoint (it has no state_dict); "
            "give a .ckpt file a run wrote"
        )
    return state


def _torch_load(path: Path, flag: str) -> Any:
    with open(path, "rb") as f:
        head = f.read(len(ZIP_MAGIC))
    try:
        # weights_only, as Lightning loads it; mmap: the tensors stay on disk.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=head == ZIP_MAGIC)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, KeyError, EOFError... for bad files
        refused = isinstance(error, pickle.UnpicklingError) and str(error).startswith("Weights only load failed")
        if head == ZIP_MAGIC and refused:  # a whole torch.save archive, of objects beyond plain data
            raise InputError(
                f"{flag} {path} holds Python objects that torch.load(weights_only=True) refuses, and LightningCLI "
                "loads checkpoints that way; LoopedLM's checkpoints hold plain data, so this one was saved by "
                "other code"
            ) from error
        if head == ZIP_MAGIC:  # torch's own zip format, yet unreadable: cut short or damaged
            reason = str(error).strip().split(". ")[0]  # "PytorchStreamReader failed reading zip archive: ..."
            raise InputError(
                f"{flag} {path} is truncated or corrupt ({reason}); the save or a copy was cut short: "
                "use the run's last.ckpt or an earlier checkpoint"
            ) from error
        raise InputError(
            f"{flag} {path} is not a checkpoint: torch.load cannot read it (a run's checkpoints are the .ckpt "
            "files under runs/NAME/version_N/checkpoints/)"
        ) from error


def load_weights(module: Any, ckpt_path: str | Path, key: str, may_lack: tuple[str, ...] = ()) -> None:
    """Copy a checkpoint's weights into ``module`` — not its optimiser, step or data position.

    The checkpoint must hold this module's parameters, with the same shapes; parameters whose names start
    with one of ``may_lack`` may be missing from it (they keep their fresh initialisation). Anything else
    raises ``InputError`` naming ``key`` (the recipe key the path came from).
    """
    path = Path(ckpt_path)
    if path.is_dir():
        raise InputError(
            f"{key} {path} is a sharded checkpoint folder; give a single-file .ckpt (what a run on one device "
            "writes) to start from"
        )
    state = read_checkpoint(path, key)["state_dict"]
    own = module.state_dict()
    problems = {
        "missing": [k for k in own if k not in state and not k.startswith(may_lack)],
        "not in this model": [k for k in state if k not in own],
        "of another shape": [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)],
    }
    found = [f"{what}: {', '.join(keys[:3])}{' ...' * (len(keys) > 3)}" for what, keys in problems.items() if keys]
    if found:
        raise InputError(
            f"{key} {path} holds another model ({'; '.join(found)}); start from a checkpoint of a run with this "
            f"recipe's {MODEL_CONFIG}"
        )
    module.load_state_dict(state, strict=False)


def saved_config(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The ``LoopedConfig`` (as a dict) a ``LoopedLM`` checkpoint was trained with; None for other modules."""
    config = (checkpoint.get("hyper_parameters") or {}).get("config")
    return config if isinstance(config, dict) else None


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``model.init_args.config.FIELD: old → new`` for every field both set (not None) that differs."""
    return [
        f"{MODEL_CONFIG}.{field}: {old[field]!r} → {new[field]!r}"
        for field in new
        if field in old and new[field] is not None and old[field] is not None and old[field] != new[field]
    ]


def check_same_model(checkpoint: dict[str, Any], recipe_config: dict[str, Any], ckpt_path: str | Path) -> None:
    """Refuse a recipe whose ``LoopedConfig`` differs from the checkpoint's, naming every field, old → new.

    LightningCLI would otherwise build the checkpoint's model and silently drop the recipe's values.
    """
    old = saved_config(checkpoint)
    if old is None:
        return
    changes = config_changes(old, recipe_config)
    if changes:
        config_yaml = Path(ckpt_path).resolve().parent.parent / "config.yaml"  # runs/NAME/version_N/config.yaml
        fix = f"`--config {config_yaml}`" if config_yaml.is_file() else "the recipe and overrides it was trained with"
        raise InputError(
            f"--ckpt_path {ckpt_path} holds another model than the recipe (checkpoint → recipe: {'; '.join(changes)}); "
            f"resume with {fix}, or drop --ckpt_path to start a new run"
        )


def check_same_data(checkpoint: dict[str, Any], data: Any, config: Any, where: str = "--ckpt_path") -> None:
    """Refuse data whose tokenizer (``tokenizer_sha256``) or vocabulary differs from the checkpoint's.

    ``data`` is the run's data module (its ``tokenizer_sha256`` is optional), ``config`` the model's ``LoopedConfig``.
    """
    recorded = (checkpoint.get("data") or {}).get("tokenizer_sha256")
    current = getattr(data, "tokenizer_sha256", None)
    path = getattr(data, "path", None)
    if recorded and current and recorded != current:
        raise InputError(
            f"data.path {path} was prepared with another tokenizer (sha256 {current[:12]}…) than the one {where} "
            f"was trained with ({recorded[:12]}…); prepare the data with the checkpoint's tokenizer "
            f"(`looped prepare pile --tokenizer TOKENIZER.json ...`) or give the data.path it was trained on"
        )
    old = saved_config(checkpoint)
    if old is None or data is None:
        return
    # Sizes of tables the data decides: a mismatch would be a state-dict shape error later. The puzzle ids count
    # ARC's tasks × variants (data.tasks, data.augmentations).
    links = {"vocab_size": "vocab_size", "puzzle_ids": "num_puzzle_ids"}
    if old.get("pos_encoding") == "learned":
        links["max_seq_len"] = "seq_len"
    for field, linked_from in links.items():
        new = getattr(config, field, None)
        if old.get(field) is not None and new is not None and old[field] != new:
            raise InputError(
                f"{where} was trained with {MODEL_CONFIG}.{field}={old[field]}, but this run's data "
                f"(data.{linked_from}, linked into it) gives {new}; use the data it was trained on"
            )
