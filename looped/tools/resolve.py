"""A recipe resolved as ``looped fit`` resolves it, without a trainer, and without its data module if need be.

``looped plan`` needs the module a recipe builds (its transformer on the meta device) and the
trainer's settings, not a trainer; and it must work before the data is prepared: a data module
such as ``PileDataModule`` reads ``data.path`` in its constructor. ``RecipeCLI`` is ``LoopedCLI``
(the same parser, config files, overrides and data links) that stops there; with a stand-in
vocabulary it does not build the data module at all.
"""

from __future__ import annotations

import argparse
import contextlib
import io

from looped.cli import LoopedCLI
from looped.errors import InputError
from looped.training.module import transformer_on_meta


class RecipeCLI(LoopedCLI):
    """``looped fit``'s parser, overrides and links; builds the module (transformer on meta) and data, no trainer.

    With ``stand_in_vocab`` the data module is not built: the links from it are left out and the
    model gets that vocabulary and the data's ``seq_len`` argument instead.
    """

    def __init__(self, args: list[str], stand_in_vocab: int | None = None) -> None:
        self.stand_in_vocab = stand_in_vocab
        super().__init__(args=args, run=False, parser_kwargs={"exit_on_error": False})

    def add_arguments_to_parser(self, parser) -> None:
        if self.stand_in_vocab is None:
            super().add_arguments_to_parser(parser)

    def parse_arguments(self, parser, args) -> None:
        if self.stand_in_vocab is None:
            return super().parse_arguments(parser, args)
        # The data section may lack what only the data module needs (data.path): it is not built.
        self.config = parser.parse_args(args, _skip_validation=True)
        checked = self.config.clone()
        checked.data = None
        parser.validate(checked, skip_required=True)

    def _add_instantiators(self) -> None:
        # They dump the whole config as the module's hyperparameters (for checkpoints, none here), which
        # validates the data section a stand-in leaves incomplete.
        if self.stand_in_vocab is None:
            super()._add_instantiators()

    def instantiate_classes(self) -> None:
        config = self.config
        if self.stand_in_vocab is not None:
            data_args = config.data.get("init_args") or {}
            if data_args.get("seq_len") is None:
                raise InputError(
                    f"--vocab-size: {config.data.get('class_path')} takes no seq_len argument to stand in with; "
                    "drop --vocab-size and let the data module be built"
                )
            config = config.clone()
            config.model.init_args.config.vocab_size = self.stand_in_vocab
            config.model.init_args.config.max_seq_len = data_args.seq_len
            config.data = None
        self.batch_size = (self.config.data.get("init_args") or {}).get("batch_size")
        self.instantiation_config = config
        self.config_init = self.instantiate()
        self.model, self.datamodule = self.config_init.model, self.config_init.get("data")

    def instantiate(self):
        """The recipe's classes, built afresh (each measurement wraps its own module), the transformer on meta."""
        with transformer_on_meta():
            return self.parser.instantiate_classes(self.instantiation_config)


def resolve(recipe: str, overrides: list[str], vocab_size: int | None) -> RecipeCLI:
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return RecipeCLI(["--config", recipe, *overrides], stand_in_vocab=vocab_size)
    except InputError:
        raise
    except (argparse.ArgumentError, TypeError, ValueError, FileNotFoundError) as err:
        message = reason(str(err))
        if "data" in message and not vocab_size:
            message += "; to plan without the prepared data, add --vocab-size V (its tokenizer's)"
        raise InputError(f"{recipe}: {message}") from err


def reason(message: str) -> str:
    """The causes inside jsonargparse's nested message ("Does not validate against any of the Union subtypes ...")."""
    lines = [line.strip() for line in message.strip().splitlines()]
    key = lines[0][:-1] + ": " if lines[0].startswith("Parser key") else ""
    causes = []
    for i, line in enumerate(lines):
        if line.startswith("- ") and "NoneType" not in line:
            follows = line.startswith("- Problem with given class_path") and i + 1 < len(lines)
            causes.append(f"{line[2:]} {lines[i + 1]}" if follows else line[2:])
    return key + "; ".join(causes) if causes else " ".join(lines[:2])
