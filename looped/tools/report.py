"""``looped report RUN_DIR_OR_PARENT [...] --output DIR``: the paper's tables and figures from finished runs.

Reads every version directory (``runs/<name>/version_N/``: event files, ``config.yaml`` or
``hparams.yaml``) and writes ``report.md`` (Table 1: a row per model, a column per test accuracy
and task; Table 3 with a ``% Gap`` row per looped model when ``k⊗1``, ``k⊗L`` and ``kL⊗1`` were
run; the Figure-3 fit ``acc = α·log(D) + β`` with ``α_loop/α_base``) and ``per_loop_<run>.png``,
``isoplot.png`` and ``cosine_<run>.png``. Accuracies in percent; a cell several runs (seeds)
share shows the best, as the paper reports the best of 3 seeds.
"""

from __future__ import annotations

import argparse
import functools
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from looped.tools.analysis import (
    ModelShape,
    architecture,
    fit_line,
    fit_log_depth,
    gap_families,
    gap_table,
    paper_order,
    parse_shape,
    scaling_ratio,
    task_groups,
)
from looped.tools.exit_comparison import comparison_table, operating_points, plot_comparison
from looped.tools.known_depth import known_depth, known_depth_table, plot_known_depth
from looped.tools.plots import cosine_heatmap, dynamics_figure, per_loop_figure, pyplot, save
from looped.tools.reasoners import Reasoner, plot_reasoners, reasoners_table, solved_by_step
from looped.tools.study import plot_study, study_points, study_table

PER_LOOP = re.compile(r"_loop(\d+)$")
PER_LOOP_ANY_SET = re.compile(r"_loop\d+(_|$)")  # test/exact_match_loop3, and per set: ..._loop3_depth2
COSINE = re.compile(r"^block_cosine/(.+)/layer(\d+)$")
DYNAMICS = re.compile(r"^(?P<stage>val|test)/dynamics/(?P<name>residual|top_prob|flip_rate)_loop(?P<loop>\d+)$")
# Data-module arguments that change how a task is served or scored, not which task it is.
NOT_TASK = {"batch_size", "eval_batch_size", "num_workers", "val_size", "test_size", "seed", "eval_hops", "eval_depths"}
NO_GAP = {"ppl", "log-ppl"}


@dataclass
class Run:
    """One version directory: its model shape, task and every scalar series."""

    path: Path
    shape: ModelShape
    data: dict
    scalars: dict[str, list[tuple[int, float]]]  # tag -> [(step, value)] in the order written
    cosine_k: int | None = None
    variant: str = ""  # training beyond the paper's plain looping ("random loops 2..8", "regularised k=1 λ=10")
    label: str = ""
    task: str = ""
    wall_seconds: float | None = None  # training time between the first and last loss events (training_seconds)
    config: dict = field(default_factory=dict)  # model.init_args.config as saved
    model_args: dict = field(default_factory=dict)  # model.init_args as saved

    def last(self, tag: str) -> float | None:
        series = self.scalars.get(tag)
        return series[-1][1] if series else None


