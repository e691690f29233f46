"""Relaxation (Bae et al., *Relaxed Recursive Transformers*): a low-rank adapter per loop on the shared block.

With ``LoopedConfig.lora_rank = r > 0`` every loop n = 1..L owns, for each block layer, a pair ``A [r' in]``,
``B [out r']`` per linear weight W (r' = min(r, in, out): a rank above a layer's full rank is clipped to it) and
its own copy of every vector of the layer (norm scales and shifts, linear biases; d numbers each). Loop n runs
the block with ``W + B·A`` and its own vectors — ``LoopedTransformer.loop_step`` reads ``step.loop`` and calls
the layer through ``torch.func.functional_call`` with those tensors, so the layers themselves are unchanged.
``looped retrofit --lora-rank`` initialises ``B·A`` as the truncated SVD of (the original layer that the
application replaces − the shared layer): at full rank the relaxed ``(k⊗L)`` *is* the source model. Tied to the
block (``tie_to``: ``B = 0``, vectors equal to the shared ones) it is the plain looped model, as at rank 0 (no
adapters at all).

**Loops beyond L** (``forward(loops=n > L)``, ``num_loops`` in the ``transformers`` model, which runs this same
forward): loop n > L reuses loop L's adapters and vectors — the last relaxed block repeated. Fewer loops than L
use the first n.

Not supported with the adapters (refused where they meet): rows at different loops in one step (depth-wise
decoding), and activation checkpointing that recomputes a layer in backward outside this call (the recompute
would see the shared weights without the adapter).

Why not ``peft``: peft wraps each ``nn.Linear`` with one set of adapters that is *active* for the whole module;
per-loop adapters on a shared block would mean switching the active adapter between loops inside one forward
(mutating module state mid-forward, which activation checkpointing's recompute and ``torch.compile`` do not
see), its per-adapter copies of other modules (``modules_to_save``) copy whole modules rather than the block's
vectors per loop, its SVD initialisations (PiSSA, LoftQ) factor W itself, not a difference between two
layers, and it would make the torch-only model layer depend on it. A per-loop ``W + B·A`` is a few lines.

Dimension letters: r rank, i in features, o out features.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def key(name: str) -> str:
    """A parameter path as a ``ParameterDict`` key (no dots)."""
    return name.replace(".", "__")


class LayerRelaxation(nn.Module):
    """One loop's adapters for one block layer: ``a[W] [r i]``, ``b[W] [o r]`` per weight, a copy of each vector."""

    def __init__(self, layer: nn.Module, rank: int) -> None:
        super().__init__()
        self.a, self.b, self.vectors = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        for name, p in layer.named_parameters():
            if p.dim() == 2:
                r = min(rank, *p.shape)
                self.a[key(name)] = nn.Parameter(torch.empty(r, p.shape[1], device=p.device, dtype=p.dtype))
                self.b[key(name)] = nn.Parameter(torch.empty(p.shape[0], r, device=p.device, dtype=p.dtype))
            else:
                self.vectors[key(name)] = nn.Parameter(torch.empty_like(p))

    def tensors(self, layer: nn.Module) -> dict[str, Tensor]:
        """The layer's parameters for this loop: ``W + B·A`` for each weight, this loop's vectors."""
        out = {}
        for name, p in layer.named_parameters():
            k = key(name)
            out[name] = p + self.b[k] @ self.a[k] if k in self.a else self.vectors[k]
        return out


class LoopRelaxation(nn.Module):
    """``[loop][block layer]`` of ``LayerRelaxation``: the per-loop LoRA of a ``(k⊗L)`` block."""

    def __init__(self, block: nn.ModuleList, loops: int, rank: int) -> None:
        super().__init__()
        self.loops = nn.ModuleList(nn.ModuleList(LayerRelaxation(layer, rank) for layer in block) for _ in range(loops))

    def tensors(self, loop: int, j: int, layer: nn.Module) -> dict[str, Tensor]:
        """Block layer j's parameters at loop ``loop`` (1-based; beyond L: loop L's)."""
        return self.loops[min(loop, len(self.loops)) - 1][j].tensors(layer)

    @torch.no_grad()
    def tie_to(self, block: nn.ModuleList) -> None:
        """Make every loop the shared block again (``B = 0``, each loop's vectors the shared ones): the plain looped
        model, from which training relaxes each loop."""
        for per_layer in self.loops:
            for relaxation, layer in zip(per_layer, block, strict=True):
                for name, p in layer.named_parameters():
                    if key(name) in relaxation.b:
                        relaxation.b[key(name)].zero_()
                    else:
                        relaxation.vectors[key(name)].copy_(p)

    def ranks(self) -> dict[str, int]:
        """Each weight's rank (one loop's; all loops alike), by ``block.{j}.{path}``: where r was clipped shows."""
        return {
            f"block.{j}.{k.replace('__', '.')}": a.shape[0]
            for j, layer in enumerate(self.loops[0])
            for k, a in layer.a.items()
        }


@torch.no_grad()
def init_from_difference(relax: LayerRelaxation, shared: dict[str, Tensor], original: dict[str, Tensor]) -> None:
    """Set one loop's adapters so the layer becomes ``original`` as far as the rank allows: ``B·A`` is the rank-r
    truncated SVD of ``original − shared`` (split as ``U√S`` and ``√S·Vᵀ``), the vectors are the original's."""
    for name, w in shared.items():
        k = key(name)
        if k in relax.a:
            u, s, vh = torch.linalg.svd(original[name].double() - w.double(), full_matrices=False)
            r = relax.a[k].shape[0]
            root = s[:r].sqrt()
            relax.b[k].copy_(u[:, :r] * root)
            relax.a[k].copy_(root[:, None] * vh[:r])
        else:
            relax.vectors[k].copy_(original[name])
