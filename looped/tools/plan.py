"""``looped plan RECIPE [--key value ...] [--nodes N] [--gpus-per-node G] [--gpu h100] [--mfu 0.4]``.

Before a cluster is booked: does one rank of the recipe's job fit the GPU's memory, with and
without activation checkpointing, and if not, what does; how long do ``trainer.max_steps`` take.
The recipe is resolved as ``looped fit`` resolves it (same parser, overrides and data links);
a data module that needs prepared data (``PileDataModule`` reads ``data.path``) is not built
when ``--vocab-size`` stands in for it. Memory is measured by one real training step on fake
tensors (``looped.tools.memory``); FLOPs are ``LoopedTransformer.flops_per_token``, the count
``LoopedLM.flops_per_batch`` gives Lightning's ThroughputMonitor. ``--json`` prints the same
numbers for scripts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import asdict, dataclass, field

from looped.errors import InputError
from looped.tools.analysis import architecture
from looped.tools.memory import AUTOCAST, HALF, Job, StepMemory, measure_step
from looped.tools.resolve import resolve

GIB = 1024**3


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # the datasheet's GB; HBM comes in binary units, and the headroom covers what the driver keeps
    bf16_tflops: float  # dense (no 2:4 sparsity) tensor-core peak, bf16 and fp16
    fp32_tflops: float  # without tensor cores (Lightning's 32-true keeps float32 matmul precision "highest")


# Sources: NVIDIA's datasheets. H100 SXM5 80GB: 1,979 TFLOP/s bf16 "with sparsity", so 989 dense, 67 fp32;
# H200 SXM 141GB: the same GH100 compute (1,979 sparse); A100 SXM4 80GB/40GB: 312 bf16 dense, 19.5 fp32;
# H100 PCIe 80GB: 1,513 sparse -> 756 dense, 51 fp32. (Lightning's own table, behind ThroughputMonitor's
# MFU, lists H200's sparse 2.0e15 as its bf16 peak, which halves the MFU it reports on an H200.)
GPUS = {
    "h100": GPU("H100 SXM 80GB", 80, 989.4, 66.9),
    "h100-pcie": GPU("H100 PCIe 80GB", 80, 756.0, 51.2),
    "h200": GPU("H200 SXM 141GB", 141, 989.4, 66.9),
    "a100": GPU("A100 SXM 80GB", 80, 312.0, 19.5),
    "a100-40gb": GPU("A100 SXM 40GB", 40, 312.0, 19.5),
}


@dataclass
class Setting:
    """One measured way to run a rank: checkpointing, per-device batch and accumulation."""

    activation_checkpointing: bool
    batch_size: int
    accumulate: int
    memory: StepMemory
    fits: bool


@dataclass
class Plan:
    recipe: str
    model_shape: str  # (k⊗L), or (p⊗1, k⊗L, c⊗1) with a prelude and coda
    gpu: GPU
    nodes: int
    gpus_per_node: int
    layout: str  # how the ranks share the model
    precision: str
    seq_len: int
    vocab_size: int
    parameters: int  # unique
    layer_applications: int  # per forward
    flops_per_token: int  # training: 3 × forward, as ThroughputMonitor counts
    global_batch: int  # sequences per optimiser step
    max_steps: int | None
    mfu: float
    headroom: float
    usable_bytes: int
    settings: list[Setting] = field(default_factory=list)  # the recipe as written first
    fits_with: Setting | None = None  # the first setting that fits, if the recipe as written does not
    step_seconds: float = 0.0
    tokens_per_second: float = 0.0
    days: float | None = None


def layout(strategy, nodes: int, gpus: int) -> tuple[str, tuple[int, int] | None]:
    """(description, ModelParallelStrategy's mesh or None) for the trainer's strategy, checked as Lightning would."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    world = nodes * gpus
    path = strategy if isinstance(strategy, str) else strategy.get("class_path") if strategy else "auto"
    cls = None
    if "." in path:
        module, _, name = path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
    if cls is not None and issubclass(cls, ModelParallelStrategy):
        args = strategy.get("init_args") or {}
        dp, tp = args.get("data_parallel_size", "auto"), args.get("tensor_parallel_size", "auto")
        dp, tp = nodes if dp == "auto" else int(dp), gpus if tp == "auto" else int(tp)
        if dp * tp != world:
            raise InputError(
                f"trainer.strategy.init_args: data_parallel_size {dp} × tensor_parallel_size {tp} is not the "
                f"world size {nodes} × {gpus} = {world}, which ModelParallelStrategy refuses at setup ('auto' "
                "means the number of nodes, resp. GPUs per node); leave both auto (HSDP: sharded within a node) "
                f"or set data_parallel_size: {world} and tensor_parallel_size: 1 (FSDP over every rank)"
            )
        shards, replicas = (dp, 1) if tp == 1 else (tp, dp)  # looped.training.parallel.data_parallel_mesh
        kind = f"FSDP2 over {shards} rank{'s' * (shards > 1)}"
        kind = f"HSDP: sharded over {shards} ranks, replicated {replicas} times" if replicas > 1 else kind
        return kind, (dp, tp)
    ddp = path == "auto" or path.startswith("ddp") or (cls is not None and "DDP" in cls.__name__)
    if not (ddp or path in ("single_device",) or (cls is not None and "SingleDevice" in cls.__name__)):
        raise InputError(
            f"trainer.strategy: looped plan measures ModelParallelStrategy (FSDP2), DDP and single-device "
            f"runs, not {path!r}"
        )
    return (f"DDP over {world} ranks" if world > 1 else "one device"), None


def plan(argv: list[str]) -> Plan:
    """The plan of ``looped plan ARGV`` (everything but printing it)."""
    return make_plan(*parse_args(argv))


def make_plan(args: argparse.Namespace, overrides: list[str]) -> Plan:
    gpu = GPUS[args.gpu]
    cli = resolve(args.recipe, overrides, args.vocab_size)
    trainer, module = cli.config.trainer, cli.model
    nodes = args.nodes or trainer.num_nodes
    gpus = args.gpus_per_node or (trainer.devices if isinstance(trainer.devices, int) and trainer.devices > 0 else 1)
    description, mesh = layout(trainer.strategy, nodes, gpus)
    precision = unified_precision(trainer.precision, mesh is not None)
    config = module.config
    batch = getattr(cli.datamodule, "batch_size", None) or cli.batch_size
    if not isinstance(batch, int):
        raise InputError("data.batch_size: the data module has no per-device batch_size for looped plan to use")
    accumulate = trainer.accumulate_grad_batches
    flops = 3 * module.model.flops_per_token(config.max_seq_len)
    result = Plan(
        recipe=args.recipe,
        model_shape=architecture(config),
        gpu=gpu,
        nodes=nodes,
        gpus_per_node=gpus,
        layout=description,
        precision=precision,
        seq_len=config.max_seq_len,
        vocab_size=config.vocab_size,
        parameters=sum(p.numel() for p in module.model.parameters()),
        layer_applications=config.effective_depth,
        flops_per_token=flops,
        global_batch=batch * nodes * gpus * accumulate,
        max_steps=trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None,
        mfu=args.mfu,
        headroom=args.headroom,
        usable_bytes=int(gpu.memory_gib * GIB * (1 - args.headroom)),
    )

    def measure(checkpointing: bool, per_device: int, steps: int) -> Setting:
        job = Job(
            world_size=nodes * gpus,
            mesh_shape=mesh,
            precision=precision,
            batch_size=per_device,
            seq_len=config.max_seq_len,
            accumulate=steps,
            gradient_clip_val=trainer.gradient_clip_val,
            activation_checkpointing=checkpointing,
        )
        memory = measure_step(lambda: cli.instantiate().model, job)
        setting = Setting(checkpointing, per_device, steps, memory, memory.peak <= result.usable_bytes)
        result.settings.append(setting)
        return setting

    written = measure(module.activation_checkpointing, batch, accumulate)
    other = measure(not module.activation_checkpointing, batch, accumulate)
    if not written.fits:
        # Checkpointing on; then the largest per-device batch, checkpointed, that fits, accumulating
        # micro-batches to the same global batch.
        checkpointed = other if other.activation_checkpointing else written
        result.fits_with = checkpointed if checkpointed.fits else None
        per_rank = batch * accumulate
        for smaller in sorted((b for b in range(1, batch) if per_rank % b == 0), reverse=True):
            if result.fits_with is not None:
                break
            candidate = measure(True, smaller, per_rank // smaller)
            result.fits_with = candidate if candidate.fits else None
    peak_flops = (gpu.bf16_tflops if precision in AUTOCAST or precision in HALF else gpu.fp32_tflops) * 1e12
    tokens_per_step = result.global_batch * result.seq_len
    result.step_seconds = flops * tokens_per_step / (nodes * gpus) / (args.mfu * peak_flops)
    result.tokens_per_second = tokens_per_step / result.step_seconds
    if result.max_steps:
        result.days = result.max_steps * result.step_seconds / 86400
    return result


def unified_precision(precision, sharded: bool) -> str:
    from lightning.fabric.connector import _convert_precision_to_unified_args

    try:
        unified = _convert_precision_to_unified_args(precision)
    except ValueError as err:
        raise InputError(f"trainer.precision: {err}") from None
    if unified not in ("32-true", *AUTOCAST, *HALF):
        raise InputError(
            f"trainer.precision: looped plan measures 32-true, bf16/16-mixed and bf16/16-true, not {unified}"
        )
    if sharded and unified == "16-mixed":
        raise InputError("trainer.precision: ModelParallelStrategy refuses 16-mixed; use bf16-mixed")
    return unified


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="looped plan", description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("recipe", help="a recipe YAML; any --section.key value after it overrides it as for fit")
    parser.add_argument("--nodes", type=int, help="nodes (default: the recipe's trainer.num_nodes)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: the recipe's trainer.devices)")
    parser.add_argument("--gpu", default="h100", help=f"one of {', '.join(GPUS)} (default h100)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to predict time at")
    parser.add_argument("--headroom", type=float, default=0.1, help="fraction of GPU memory kept free (default 0.1)")
    parser.add_argument("--vocab-size", type=int, help="stands in for a data module that needs prepared data")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args, overrides = parser.parse_known_args(argv)
    for flag, value, low in (("--nodes", args.nodes, 1), ("--gpus-per-node", args.gpus_per_node, 1)):
        if value is not None and value < low:
            raise InputError(f"{flag}: must be >= {low}, got {value}")
    if args.vocab_size is not None and args.vocab_size < 1:
        raise InputError(f"--vocab-size: must be >= 1, got {args.vocab_size}")
    if args.gpu.lower() not in GPUS:
        raise InputError(f"--gpu: unknown GPU {args.gpu!r}; choose one of {', '.join(GPUS)}")
    args.gpu = args.gpu.lower()
    if not 0 < args.mfu <= 1:
        raise InputError(f"--mfu: a fraction in (0, 1], got {args.mfu}")
    if not 0 <= args.headroom < 1:
        raise InputError(f"--headroom: a fraction in [0, 1), got {args.headroom}")
    return args, overrides


def main(argv: list[str]) -> None:
    args, overrides = parse_args(argv)
    result = make_plan(args, overrides)
    if args.json:
        json.dump(asdict(result), sys.stdout, indent=2)
        print()
    else:
        render(result)


def advice(result: Plan) -> str:
    written = result.settings[0]
    if written.fits:
        return "[green]fits[/green] as written"
    fix = result.fits_with
    if fix is None:
        return "[red]does not fit[/red], not even one sequence per device with activation checkpointing"
    flags = ["--model.init_args.activation_checkpointing true"] if not written.activation_checkpointing else []
    if fix.batch_size != written.batch_size:
        flags += [f"--data.batch_size {fix.batch_size}", f"--trainer.accumulate_grad_batches {fix.accumulate}"]
    return f"[red]does not fit[/red] as written; fits with {' '.join(flags)} (same global batch)"


def render(result: Plan) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 100), highlight=False)
    unit, size = ("GiB", GIB) if max(s.memory.peak for s in result.settings) >= GIB / 4 else ("MiB", 1024**2)
    first = result.settings[0]
    world = result.nodes * result.gpus_per_node
    peak = result.gpu.bf16_tflops if result.precision != "32-true" else result.gpu.fp32_tflops
    console.print(
        f"[bold]looped plan[/bold] {result.recipe}\n"
        f"  model  {result.model_shape}: {result.parameters / 1e6:,.1f}M parameters, "
        f"{result.layer_applications} layer applications per forward\n"
        f"         {result.flops_per_token / 1e9:.3g} GFLOP per token "
        "(training: 3 × forward, as ThroughputMonitor counts)\n"
        f"  job    {result.nodes} × {result.gpus_per_node} {result.gpu.name} = {world} rank{'s' * (world > 1)}, "
        f"{result.layout}, {result.precision}\n"
        f"         {first.batch_size} sequences × {result.seq_len:,} tokens per GPU × accumulate {first.accumulate} "
        f"= {result.global_batch:,} sequences per step"
    )
    table = Table(title=f"memory per rank ({unit}) of one training step, measured")
    table.add_column("")
    for i, s in enumerate(result.settings):
        label = "as written" if i == 0 else "instead"
        ac = "on" if s.activation_checkpointing else "off"
        table.add_column(f"{label}\ncheckpointing {ac}\nbatch {s.batch_size} × {s.accumulate}", justify="right")
    rows = {
        "parameters (this rank's shard)": "params",
        "gradients": "grads",
        "optimiser state": "optimizer",
        "activations (stored by forward)": "activations",
        "peak of one step": "peak",
    }
    for name, key in rows.items():
        table.add_row(name, *(f"{getattr(s.memory, key) / size:,.2f}" for s in result.settings))
    table.add_row("fits", *("[green]yes[/green]" if s.fits else "[red]no[/red]" for s in result.settings))
    console.print(table)
    usable = f"{result.usable_bytes / GIB:.1f} of {result.gpu.memory_gib:g} GiB usable, {result.headroom:.0%} kept free"
    console.print(f"  verdict ({usable}): {advice(result)}")
    days = f", {duration(result.days)} for {result.max_steps:,} steps" if result.days is not None else ""
    console.print(
        f"  time at {result.mfu:.0%} MFU of {peak:,.0f} TFLOP/s: {result.step_seconds:.3g} s per step, "
        f"{result.tokens_per_second:,.0f} tokens/s{days}"
    )


def duration(days: float) -> str:
    hours = days * 24
    if hours >= 24:
        return f"{days:.1f} days"
    return (
        f"{hours:.1f} hours" if hours >= 1 else f"{hours * 60:.1f} min" if hours * 60 >= 1 else f"{hours * 3600:.1f} s"
    )