# -- reading runs ------------------------------------------------------------------------
def find_version_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Directories holding ``events.out.tfevents.*``: each path itself, or any below it."""
    found: dict[Path, None] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise SystemExit(f"looped report: {path} does not exist")
        for events in sorted(path.rglob("events.out.tfevents.*")):
            found[events.parent] = None
    return list(found)


class _TolerantLoader(yaml.SafeLoader):
    """A safe loader that reads ``!!python/...`` tags in ``hparams.yaml`` as plain data."""


def _plain(loader, suffix, node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_TolerantLoader.add_multi_constructor("tag:yaml.org,2002:python/", _plain)


def read_config(version_dir: Path) -> tuple[dict, dict, list, dict]:
    """``(model config, data init_args, callbacks, model init_args)`` from ``config.yaml``, else ``hparams.yaml``."""
    path = version_dir / "config.yaml"
    if path.exists():
        cfg = yaml.load(path.read_text(), Loader=_TolerantLoader) or {}
        model = (cfg.get("model") or {}).get("init_args", cfg.get("model") or {})
        data = cfg.get("data") or {}
        data = {"class_path": data.get("class_path", ""), **(data.get("init_args") or {})}
        return model.get("config") or {}, data, (cfg.get("trainer") or {}).get("callbacks") or [], model
    path = version_dir / "hparams.yaml"
    if path.exists():
        cfg = yaml.load(path.read_text(), Loader=_TolerantLoader) or {}
        return cfg.get("config") or {}, {}, [], cfg
    raise FileNotFoundError(f"{version_dir} has neither config.yaml nor hparams.yaml")


def read_scalars(version_dir: Path, wall: dict | None = None) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a run; ``wall``, when given, gets ``{tag: [wall-clock time of each event]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(version_dir), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    events.Reload()
    series = {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}
    if wall is not None:
        wall.update({tag: [e.wall_time for e in points] for tag, points in series.items() if points})
    return {tag: [(e.step, e.value) for e in points] for tag, points in series.items()}


def logged_by_step(run_dir: Path, tag: str) -> dict[int, list[float]]:
    """Every value of ``tag`` the versions of ``run_dir`` logged, by step; a run restarted from a checkpoint logs the
    steps it redoes again, so a step may hold several values (in the order they were logged)."""
    found: dict[int, list[float]] = {}
    for version_dir in sorted(Path(run_dir).glob("version_*")):
        for step, value in read_scalars(version_dir).get(tag, []):
            found.setdefault(step, []).append(value)
    return found


def training_variant(model_args: dict) -> str:
    """How a run's training departs from plain looping, in words ('' when it does not)."""
    parts = []
    schedule = model_args.get("loop_schedule") or {}
    if schedule.get("distribution", "fixed") != "fixed":
        low, high = schedule.get("min_loops", 1), schedule.get("max_loops")
        parts.append(f"{schedule['distribution']} loops {low}..{high if high else '2L'}")
    if schedule.get("grad_loops"):
        parts.append(f"backprop through last {schedule['grad_loops']} loops")
    regularizer = model_args.get("regularizer") or {}
    if regularizer:
        parts.append(f"regularised k={regularizer.get('block_layers')} λ={regularizer.get('weight')}")
    exit = model_args.get("exit") or {}
    if exit:  # the learned exit's objective and the parameter it turns (looped.training.halting)
        objective = exit.get("objective", "ouro")
        knob = {"ouro": "beta", "pondernet": "prior", "act": "tau"}.get(objective)
        parts.append(f"{objective} exit" + (f" {knob}={exit.get(knob)}" if knob else ""))
    config = model_args.get("config") or {}
    router = config.get("router", "none")
    if router != "none":  # Mixture-of-Recursions (looped.model.router)
        capacity = config.get("router_capacity", 1.0) if router == "expert_choice" else None
        parts.append(f"MoR {router}" + (f" {capacity}" if capacity is not None else ""))
    if model_args.get("init_weights"):
        parts.append("from a trained checkpoint")
    if config.get("recursion", "loop") != "loop":  # TRM or HRM (looped.model.recursion)
        parts.append(architecture(config))
    if "supervision_steps" in model_args:  # DeepSupervision, whose tables are the reasoners' section
        steps = model_args["supervision_steps"]
        parts.append(f"deep supervision N_sup={steps}" if steps > 1 else "supervision steps (N_sup=1)")
    return ", ".join(parts)


def load_run(version_dir: Path) -> Run:
    config, data, callbacks, model_args = read_config(version_dir)
    shape = ModelShape(
        block_layers=int(config.get("block_layers", 1)),
        loops=int(config.get("loops", 1)),
        prelude_layers=int(config.get("prelude_layers", 0)),
        coda_layers=int(config.get("coda_layers", 0)),
    )
    cosine_k = None
    for callback in callbacks:
        if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("BlockCosineSimilarity"):
            cosine_k = (callback.get("init_args") or {}).get("block_layers")
    wall: dict[str, list[float]] = {}
    run = Run(version_dir, shape, data, read_scalars(version_dir, wall), cosine_k, training_variant(model_args))
    run.config, run.model_args = config, model_args
    if "train/loss" in wall:
        run.wall_seconds = training_seconds(wall["train/loss"])
    return run


