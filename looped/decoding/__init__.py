"""Decoding a ``LoopedTransformer`` (torch only): greedy generation with a cache, every token at full depth or
stopping at its own loop by an exit rule, on the synchronous or the depth-wise schedule.

* ``greedy`` — ``generate`` (``LoopedTransformer.generate``) and the loop over new tokens;
* ``exit_rules`` — the exit rules, one definition each, used here online and by ``looped.evaluation`` offline;
* ``per_token`` — per-token exit, the synchronous schedule: a token's rows loop together, stopped rows leave;
* ``depthwise`` — per-token exit, depth-wise batching: every row at its own token and loop.

Each applies the shared block through ``LoopedTransformer.loop_step`` (``looped.model.step``).
"""
