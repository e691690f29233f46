"""Scaling a ``LoopedTransformer`` out: activation checkpointing, ``torch.compile`` and FSDP2, torchtitan style.

The model file stays plain PyTorch; this module applies, in order,

1. activation checkpointing per layer *application*: every ``TransformerLayer`` gets
   the composable ``checkpoint`` hooks, which open a fresh checkpoint region on each
   call, so the shared block's k layers, called L times by ``LoopedTransformer.forward``,
   store only their L·k inputs and recompute each application separately in backward;
2. ``torch.compile`` per layer (``nn.Module.compile`` keeps parameter names unchanged);
3. ``fully_shard`` per ``TransformerLayer`` (prelude, shared block, coda), then the root
   (embedding, final norm, head). The shared block's layers are sharded once and used
   L times: with L > 1 their all-gather is kept for the whole forward (``reshard_after_forward=False``,
   the unsharded block is only k layers) and autograd sums the L uses' gradients before the
   one reduce-scatter (``tests/test_distributed.py`` checks this against one process).

``LoopedLM.configure_model`` calls ``parallelize`` with the mesh of Lightning's
``ModelParallelStrategy``. A model built on the meta device (``trainer.init_module(empty_init=True)``)
is sharded first and then materialised shard by shard with ``materialize``, so no rank
ever holds the whole model.
"""

from __future__ import annotations

import torch
from torch import nn

from looped.model import LoopedTransformer


def parallelize(
    model: LoopedTransformer,
    device_mesh=None,
    activation_checkpointing: bool = False,
    compile: bool = False,
    mp_policy=None,
) -> LoopedTransformer:
    """Apply activation checkpointing, ``torch.compile`` and FSDP2 to ``model`` in place; returns it.

    Args:
        device_mesh: the strategy's mesh (see ``data_parallel_mesh``), a 1-D mesh (FSDP), a 2-D
            ``(replicate, shard)`` mesh (HSDP), or None: no sharding.
        activation_checkpointing: recompute every layer application in backward instead of storing it.
        compile: compile every layer with ``torch.compile`` (one graph, reused by all L applications).
        mp_policy: FSDP2 ``MixedPrecisionPolicy`` (see ``mixed_precision_policy``); None: parameters'
            own dtype.
    """
    layers = [*model.prelude, *model.block, *model.coda]
    if activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for layer in layers:
            checkpoint(layer)
    if compile:
        for layer in layers:
            layer.compile()
    if device_mesh is None:
        return model
    from torch.distributed.fsdp import fully_shard

    mesh = data_parallel_mesh(device_mesh)
    shard = {"mesh": mesh} if mp_policy is None else {"mesh": mesh, "mp_policy": mp_policy}
    for layer in [*model.prelude, *model.coda]:
        fully_shard(layer, **shard)
    for layer in model.block:
        # A looped block is gathered once per forward and kept for its L applications instead of
        # being re-gathered L times; an unshared stack (L = 1) reshards each layer as usual.
        fully_shard(layer, reshard_after_forward=model.config.loops == 1, **shard)
    fully_shard(model, **shard)
    return model


def data_parallel_mesh(device_mesh):
    """The mesh to shard over: all ranks are data-parallel (these layers implement no tensor parallelism).

    Lightning's ``ModelParallelStrategy`` builds a ``(data_parallel, tensor_parallel)`` mesh. With
    ``tensor_parallel_size=1`` this is the 1-D data-parallel mesh: plain FSDP over every rank. With
    its defaults (``auto``: nodes × GPUs per node) the 2-D mesh is used as HSDP: parameters are
    sharded within a node and replicated across nodes, and every rank still trains on its own data.
    """
    names = device_mesh.mesh_dim_names or ()
    if names == ("data_parallel", "tensor_parallel"):
        return device_mesh["data_parallel"] if device_mesh["tensor_parallel"].size() == 1 else device_mesh
    if device_mesh.ndim > 2:
        raise ValueError(f"parallelize: expected a 1-D (FSDP) or 2-D (HSDP) mesh, got dimensions {names}")
    return device_mesh


def mixed_precision_policy(precision: str):
    """FSDP2 policy for a Lightning precision string: gather parameters in 16 bit, reduce gradients in fp32.

    ``bf16-mixed``/``16-mixed`` give a policy (Lightning's autocast still runs on top of it);
    anything else (``32-true``, ``bf16-true``) keeps the parameters' own dtype.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))
    return None if dtype is None else MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def is_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


@torch.no_grad()
def materialize(model: LoopedTransformer, device: torch.device) -> LoopedTransformer:
    """Give a meta-device (possibly sharded) model real storage and initialise it as the constructor would.

    Every submodule's own ``reset_parameters`` (norms, linears, embeddings) runs first,
    then the model's (normal init with depth-scaled residual projections), in the same
    order as ``LoopedTransformer.__init__``; the RoPE tables are recomputed. On a sharded
    model each rank initialises only its shards.
    """
    model.to_empty(device=device)
    for module in model.modules():
        if module is not model and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    model.reset_parameters()
    if model.rope is not None:
        model.rope.reset_buffers()
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole CPU tensors of a (possibly FSDP2-sharded) model, by the plain model's parameter names.

    A collective under FSDP2: call on every rank.
    """
    from torch.distributed.tensor import DTensor

    return {
        name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()
        for name, t in model.state_dict().items()
    }


def join_after_restart(strategy) -> bool:
    """Form the process group of a job ``torchrun --max-restarts`` restarted, under a key prefix of its own.

    torchrun's c10d rendezvous (``--standalone``, ``--rdzv-backend c10d``) keeps one store for the whole job
    and tells the workers to use it (``TORCHELASTIC_USE_AGENT_STORE``). After a restart, the new workers can
    read the addresses the dead workers published there, and gloo then waits forever to connect to them
    (seen with torch 2.14: both ranks stuck in ``connectFullMesh`` after one rank was killed). Lightning
    initialises the group with those defaults; this initialises it first, the same way but with the
    restart's own prefix (``looped/restart_N``), and Lightning then uses it. Returns whether it did.
    """
    import os
    from datetime import timedelta

    import torch.distributed as dist
    from lightning.fabric.utilities.distributed import _get_default_process_group_backend_for_device

    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if restart == 0 or world_size < 2 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return False
    if not dist.is_available() or dist.is_initialized() or not hasattr(strategy, "root_device"):
        return False
    timeout = getattr(strategy, "_timeout", None) or timedelta(minutes=30)
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timeout
    )
    backend = getattr(strategy, "process_group_backend", None) or _get_default_process_group_backend_for_device(
        strategy.root_device
    )
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"looped/restart_{restart}", store),
        rank=int(os.environ["RANK"]),
        world_size=world_size,
        timeout=timeout,
    )
    return True