def training_seconds(times: Sequence[float], pause: float = 10.0) -> float:
    """Wall-clock seconds from the first to the last logged loss, less the pauses of a run resumed in its own
    folder (``--ckpt_path auto``): an interval over ``pause`` times the median one is counted as the median."""
    intervals = sorted(b - a for a, b in zip(times, times[1:], strict=False))
    if not intervals:
        return 0.0
    median = intervals[len(intervals) // 2]
    return sum(d if d <= pause * median else median for d in intervals)


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Every run below ``paths``, labelled uniquely and tagged with its task (see ``_name_tasks``)."""
    runs = []
    for version_dir in find_version_dirs(paths):
        try:
            runs.append(load_run(version_dir))
        except FileNotFoundError as err:
            print(f"looped report: skipping {err}", file=sys.stderr)
    names = [r.path.parent.name if r.path.name.startswith("version_") else r.path.name for r in runs]
    for run, name in zip(runs, names):
        unique = names.count(name) == 1
        run.label = re.sub(r"[^A-Za-z0-9_.-]", "_", name if unique else f"{name}_{run.path.name}")
    _name_tasks(runs)
    return runs


def _name_tasks(runs: list[Run]) -> None:
    """A run's task: its data class where the runs use several, then the arguments that differ between the
    runs of that class (``hops=16``); '' when every run has one task. Another class's arguments never count:
    a p-hop run has no ``num_edges``, which is not a difference between two p-hop runs."""
    classes = sorted({str(r.data.get("class_path")) for r in runs})
    for name in classes:
        group = [r for r in runs if str(r.data.get("class_path")) == name]
        keys = sorted({k for r in group for k in r.data} - NOT_TASK - {"class_path"})
        varying = [k for k in keys if len({repr(r.data.get(k)) for r in group}) > 1]
        for run in group:
            parts = [name.rsplit(".", 1)[-1]] if len(classes) > 1 else []
            run.task = ", ".join(parts + [f"{key}={run.data.get(key)}" for key in varying])


# -- numbers -----------------------------------------------------------------------------
def as_percent(tag: str, value: float) -> float:
    return 100.0 * value if ("exact_match" in tag or "accuracy" in tag) else value


def default_metrics(runs: list[Run]) -> list[str]:
    """Every test exact match, overall and per named set; not per loop or per exit rule (their own sections)."""
    tags = {t for r in runs for t in r.scalars}
    return sorted(
        t
        for t in tags
        if t.startswith("test/") and "exact_match" in t and not PER_LOOP_ANY_SET.search(t) and "/adaptive/" not in t
    )


def collect_cells(runs: list[Run], metrics: Sequence[str]) -> tuple[list[str], dict[str, dict[str, float]], set]:
    """``(columns, {model: {column: best value}}, shared cells)``; a column is a metric on a task."""
    columns: dict[str, None] = {}
    cells: dict[str, dict[str, float]] = {}
    seen: dict[tuple[str, str], int] = {}
    for run in runs:
        for metric in metrics:
            value = run.last(metric)
            if value is None:
                continue
            column = metric.removeprefix("test/") + (f" [{run.task}]" if run.task else "")
            columns[column] = None
            value = as_percent(metric, value)
            row = cells.setdefault(run.shape.name, {})
            row[column] = max(value, row.get(column, -math.inf))
            seen[(run.shape.name, column)] = seen.get((run.shape.name, column), 0) + 1
    return list(columns), cells, {key for key, n in seen.items() if n > 1}


def _fmt(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.1f}"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def table1(cells: dict[str, dict[str, float]], columns: Sequence[str], shared: set = frozenset()) -> str:
    rows = []
    for name in paper_order(list(cells)):
        shape = parse_shape(name)
        values = [_fmt(cells[name].get(c)) + ("*" if (name, c) in shared else "") for c in columns]
        rows.append([name, shape.cost if shape else "?", *values])
    return _markdown(["model", "params / FLOPs", *columns], rows)


def table3_from_numbers(rows: dict[str, dict[str, float]], columns: Sequence[str] | None = None) -> str:
    """Table 3 of the paper from numbers: per deep baseline ``kL⊗1``, each ``k⊗1``, ``k⊗L`` and its % Gap.

    ``rows`` maps model names (``"12⊗2"``) to ``{column: value}``; columns named in
    ``NO_GAP`` (perplexity) get no gap. Returns '' when no complete family exists.
    """
    columns = list(columns or dict.fromkeys(c for values in rows.values() for c in values))
    gap_columns = [c for c in columns if c not in NO_GAP]
    gaps = gap_table(rows, gap_columns)
    families = gap_families(list(rows))
    if not families:
        return ""
    out = []
    for deep in dict.fromkeys(f.deep for f in families):
        depth = parse_shape(deep).depth
        out.append(_table3_row(deep, rows[deep], columns))
        for family in (f for f in families if f.deep == deep):
            out.append(_table3_row(family.shallow, rows[family.shallow], columns))
            out.append(_table3_row(family.looped, rows[family.looped], columns))
            gap = gaps[family.looped]
            out.append([f"% Gap ({family.looped})", "", *(_fmt(gap[c]) if c in gap else "" for c in columns)])
        for name in rows:  # middle-looped models of the same depth, shown without a gap (as in the paper)
            shape = parse_shape(name)
            if shape and shape.is_middle and shape.depth == depth:
                out.append(_table3_row(name, rows[name], columns))
    return _markdown(["model", "params / FLOPs", *columns], out)


def _table3_row(name: str, values: dict[str, float], columns: Sequence[str]) -> list[str]:
    shape = parse_shape(name)
    return [name, shape.cost if shape else "?", *(_fmt(values.get(c)) for c in columns)]


def group_rows(
    runs: list[Run], cells, columns, groups: Sequence[str], loss_tag: str = "val/loss"
) -> dict[str, dict[str, float]]:
    """Table 3's rows: validation perplexity (the lowest ``loss_tag`` any run of the model reached, the
    best checkpoint's), each task group's mean, and 'all' (mean of the groups)."""
    grouped = task_groups(columns, groups)
    rows: dict[str, dict[str, float]] = {}
    for name, values in cells.items():
        row = {}
        losses = [
            min(v for _, v in r.scalars[loss_tag]) for r in runs if r.shape.name == name and loss_tag in r.scalars
        ]
        if losses:
            row["ppl"] = math.exp(min(losses))
        for group, cols in grouped.items():
            present = [values[c] for c in cols if c in values]
            row[group] = sum(present) / len(present) if len(present) == len(cols) else float("nan")
        if len(grouped) > 1:
            row["all"] = sum(row[g] for g in grouped) / len(grouped)
        rows[name] = row
    return rows


def scaling_fits(cells: dict[str, dict[str, float]], columns: Sequence[str]) -> list[list[str]]:
    """Figure 3: per column and k, α, β of looped ``k⊗L`` (L ≥ 1) and deep ``D⊗1``, and ``α_loop/α_base``."""
    shapes = {n: parse_shape(n) for n in cells}
    shapes = {n: s for n, s in shapes.items() if s and not s.is_middle}
    rows = []
    for column in columns:
        deep = [(s.depth, cells[n][column]) for n, s in shapes.items() if s.loops == 1 and column in cells[n]]
        if len({d for d, _ in deep}) < 2:
            continue
        a_base, b_base = fit_log_depth(*zip(*deep))
        for k in sorted({s.block_layers for s in shapes.values() if s.loops > 1}):
            loop = [
                (s.depth, cells[n][column]) for n, s in shapes.items() if s.block_layers == k and column in cells[n]
            ]
            if len({d for d, _ in loop}) < 2:
                continue
            a_loop, b_loop = fit_log_depth(*zip(*loop))
            rows.append(
                [
                    column,
                    f"{k}⊗L",
                    *(f"{v:.2f}" for v in (a_loop, b_loop, a_base, b_base)),
                    f"{scaling_ratio(a_loop, a_base):.2f}",
                ]
            )
    return rows


def per_loop_perplexity(runs: list[Run], loss_set: str | None = None) -> str:
    """Held-out perplexity after every loop (``PerLoopAccuracy(perplexity=True)``'s ``test/perplexity_loop{n}``
    of the evaluation set ``loss_set``, or pooled), a row per model, the mean over its runs; '' without it."""
    suffix = f"_{loss_set}" if loss_set else ""
    pattern = re.compile(rf"^test/perplexity_loop(\d+){re.escape(suffix)}$")
    by_model: dict[str, list[dict[int, float]]] = {}
    for run in runs:
        curve = {int(m.group(1)): run.last(tag) for tag in run.scalars if (m := pattern.match(tag))}
        if curve:
            by_model.setdefault(run.shape.name + (f" ({run.variant})" if run.variant else ""), []).append(curve)
    if not by_model:
        return ""
    loops = sorted({n for curves in by_model.values() for curve in curves for n in curve})
    rows = []
    for name, curves in by_model.items():
        trained = parse_shape(name.split(" (")[0])
        cells = []
        for n in loops:
            values = [curve[n] for curve in curves if n in curve]
            mark = "*" if trained and n == trained.loops else ""
            cells.append(f"{sum(values) / len(values):.1f}{mark}" if values else "—")
        rows.append([name, str(len(curves)), *cells])
    return _markdown(["model", "runs", *(f"loop{n}" for n in loops)], rows)


# -- figures -----------------------------------------------------------------------------
def plot_per_loop(run: Run, output: Path, stage: str = "test") -> Path | None:
    per_loop = {}
    for tag in run.scalars:
        match = PER_LOOP.search(tag)
        if tag.startswith(f"{stage}/exact_match_loop") and match:
            per_loop[int(match[1])] = run.last(tag)
    if not per_loop:
        return None
    accuracy = [per_loop.get(n, float("nan")) for n in range(1, max(per_loop) + 1)]
    return save(per_loop_figure(accuracy, run.shape.loops), output / f"per_loop_{run.label}.png")


def plot_dynamics(run: Run, output: Path, stage: str = "test") -> Path | None:
    """``LoopDynamics``' curves (residual, logit-lens probability, flip rate per loop) from the logged scalars."""
    values: dict[str, dict[int, float]] = {}
    for tag in run.scalars:
        if match := DYNAMICS.match(tag):
            if match["stage"] == stage:
                values.setdefault(match["name"], {})[int(match["loop"])] = run.last(tag)
    if not values:
        return None
    loops = max(max(v) for v in values.values())
    curves = {name: [v.get(n, float("nan")) for n in range(1, loops + 1)] for name, v in values.items()}
    return save(dynamics_figure(curves, run.shape.loops), output / f"dynamics_{run.label}.png")


def plot_cosine(run: Run, output: Path) -> Path | None:
    values: dict[str, dict[int, float]] = {}
    for tag in run.scalars:
        if match := COSINE.match(tag):
            values.setdefault(match[1], {})[int(match[2])] = run.last(tag)
    if not values:
        return None
    grid = {g: [layers[i] for i in sorted(layers)] for g, layers in values.items()}
    k = run.cosine_k or run.shape.block_layers - max(len(v) for v in grid.values())
    return save(cosine_heatmap(grid, k), output / f"cosine_{run.label}.png")


def isoplot_points(run: Run, metric: str) -> list[tuple[float, float]]:
    """(validation log-perplexity, metric) at every step both were logged: the recorder's tags (its held-out
    loss with any metric logged at the same steps, e.g. an answer's loss), else val/loss."""
    pairs = (("isoplot/log_perplexity", f"isoplot/{metric}"), ("isoplot/log_perplexity", metric), ("val/loss", metric))
    for x_tag, y_tag in pairs:
        xs, ys = dict(run.scalars.get(x_tag, [])), dict(run.scalars.get(y_tag, []))
        points = [(xs[s], as_percent(metric, ys[s])) for s in xs if s in ys]
        if points:
            return points
    return []


def plot_isoplot(runs: list[Run], output: Path, metric: str) -> Path | None:
    families: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        key = run.shape.family + (f" [{run.task}]" if run.task else "")
        families.setdefault(key, []).extend(isoplot_points(run, metric))
    families = {k: v for k, v in families.items() if v}
    if not families:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.5))
    for (name, points), marker in zip(sorted(families.items()), "osD^vP*X<>"):
        xs, ys = zip(*points)
        dots = ax.scatter(xs, ys, marker=marker, alpha=0.7, label=name)
        if len(set(xs)) >= 2:
            a, b = fit_line(xs, ys)
            ax.plot([min(xs), max(xs)], [a * min(xs) + b, a * max(xs) + b], color=dots.get_facecolor()[0])
    ax.set_xlabel("validation log-perplexity")
    ax.set_ylabel(f"{metric} %" if as_percent(metric, 1.0) == 100.0 else metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, output / "isoplot.png")


