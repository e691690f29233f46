"""Memory of one training step per rank, measured on fake tensors: what ``looped plan`` reports.

The step is the real one: ``LoopedLM.training_step`` of the recipe's module (its loss, loop
schedule and regulariser), backward, gradient clipping and the recipe's own optimiser, on the
transformer wrapped exactly as ``looped.training.parallel.parallelize`` wraps it for training (FSDP2
``fully_shard`` per layer with the precision's ``MixedPrecisionPolicy``, activation checkpointing
per layer application). It runs under ``FakeTensorMode`` (tensors with shapes, dtypes and
devices but no storage) and a fake process group of the job's world size, so this process
holds the shard of one rank of a 64-GPU job without 64 GPUs or any real memory; torch's own
trackers (``FSDPMemTracker``, or ``MemTracker`` for an unsharded model) attribute every
storage the step creates. This is the method of torchtitan's ``scripts/estimate/estimation.py``.

What it does not see, and ``looped plan``'s headroom is for: the CUDA context and NCCL's
buffers, the caching allocator's fragmentation, and the workspaces that fused GPU kernels
allocate outside PyTorch. It runs on the CPU with ``torch.compile`` off: compiled layers
save the same layer inputs but may keep fewer intermediates, so the eager number is the
upper bound. DDP cannot run on fake tensors (its reducer allocates buckets in C++), so for a
data-parallel job its gradient buckets, one more copy of the gradients, are added, not measured.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from looped.training.module import LoopedLM
from looped.training.parallel import mixed_precision_policy, parallelize

AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
HALF = {"bf16-true": torch.bfloat16, "16-true": torch.float16}


@dataclass
class StepMemory:
    """Bytes per rank. ``params``, ``grads``, ``optimizer`` are held between steps; ``activations`` is
    what the forward stores for backward (read when the loss exists); ``peak`` is the most alive at
    any moment of a step, and ``at_peak`` the tracker's split of that moment."""

    params: int
    grads: int
    optimizer: int
    activations: int
    peak: int
    at_peak: dict[str, int] = field(default_factory=dict)


@dataclass
class Job:
    """How one rank trains: the world, its mesh and the step's shape."""

    world_size: int = 1
    mesh_shape: tuple[int, int] | None = None  # ModelParallelStrategy's (data_parallel, tensor_parallel); None: no FSDP
    precision: str = "32-true"
    batch_size: int = 1  # sequences per device and micro-batch
    seq_len: int = 1
    accumulate: int = 1  # micro-batches per optimiser step
    gradient_clip_val: float | None = None
    activation_checkpointing: bool = False


