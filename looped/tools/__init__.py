"""Tools around training, each a ``looped TOOL`` subcommand or its helper: they read runs, never train.

``prepare`` (text -> token chunks), ``report`` (tables and figures from TensorBoard logs),
``sweep`` (grids of runs), ``lm_eval_adapter`` (lm-evaluation-harness), and their helpers
``analysis``, ``study`` and ``plots`` (figures shared with the callbacks).
"""