# -- the command -------------------------------------------------------------------------
def variants_table(runs: list[Run], metrics: Sequence[str]) -> str:
    """One row per run trained beyond plain looping, with its metrics at the end of training."""
    header = ["run", "model", "training", *(m.removeprefix("test/") for m in metrics)]
    rows = []
    for run in runs:
        values = [run.last(m) for m in metrics]
        rows.append(
            [
                f"`{run.label}`",
                run.shape.name,
                run.variant,
                *(_fmt(as_percent(m, v)) if v is not None else "" for m, v in zip(metrics, values)),
            ]
        )
    return _markdown(header, rows)


@dataclass
class Section:
    """One ``## title`` of report.md, and the figures it drew."""

    title: str
    body: str
    figures: tuple[Path | None, ...] = ()


def write_report(
    runs: list[Run],
    output: Path,
    metrics: Sequence[str] = (),
    groups: Sequence[str] = (),
    isoplot_metric: str = "val/exact_match",
    loss_set: str | None = None,
) -> Path:
    """report.md and its PNGs in ``output``: the paper's tables from the plainly looped runs, then every other
    section the runs have data for."""
    output.mkdir(parents=True, exist_ok=True)
    metrics = list(metrics) or default_metrics(runs)
    plain = [r for r in runs if not r.variant]  # the paper's tables: plain looping only
    columns, cells, shared = collect_cells(plain, metrics)
    sections = [
        table1_section(cells, columns, shared),
        table3_section(plain, cells, columns, groups, loss_set),
        perplexity_section(runs, loss_set),
        compute_section(runs, loss_set),
        *adaptive_sections(runs, output),
        *known_depth_sections(runs, output),
        *reasoner_sections(runs, output),
        variants_section([r for r in runs if r.variant], metrics),
        scaling_section(cells, columns),
        study_section(runs),
    ]
    sections = [section for section in sections if section is not None]
    figures = [f for section in sections for f in section.figures]
    figures += [
        plot_isoplot(runs, output, isoplot_metric),
        plot_study(study_points(runs), output / "study_heatmap.png"),
    ]
    figures += [plot(run, output) for run in runs for plot in (plot_per_loop, plot_dynamics, plot_cosine)]
    figures = [f for f in figures if f is not None]
    if figures:
        sections.append(Section("Figures", "\n".join(f"![{f.stem}]({f.name})" for f in figures)))
    runs_line = f"{len(runs)} runs: " + ", ".join(f"`{r.label}` ({r.shape.name})" for r in runs)
    text = "\n\n".join([f"# Report\n\n{runs_line}", *(f"## {s.title}\n\n{s.body}" for s in sections)])
    report = output / "report.md"
    report.write_text(text + "\n")
    return report


