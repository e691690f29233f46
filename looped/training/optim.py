"""``torch.optim.Adafactor`` for FSDP2-sharded parameters (the Pile recipes' optimiser).

Stock Adafactor cannot step a ``DTensor`` parameter: its update needs whole-tensor statistics
(row and column means of g², the parameter's RMS for the relative step size, the update's RMS
for clipping), and the in-place ops that compute them are refused on a ``Shard(0)`` tensor
(``aten.pow_.Scalar: in-place operations that require placement changes are not supported``).
Computing those statistics from shards would mean re-deriving Adafactor; ``Adafactor`` here
instead runs the stock update, unchanged, on the whole tensor, one parameter at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["Adafactor"]


def _stock_step():
    # Optimizer wraps a class's ``step`` with its hook runner the first time that class is
    # instantiated; our own ``step`` already runs the hooks once, so call the bare stock update.
    step = torch.optim.Adafactor.step
    return step.__wrapped__ if getattr(step, "hooked", False) else step


class Adafactor(torch.optim.Adafactor):
    """``torch.optim.Adafactor`` that also steps FSDP2-sharded (``DTensor``) parameters; same arguments.

    For each ``DTensor`` parameter in turn, ``step`` all-gathers the parameter and its gradient
    (``full_tensor()``), runs the stock Adafactor update on the whole tensors, and keeps only
    this rank's shard of the result (a local slice: ``Replicate`` → the parameter's placements
    needs no communication). Every other parameter goes through the stock update untouched,
    so on an unsharded model this is exactly ``torch.optim.Adafactor``.

    Trade-off: every rank does the elementwise update of every parameter (the optimiser's
    compute is not divided by the number of ranks), and the gradient all-gather costs about as
    much communication as one forward's parameter all-gather, i.e. a step moves about one more
    forward's worth of data. Memory grows by one whole parameter and its gradient at a time,
    never the whole model. The state is kept whole and identical on every rank: the factored
    second moments (``row_var`` [..., n, 1], ``col_var`` [..., 1, m]) are small; a vector
    parameter's ``variance`` (norm weights, biases) is the size of the vector. These are plain
    tensors, which ``torch.distributed.checkpoint`` saves once (deduplicated as replicated) and
    loads whole on any number of ranks, so sharded checkpoints save and resume as usual.
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        from torch.distributed.tensor import DTensor, Replicate

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups, stock = self.param_groups, _stock_step()
        sharded = [(g, p) for g in groups for p in g["params"] if isinstance(p, DTensor) and p.grad is not None]
        try:
            # Plain parameters: one stock step over every group, DTensors hidden.
            plain = [{**g, "params": [p for p in g["params"] if not isinstance(p, DTensor)]} for g in groups]
            self.param_groups = [g for g in plain if g["params"]]
            stock(self)
            for group, p in sharded:
                whole = p.full_tensor()
                whole.grad = p.grad.full_tensor()
                if p in self.state:  # the stock step finds (or creates) the state under the whole tensor
                    self.state[whole] = self.state.pop(p)
                self.param_groups = [{**group, "params": [whole]}]
                try:
                    stock(self)
                finally:
                    if whole in self.state:
                        self.state[p] = self.state.pop(whole)
                replicated = DTensor.from_local(
                    whole, p.device_mesh, [Replicate()] * p.device_mesh.ndim, run_check=False
                )
                p.copy_(replicated.redistribute(p.device_mesh, p.placements))
        finally:
            self.param_groups = groups
        return loss


# Its public path, the one recipes and saved runs name and a resolved config writes (jsonargparse writes a class
# by its module's path): looped.optim, kept by looped.moved, as numpy sets ``__module__`` to ``numpy``.
Adafactor.__module__ = "looped.optim"