def measure_step(build: Callable[[], LoopedLM], job: Job) -> StepMemory:
    """Run two training steps of a fresh module from ``build()`` for rank 0 of ``job`` on fake tensors.

    ``build`` returns a ``LoopedLM`` whose transformer is on the meta device (``transformer_on_meta``);
    it is called once, inside a fake process group. Two steps, as torchtitan's estimate runs, because
    only the second holds the optimiser state while it runs forward and backward; with gradient
    accumulation each step runs two micro-batches, so the second sees the gradients the first left.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    with fake_process_group(job.world_size):
        mesh = None
        if job.mesh_shape is not None:
            from torch.distributed.device_mesh import init_device_mesh

            # Lightning's ModelParallelStrategy builds this mesh; built outside FakeTensorMode (it is not data).
            mesh = init_device_mesh("cpu", job.mesh_shape, mesh_dim_names=("data_parallel", "tensor_parallel"))
        module = build()
        # The module was built outside: its metrics cannot be made of fake tensors. Its meta
        # parameters become fake ones as the wrapping and to_empty below touch them.
        with FakeTensorMode(allow_non_fake_inputs=True):
            return _two_steps(module, mesh, job)


def _two_steps(module: LoopedLM, mesh, job: Job) -> StepMemory:
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    model = module.model
    policy = mixed_precision_policy(job.precision) if mesh is not None else None
    parallelize(model, mesh, job.activation_checkpointing, compile=False, mp_policy=policy)
    model.to_empty(device="cpu")  # storage for rank 0's shards; values are never read
    if job.precision in HALF:  # Lightning's HalfPrecision converts the module
        model.to(HALF[job.precision])
    optimizer = module.optimizer_factory(module.parameter_groups())
    vocab = module.config.vocab_size
    shape = (job.batch_size, job.seq_len)
    batch = {"input_ids": torch.randint(0, vocab, shape), "labels": torch.randint(0, vocab, shape)}
    if mesh is not None:
        tracker = FSDPMemTracker(model, optimizer)
        tracker.track_inputs((batch,))
    else:
        tracker = MemTracker()
        tracker.track_external(model, optimizer, batch)
    seen: dict[str, int] = {"activations": 0, "grads": 0, "optimizer": 0}

    def observe(phase: str) -> None:
        if phase == "forward":
            seen["activations"] = max(seen["activations"], _total(tracker, ACTIVATIONS))
        elif phase == "backward":
            tracker.reset_mod_stats()  # per-module stats hold one forward; the peak is kept
            seen["grads"] = _total(tracker, GRADS)
        else:
            seen["optimizer"] = _total(tracker, OPTIMIZER)

    with tracker, StandInScalars(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log() without a trainer; fake tensors' data_ptr
        for _ in range(2):
            optimizer_step(module, optimizer, batch, job, micro_batches=min(job.accumulate, 2), observe=observe)
        params = _total(tracker, PARAMS)
    (device_peak,) = tracker.get_tracker_snapshot("peak").values()
    at_peak = {str(getattr(k, "value", k)): v for k, v in device_peak.items() if v}
    buckets = seen["grads"] if mesh is None and job.world_size > 1 else 0
    if buckets:  # DDP's flat gradient buckets (gradient_as_bucket_view=False, Lightning's default): added
        at_peak["DDP gradient buckets (added)"] = buckets
    return StepMemory(
        params=params,
        grads=seen["grads"] + buckets,
        optimizer=seen["optimizer"],
        activations=seen["activations"],
        peak=device_peak["Total"] + buckets,
        at_peak=at_peak,
    )


def optimizer_step(
    module: LoopedLM,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    job: Job,
    micro_batches: int | None = None,
    observe: Callable[[str], None] = lambda phase: None,
) -> None:
    """One optimiser step as Lightning's loop runs it: per micro-batch ``training_step`` under the precision's
    autocast and ``backward`` of the loss over ``job.accumulate``; then gradient clipping by norm, ``step``
    and ``zero_grad(set_to_none=True)``. ``observe`` is called after each forward, each backward and the
    step ("forward", "backward", "step")."""
    device = batch["input_ids"].device.type
    autocast = torch.autocast(device, dtype=AUTOCAST.get(job.precision), enabled=job.precision in AUTOCAST)
    for _ in range(job.accumulate if micro_batches is None else micro_batches):
        with autocast:
            loss = _TrainingStep(module.training_step)(batch)
        observe("forward")
        (loss / job.accumulate).backward()
        del loss
        observe("backward")
    if job.gradient_clip_val:
        torch.nn.utils.clip_grad_norm_(module.model.parameters(), job.gradient_clip_val)
    optimizer.step()
    observe("step")
    optimizer.zero_grad(set_to_none=True)


class _TrainingStep(torch.nn.Module):
    """One ``training_step`` as a module call. MemTracker refuses a top-level module called twice in one
    step, which HRM's halting does (its target comes from one more supervision step); inside this parent
    the model's calls are nested ones, which it tracks. A new one per step: never called twice itself."""

    def __init__(self, step: Callable[[dict[str, torch.Tensor], int], torch.Tensor]) -> None:
        super().__init__()
        self.step = step  # a bound method, not a submodule: the model's parameters are not this module's

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.step(batch, 0)


# The trackers' categories (FSDPMemTracker's names, then MemTracker's) summed into the report's rows.
PARAMS = ("Sharded Param", "Parameter", "Buffer")
GRADS = ("Sharded Grad", "Gradient")
OPTIMIZER = ("OptState", "Optstate")
ACTIVATIONS = ("Activation",)


def _total(tracker, names: tuple[str, ...]) -> int:
    snapshot = tracker.get_tracker_snapshot("current")
    return sum(v for dev in snapshot.values() for k, v in dev.items() if getattr(k, "value", k) in names)


class StandInScalars(TorchDispatchMode):
    """A fake tensor read into Python (``.item()``, ``bool()``) gives 1 instead of failing.

    A fake tensor has no value, so ``FakeTensorMode`` refuses ``aten._local_scalar_dense``. A training
    step reads a few scalars: ``LoopedLM.training_step`` checks the loss is finite, and Adafactor and
    AdamW (their single-tensor update, which FSDP2's DTensor parameters take) read the step counter
    and a parameter's RMS with ``.item()`` to scale the update. No such value sizes a tensor, so a
    stand-in value changes no allocation. The alternatives change what is measured: ``capturable=True``
    exists for AdamW but not for Adafactor, and allocating the state by hand would skip the update's
    temporaries (``looped.training.optim.Adafactor`` gathers one whole parameter and gradient at a time).
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import FakeTensor

        if func is torch.ops.aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
            dtype = args[0].dtype
            return True if dtype == torch.bool else 1.0 if dtype.is_floating_point else 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def fake_process_group(world_size: int) -> Iterator[None]:
    """A process group of ``world_size`` ranks in this one process, as rank 0; collectives do nothing."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("measure_step needs its own (fake) process group; this process already has one")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()