def table1_section(cells: dict[str, dict[str, float]], columns: list[str], shared: set) -> Section:
    body = table1(cells, columns, shared) if columns else "No test metrics."
    if shared:
        body += "\n\n\\* several runs share this cell; the best is shown (the paper: best of 3 seeds)."
    return Section("Accuracy per model (Table 1)", body)


def table3_section(
    runs: list[Run], cells: dict, columns: list[str], groups: Sequence[str], loss_set: str | None
) -> Section | None:
    loss_tag = f"val/loss_{loss_set}" if loss_set else "val/loss"
    table3 = table3_from_numbers(group_rows(runs, cells, columns, groups, loss_tag))
    if not table3:
        return None
    formula = f"`% Gap = (Avg(k⊗L) − Avg(k⊗1)) / (Avg(kL⊗1) − Avg(k⊗1)) × 100`; ppl = exp(lowest {loss_tag})."
    return Section("Looped vs shallow vs deep (Table 3)", f"{formula}\n\n{table3}")


def perplexity_section(runs: list[Run], loss_set: str | None) -> Section | None:
    table = per_loop_perplexity(runs, loss_set)
    if not table:
        return None
    of = f" of `{loss_set}`" if loss_set else ""
    intro = f"Test perplexity{of} read out after n loops, mean over runs (* = the trained L)."
    return Section("Perplexity after every loop", f"{intro}\n\n{table}")


