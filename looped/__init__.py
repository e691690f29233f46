"""Looped transformers: a block of k layers applied L times with shared weights, ``(k⊗L)``.

``looped.LoopedConfig`` and ``looped.LoopedTransformer`` need only torch; ``looped.LoopedLM``
(the LightningModule) loads Lightning when it is first used, so ``import looped.model``
stays light (inference, export, the model inside other code). With the ``[hf]`` extra,
``transformers``' ``AutoConfig`` / ``AutoModelForCausalLM`` learn the model type ``looped`` when
they load (``looped.hf``), so an exported folder loads with ``from_pretrained`` alone.
"""

from looped import moved
from looped.hf import register_on_import
from looped.model import LoopedConfig, LoopedTransformer

moved.install()  # the module paths from before the folders (looped.module, looped.optim, ...) keep resolving
register_on_import()  # one find_spec; transformers itself is imported only by whoever uses it

__all__ = ["DeepSupervision", "LoopedConfig", "LoopedLM", "LoopedTransformer"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # PEP 562: recipes name ``looped.LoopedLM``; importing it here eagerly would pull in Lightning.
    if name == "LoopedLM":
        from looped.training.module import LoopedLM

        return LoopedLM
    if name == "DeepSupervision":  # the recursive reasoners' training (TRM, HRM), also Lightning
        from looped.training.deep_supervision import DeepSupervision

        return DeepSupervision
    raise AttributeError(f"module 'looped' has no attribute {name!r}")
