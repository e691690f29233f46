"""What do the loop readers cost in the Lightning loop? Evaluation with every loop-reading callback on
vs a bare forward to ``max_eval_loops`` loops.

``LoopedLM`` runs each evaluation batch ONCE, to the deepest loop any callback reads, takes its own
metrics at the trained L from that pass and shares the per-loop readout with ``PerLoopAccuracy``,
``AdaptiveExit`` and ``LoopDynamics`` (``looped/evaluation/loop_readout.py``). Three ways through the same
``trainer.validate`` / ``trainer.test`` on the same p-hop data and model, timed alternately, round
after round, in one process (medians), so machine noise hits them alike:

* ``bare``: a ``LoopedLM`` whose evaluation step is one forward to ``max_eval_loops`` loops, nothing else;
* ``shared``: ``LoopedLM`` with ``PerLoopAccuracy(perplexity=True)`` and ``LoopDynamics`` (validate;
  and ``AdaptiveExit`` at test): one pass per batch;
* ``unshared``: the same callbacks, each running its own forward (what the evaluation cost before
  the pass was shared: the module's forward to L plus one per reader).

    python benchmarks/eval_pass.py

The last two lines are the ratios shared / bare, for validate and test (target <= 1.15).
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch

from looped import LoopedConfig, LoopedLM
from looped.callbacks import AdaptiveExit, LoopDynamics, PerLoopAccuracy
from looped.datamodules import PHop


class Bare(LoopedLM):
    """The floor: an evaluation step that only runs the model to ``max_eval_loops`` loops."""

    max_eval_loops = 0

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.model(batch["input_ids"], loops=self.max_eval_loops)

    test_step = validation_step


class Unshared(LoopedLM):
    """Every loop reader runs its own forward: no shared evaluation pass."""

    def eval_depth(self, stage: str) -> None:
        return None


def readers(max_eval_loops: int, stage: str) -> list[L.Callback]:
    found = [PerLoopAccuracy(max_eval_loops, perplexity=True), LoopDynamics(max_eval_loops)]
    return found + ([AdaptiveExit(max_eval_loops)] if stage == "test" else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--loops", type=int, default=4, help="L (the quickstart's)")
    parser.add_argument("--max-eval-loops", type=int, default=8, help="loops the readers read (default 2L)")
    parser.add_argument("--length", type=int, default=32, help="p-hop sequence length (the quickstart's)")
    parser.add_argument("--samples", type=int, default=1024, help="validation and test samples each")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)

    data = PHop(length=args.length, hops=3, val_size=args.samples, test_size=args.samples, eval_batch_size=256)
    config = LoopedConfig(
        vocab_size=data.vocab_size, max_seq_len=data.seq_len, d_model=args.d_model, n_heads=4, loops=args.loops
    )
    modules = {"bare": Bare(config), "shared": LoopedLM(config), "unshared": Unshared(config)}
    modules["bare"].max_eval_loops = args.max_eval_loops
    for module in modules.values():
        module.load_state_dict(modules["shared"].state_dict())
    times: dict[tuple[str, str], list[float]] = {}
    order = list(modules)
    for r in range(args.rounds + 1):  # round 0 warms up, untimed
        for name in order[r % len(order) :] + order[: r % len(order)]:
            for stage in ("validate", "test"):
                trainer = L.Trainer(
                    accelerator="cpu",
                    devices=1,
                    logger=False,
                    callbacks=[] if name == "bare" else readers(args.max_eval_loops, stage),
                    enable_progress_bar=False,
                    enable_model_summary=False,
                    enable_checkpointing=False,
                )
                run = trainer.validate if stage == "validate" else trainer.test
                start = time.perf_counter()
                run(modules[name], datamodule=data, verbose=False)
                if r:
                    times.setdefault((name, stage), []).append(time.perf_counter() - start)

    print(
        f"cpu, fp32, {torch.get_num_threads()} threads; p-hop n={args.length}, {args.samples} samples per stage; "
        f"(1⊗{args.loops}) d_model {args.d_model}, readers to {args.max_eval_loops} loops; "
        f"median of {args.rounds} rounds"
    )
    print(f"{'evaluation':<12} {'validate s':>11} {'test s':>8}")
    median = {key: statistics.median(t) for key, t in times.items()}
    for name in modules:
        print(f"{name:<12} {median[name, 'validate']:>11.3f} {median[name, 'test']:>8.3f}")
    for stage in ("validate", "test"):
        ratio = median["shared", stage] / median["bare", stage]
        print(f"{stage}: shared / bare forward to {args.max_eval_loops} loops time ratio (target <= 1.15): {ratio:.3f}")


if __name__ == "__main__":
    main()