def adaptive_sections(runs: list[Run], output: Path) -> list[Section]:
    """Per task, every method's cheapest operating point against the fixed-L model, and its figure."""
    by_task: dict[str, dict[str, tuple]] = {}
    for run in runs:
        points = operating_points(run.scalars)
        if points:
            name = run.label + (f" ({run.variant})" if run.variant else "")
            by_task.setdefault(run.task, {})[name] = (points, run.shape.loops, not run.variant)
    intro = (
        "Each method's cheapest operating point (a fixed loop count or an exit rule of `AdaptiveExit`) reaching 99% "
        "of the fixed-L model's accuracy (the best plainly looped run's, at its L), and 99% of its own at L."
    )
    title = "Adaptive depth: accuracy against mean loops"
    return task_sections(by_task, output / "adaptive", title, intro, plot_comparison, comparison_table)


def task_sections(by_task: dict, stem: Path, title: str, intro: str, plot, table) -> list[Section]:
    """A section per task: ``table(rows)`` under ``intro`` and the figure ``plot(rows, path, title=task)`` drawn
    to ``{stem}_{task}.png``."""
    sections = []
    for task, rows in by_task.items():
        slug = re.sub(r"[^A-Za-z0-9_.-]", "_", task) or "all"
        figure = plot(rows, stem.parent / f"{stem.name}_{slug}.png", title=task)
        sections.append(Section(title + (f" ({task})" if task else ""), f"{intro}\n\n{table(rows)}", (figure,)))
    return sections


