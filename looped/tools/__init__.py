"""Tools around training, each a ``looped TOOL`` subcommand or its helper: they read runs, never train.

``prepare`` (text -> token chunks), ``report`` (tables and figures from TensorBoard logs),
``sweep`` (grids of runs), ``lm_eval_adapter`` (lm-evaluation-harness), ``plan`` (memory per rank
and days of a recipe's job, before it runs), and their helpers ``analysis``, ``study``, ``plots``
(figures shared with the callbacks), ``memory`` (one training step measured on fake tensors) and
``resolve`` (a recipe resolved as ``looped fit`` does, without a trainer).
"""
