"""The training core (Lightning): ``LoopedLM`` and what it trains with.

* ``module`` — ``LoopedLM``: the loss, metrics, optimiser groups, warmup-cosine, the evaluation pass;
* ``deep_supervision`` — ``DeepSupervision``: TRM's and HRM's training, a state carried across supervision
  steps, the halting Q-head, every step's accuracy;
* ``loop_schedule`` — random loop counts, truncated backpropagation, a per-loop loss;
* ``regularizer`` — the block cosine regulariser (Table 4);
* ``halting`` — learned exits: the Ouro (both stages), PonderNet and ACT objectives;
* ``optim`` — Adafactor that also steps FSDP2-sharded parameters;
* ``parallel`` — FSDP2, activation checkpointing, compile, meta-device init;
* ``checkpoint`` — what a ``--ckpt_path`` (or ``init_weights``) is checked for before a run starts from it.

Recipes name ``looped.LoopedLM``, ``looped.optim.Adafactor`` and ``looped.module.batch_size``: the paths
from before these folders, kept by ``looped.moved``.
"""