def known_depth_sections(runs: list[Run], output: Path) -> list[Section]:
    intro = (
        "Mean exit loop (exact match) of each rule on the test set of each depth; a rule tracks depth when it "
        "spends more loops on deeper problems."
    )
    sections = []
    for run in runs:
        results = known_depth(run.scalars)
        if results:
            figure = plot_known_depth(results, output / f"known_depth_{run.label}.png")
            body = f"{intro}\n\n{known_depth_table(results)}"
            sections.append(Section(f"Halting against known depth: `{run.label}`", body, (figure,)))
    return sections


def reasoner_sections(runs: list[Run], output: Path) -> list[Section]:
    """Per task, the deep-supervision runs (``looped.DeepSupervision``) side by side: test exact match after
    every supervision step, with each run's parameters, training FLOPs and wall time, and its figure."""
    by_task: dict[str, list[Reasoner]] = {}
    for run in runs:
        solved = solved_by_step(run.scalars)
        if not solved:
            continue
        mixer = run.config.get("attention", "sdpa")
        model = architecture(run.config) + (", MLP over positions" if mixer == "mlp" else "")
        counted = final_flops(run)[1] if run.last("train/flops") else None
        minutes = None if run.wall_seconds is None else run.wall_seconds / 60
        steps, halting = int(run.model_args.get("supervision_steps", 1)), str(run.model_args.get("halting", "none"))
        row = Reasoner(run.label, model, steps, halting, *model_size(run), counted, minutes, solved)
        by_task.setdefault(run.task, []).append(row)
    intro = (
        "Test exact match (%: puzzles solved) after supervision steps from a fresh state; N_sup is the most "
        "steps training gave an example (1: no deep supervision), later steps are test-time depth. MFLOP of one "
        "puzzle's supervision step (forward), training TFLOP as counted (`train/flops`), minutes of wall time "
        "from the first to the last training step."
    )
    title = "Recursive reasoners: solved after each supervision step"
    return task_sections(by_task, output / "reasoners", title, intro, plot_reasoners, reasoners_table)


@functools.cache
def last_checkpoint(run_path: Path) -> dict | None:
    """The run's ``last.ckpt``, memory-mapped and read once for every section that asks (None without one)."""
    checkpoint = run_path / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        return None
    import torch

    return torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=False)


def model_size(run: Run) -> tuple[int | None, float | None]:
    """``(parameters, forward FLOPs of one example's supervision step)`` of the model ``last.ckpt`` saved the
    config of, built on the meta device (``(None, None)`` without it)."""
    state = last_checkpoint(run.path)
    if state is None:
        return None, None
    import torch

    from looped.model import LoopedConfig, LoopedTransformer

    config = state["hyper_parameters"]["config"]
    config = config if isinstance(config, LoopedConfig) else LoopedConfig(**config)
    with torch.device("meta"):
        model = LoopedTransformer(config)
    step = model.flops_per_token(config.max_seq_len) * config.max_seq_len
    return sum(p.numel() for p in model.parameters()), step


