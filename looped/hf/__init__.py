"""A looped transformer as a Hugging Face ``transformers`` model (the ``[hf]`` extra).

``LoopedForCausalLM`` wraps the same ``LoopedTransformer`` that ``LoopedLM`` trains
(``looped/hf/modeling.py``); ``LoopedHFConfig`` holds every ``LoopedConfig`` field
(``looped/hf/config.py``); ``looped export hf`` writes a trained run as a folder that
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` read.

**How ``from_pretrained`` finds the model type ``looped`` without remote code.**
``transformers`` 5 resolves ``config.json``'s ``model_type`` through ``AutoConfig``'s mapping and
the config class through ``AutoModelForCausalLM``'s; a type that is not built in is found only if
``AutoConfig.register`` / ``AutoModelForCausalLM.register`` ran in the process, or through an
``auto_map`` that points at code shipped *in the folder*, which loads only with
``trust_remote_code=True`` and would be a second copy of the model. ``transformers`` has no
plugin entry point, so ``looped`` registers itself: importing any part of ``looped`` (the data
modules, the CLI, this package) installs a post-import hook, and the moment
``transformers.models.auto.configuration_auto`` or ``...modeling_auto`` finishes loading (the
first ``AutoConfig`` / ``AutoModelForCausalLM`` use), the config (respectively the model) is
registered; if they are already loaded, at once. Registering eagerly on ``import looped`` would
import ``transformers`` (seconds) into every training run and every ``looped`` command; the hook
costs one ``find_spec`` and registers only for a process that uses ``transformers``'s ``Auto``
classes. The config is registered from a module that imports only
``transformers.configuration_utils``, because ``configuration_auto`` is also loaded while
``transformers.modeling_utils`` itself is being imported.

So: ``import looped`` (or any ``looped.*``), then ``AutoModelForCausalLM.from_pretrained(OUT_DIR)``.
A process that never imports ``looped`` (``lm_eval`` run as its own command) does not know the
type: run ``looped lm-eval --model hf --model_args pretrained=OUT_DIR ...``, which is
lm-evaluation-harness's own CLI and ``hf`` model with ``looped`` imported.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable
from types import ModuleType

_PUBLIC = {
    "LoopedHFConfig": "looped.hf.config",
    "LoopedForCausalLM": "looped.hf.modeling",
    "LoopedCache": "looped.hf.modeling",
    "from_looped": "looped.hf.modeling",
    "to_looped": "looped.hf.modeling",
    "vocab_tokenizer": "looped.hf.tokenization",
    "byte_tokenizer": "looped.hf.tokenization",
    "file_tokenizer": "looped.hf.tokenization",
}
__all__ = [*_PUBLIC, "register"]

CONFIG_AUTO = "transformers.models.auto.configuration_auto"
MODEL_AUTO = "transformers.models.auto.modeling_auto"


def __getattr__(name: str):
    # PEP 562: ``import looped.hf`` stays light; a name is loaded (with transformers) when first used.
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'looped.hf' has no attribute {name!r}")


def register_config(configuration_auto: ModuleType) -> None:
    """``AutoConfig`` learns ``model_type: looped``."""
    from looped.hf.config import MODEL_TYPE, LoopedHFConfig

    configuration_auto.CONFIG_MAPPING.register(MODEL_TYPE, LoopedHFConfig, exist_ok=True)


def register_model(modeling_auto: ModuleType) -> None:
    """``AutoModelForCausalLM`` learns ``LoopedHFConfig -> LoopedForCausalLM``.

    The type is also listed by name among the causal LMs, where tools that take any causal LM
    look (the ``text-generation`` pipeline, lm-evaluation-harness's ``hf`` model).
    """
    from looped.hf.config import MODEL_TYPE, LoopedHFConfig
    from looped.hf.modeling import LoopedForCausalLM

    modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING.register(LoopedHFConfig, LoopedForCausalLM, exist_ok=True)
    modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(MODEL_TYPE, LoopedForCausalLM.__name__)


HOOKS: dict[str, Callable[[ModuleType], None]] = {CONFIG_AUTO: register_config, MODEL_AUTO: register_model}


def register() -> None:
    """Register the ``looped`` model type with ``AutoConfig`` and ``AutoModelForCausalLM`` now (idempotent)."""
    for name, hook in HOOKS.items():
        hook(importlib.import_module(name))


def run_hook(name: str, module: ModuleType) -> None:
    try:
        HOOKS[name](module)
    except Exception as err:  # a transformers we do not fit must not break the user's own import of it
        warnings.warn(f"looped: could not register the 'looped' model type with transformers: {err!r}", stacklevel=2)


class _RunAfter(importlib.abc.Loader):
    """Wraps a module's loader: executes the module, then its hook."""

    def __init__(self, loader: importlib.abc.Loader, name: str) -> None:
        self.loader, self.name = loader, name

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        run_hook(self.name, module)

    def __getattr__(self, attr: str):  # get_source, get_resource_reader, ...: the real loader's
        return getattr(self.loader, attr)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds the hooked modules through the other finders and wraps their loaders (a post-import hook)."""

    def find_spec(self, name: str, path=None, target=None):
        if name not in HOOKS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RunAfter(spec.loader, name)
                return spec
        return None


def register_on_import() -> None:
    """Register with ``transformers`` when (and if) its ``Auto`` classes load; at once if they have. Cheap."""
    if any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        return
    if importlib.util.find_spec("transformers") is None:
        return  # the [hf] extra is not installed
    sys.meta_path.insert(0, _AfterImport())
    for name in HOOKS:
        if name in sys.modules:
            run_hook(name, sys.modules[name])
