"""The loop-inspired block regulariser of Saunshi et al. 2025 (§5, Eq. 3–4, Table 4).

View an unshared stack of layers as blocks of ``k``. For each parameter group
``G`` (attention Q, K, V, O; FFN W1, W2) the paper defines

    R_G(k) = 1/(L−k) Σ_{i=0}^{L/k−2} Σ_{j=0}^{k−1} cos(θ_G^(ik+j), θ_G^((i+1)k+j))

— the mean cosine between layer ``ik+j`` and the same layer of the next block.
Its intent (and Figure 5, where every group ends ≥ 0.98) is to make
neighbouring blocks *similar*, so the term added to the loss is
``λ · mean_G (1 − R_G)``: minimising it maximises the cosine. (Adding
``+λ·R_G`` as printed would push blocks apart.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from looped.errors import InputError

# Paper group name -> parameter path inside a TransformerLayer.
PARAMETER_GROUPS: dict[str, str] = {
    "q": "attn.q_proj.weight",
    "k": "attn.k_proj.weight",
    "v": "attn.v_proj.weight",
    "o": "attn.o_proj.weight",
    "w1": "ffn.w1.weight",
    "w2": "ffn.w2.weight",
    "w3": "ffn.w3.weight",
    "attn_norm": "attn_norm.weight",
    "ffn_norm": "ffn_norm.weight",
}


def layer_parameter(layer: nn.Module, group: str) -> Tensor:
    return layer.get_parameter(PARAMETER_GROUPS[group])


def block_cosines(layers: nn.ModuleList, block_layers: int, group: str) -> Tensor:
    """``cos(θ^(ik+j), θ^((i+1)k+j))`` for every neighbouring pair, ordered by the lower layer ``ik+j``.

    Returns a ``[n − k]`` tensor (``n`` layers); differentiable.
    """
    return neighbour_cosines([layer_parameter(layer, group) for layer in layers], block_layers)


def neighbour_cosines(weights: list[Tensor], block_layers: int) -> Tensor:
    """``cos(weights[l], weights[l + k])`` for l = 0..n−k−1, each weight flattened (``[n − k]``).

    Separate from ``block_cosines`` so a caller can pass gathered copies of sharded weights.
    """
    if any(_is_dtensor(w) for w in weights):
        return torch.stack([_sharded_cosine(a, b) for a, b in zip(weights[:-block_layers], weights[block_layers:])])
    lower = torch.stack([w.flatten() for w in weights[:-block_layers]])
    upper = torch.stack([w.flatten() for w in weights[block_layers:]])
    return F.cosine_similarity(lower, upper, dim=1)


def _is_dtensor(w: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(w, DTensor)


def _sharded_cosine(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """``cos(a, b)`` of two FSDP2-sharded weights of one shape (hence one shard layout).

    The products are local to each rank's shard; only the three sums are reduced across
    ranks (``full_tensor`` is differentiable), so no rank gathers a whole weight and each
    shard receives its own gradient. Same formula as ``F.cosine_similarity``.
    """
    sums = torch.stack([(a * b).sum(), (a * a).sum(), (b * b).sum()]).full_tensor()
    return sums[0] / torch.sqrt(torch.clamp_min(sums[1] * sums[2], eps * eps))


@dataclass
class BlockRegularizer:
    """``λ · mean_G (1 − R_G(k))`` over the unshared layers of ``model.block``.

    Args:
        block_layers: k, the block size the layers are viewed in (must divide the layer count).
        weight: λ (the paper: 1 and 10).
        groups: parameter groups ``G`` (the paper: q, k, v, o, w1, w2).
    """

    block_layers: int = 4
    weight: float = 10.0
    groups: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "w1", "w2"])

    def __post_init__(self) -> None:
        if self.block_layers < 1:
            raise InputError(f"model.init_args.regularizer.block_layers must be >= 1, got {self.block_layers}")
        unknown = sorted(set(self.groups) - set(PARAMETER_GROUPS))
        if unknown:
            raise InputError(
                f"model.init_args.regularizer.groups: unknown {unknown}; choose from {sorted(PARAMETER_GROUPS)}"
            )

    def check(self, layers: nn.ModuleList) -> None:
        """Refuse a k that does not tile the stack into at least two blocks."""
        n = len(layers)
        if n % self.block_layers or n // self.block_layers < 2:
            raise InputError(
                f"model.init_args.regularizer.block_layers={self.block_layers} does not fit a stack of {n} layers: "
                f"k must divide it into >= 2 blocks (choose k from {[d for d in range(1, n // 2 + 1) if n % d == 0]}), "
                "and the regulariser acts on an unshared model (model.init_args.config.loops: 1, block_layers: kL)"
            )

    def similarities(self, layers: nn.ModuleList) -> dict[str, Tensor]:
        """``R_G(k)`` per group (differentiable scalars)."""
        return {group: block_cosines(layers, self.block_layers, group).mean() for group in self.groups}

    def penalty(self, layers: nn.ModuleList) -> Tensor:
        """The term added to the loss, before the factor λ: ``mean_G (1 − R_G)``."""
        return torch.stack([1 - r for r in self.similarities(layers).values()]).mean()