def compute_section(runs: list[Run], loss_set: str | None) -> Section | None:
    """Training compute against held-out perplexity, a row per run that counted its FLOPs (``train/flops``):
    Mixture-of-Recursions' axis, equal training FLOPs, on which a cheaper model trains for more steps."""
    counted = [r for r in runs if r.last("train/flops")]
    if not counted:
        return None
    tag = f"test/loss_{loss_set}" if loss_set else "test/loss"
    reference = max(final_flops(r)[1] for r in counted)
    rows = []
    for run in counted:
        steps, flops = final_flops(run)
        loss = run.last(tag)
        wall = "—" if run.wall_seconds is None else f"{run.wall_seconds / 60:.1f}"
        model = run.shape.name + (f" ({run.variant})" if run.variant else "")
        ppl = "—" if loss is None else f"{math.exp(loss):.1f}"
        rows.append([f"`{run.label}`", model, str(steps), f"{flops / 1e12:.2f}", f"{flops / reference:.3f}", ppl, wall])
    header = ["run", "model", "steps", "training TFLOP", "vs the most", "test ppl", "train minutes"]
    intro = (
        "Training FLOPs as counted (`train/flops`: every step's `flops_per_batch`, a router's loops as routed), "
        f"and the test perplexity (`exp({tag})`) at the end of training."
    )
    return Section("Training compute (equal training FLOPs)", f"{intro}\n\n{_markdown(header, rows)}")


def final_flops(run: Run) -> tuple[int, float]:
    """``(steps, training FLOPs)`` at the end of training: ``last.ckpt``'s exact count when the run kept one (a
    run from before ``LoopedLM`` logged the total at its last step logged it every ``log_every_n_steps`` only),
    else the last ``train/flops`` logged."""
    state = last_checkpoint(run.path)
    if state is not None and "training_flops" in state:
        return int(state["global_step"]), float(state["training_flops"])
    step, flops = run.scalars["train/flops"][-1]
    return step, flops


def variants_section(variants: list[Run], metrics: Sequence[str]) -> Section | None:
    return Section("Training variants", variants_table(variants, metrics)) if variants else None


def scaling_section(cells: dict[str, dict[str, float]], columns: list[str]) -> Section | None:
    fits = scaling_fits(cells, columns)
    if not fits:
        return None
    header = ["metric", "looped", "α_loop", "β_loop", "α_base", "β_base", "α_loop/α_base"]
    body = f"`acc = α·log(D) + β` (natural log, acc in %).\n\n{_markdown(header, fits)}"
    return Section("Scaling with effective depth (Figure 3)", body)


def study_section(runs: list[Run]) -> Section | None:
    study = study_points(runs)
    return Section("Width × problem size (`looped sweep` cells; ✓ = solved)", study_table(study)) if study else None


def main(argv: list[str] | None = None) -> None:
    """``looped report RUN_DIR_OR_PARENT [...] --output DIR [--metric TAG ...] [--group NAME=GLOB ...]``."""
    parser = argparse.ArgumentParser(prog="looped report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="version directories, or folders searched recursively for them")
    parser.add_argument("--output", required=True, type=Path, help="folder for report.md and the PNGs")
    parser.add_argument(
        "--metric",
        action="append",
        default=[],
        help="scalar tag for Table 1 (repeatable; default: every test/*exact_match* tag)",
    )
    parser.add_argument(
        "--group",
        action="append",
        default=[],
        help="task group for Table 3, NAME=GLOB over metric columns (repeatable)",
    )
    parser.add_argument("--isoplot-metric", default="val/exact_match", help="y axis of isoplot.png")
    parser.add_argument(
        "--loss-set",
        help="evaluation set whose loss is the held-out perplexity (e.g. pile; default: the pooled val/loss)",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    runs = load_runs(args.runs)
    if not runs:
        raise SystemExit(f"looped report: no TensorBoard runs under {' '.join(args.runs)}")
    if args.loss_set and not any(f"val/loss_{args.loss_set}" in run.scalars for run in runs):
        sets = sorted({t.removeprefix("val/loss_") for run in runs for t in run.scalars if t.startswith("val/loss_")})
        raise SystemExit(
            f"looped report: --loss-set {args.loss_set}: no run logged val/loss_{args.loss_set}; "
            f"the evaluation sets logged are {', '.join(sets) or 'none (drop --loss-set)'}"
        )
    try:
        print(write_report(runs, args.output, args.metric, args.group, args.isoplot_metric, args.loss_set))
    except ValueError as err:  # a malformed --group
        raise SystemExit(f"looped report: {err}") from err


if __name__ == "__main__":
    main()
