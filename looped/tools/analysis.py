"""Numbers the paper reports about families of models: % Gap, the log-depth fit, model shapes.

Pure functions (numpy only), shared by ``looped report`` and the tests.

* ``percent_gap``: Table 3 of Saunshi et al. 2025, how much of the distance from
  the shallow ``(k⊗1)`` to the deep ``(kL⊗1)`` the looped ``(k⊗L)`` covers.
* ``fit_log_depth`` / ``scaling_ratio``: Figure 3, ``acc = α·log(D) + β`` fitted
  separately to looped ``(k⊗L)`` (L varies) and deep ``(D⊗1)`` models;
  ``α_loop / α_base`` (1.19 for reasoning primitives in the paper).
* ``ModelShape``: ``(p⊗1, k⊗L, c⊗1)`` with its name, effective depth and cost.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def percent_gap(avg_looped: float, avg_shallow: float, avg_deep: float) -> float:
    """``(Avg(k⊗L) − Avg(k⊗1)) / (Avg(kL⊗1) − Avg(k⊗1)) × 100``; NaN when deep and shallow tie.

    100 means the looped model closes the whole gap; above 100 it beats the deep model.
    """
    span = avg_deep - avg_shallow
    if span == 0 or any(map(math.isnan, (avg_looped, avg_shallow, avg_deep))):
        return float("nan")
    return (avg_looped - avg_shallow) / span * 100.0


def fit_log_depth(depths: Sequence[float], accs: Sequence[float]) -> tuple[float, float]:
    """Least squares ``acc = α·log(D) + β`` (natural log); returns ``(α, β)``. Needs ≥ 2 distinct depths."""
    d = np.asarray(depths, dtype=float)
    y = np.asarray(accs, dtype=float)
    if d.shape != y.shape or d.ndim != 1:
        raise ValueError(f"fit_log_depth: depths and accs must be 1-D and equally long, got {d.shape} and {y.shape}")
    if np.any(d <= 0):
        raise ValueError(f"fit_log_depth: depths must be positive, got {d.tolist()}")
    if len(np.unique(d)) < 2:
        raise ValueError(f"fit_log_depth: needs at least 2 distinct depths, got {d.tolist()}")
    design = np.stack([np.log(d), np.ones_like(d)], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(design, y, rcond=None)
    return float(alpha), float(beta)


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least squares ``y = a·x + b``; returns ``(a, b)`` (the isoplot's per-family line)."""
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    if len(np.unique(x)) < 2:
        raise ValueError("fit_line: needs at least 2 distinct x values")
    a, b = np.polyfit(x, y, 1)
    return float(a), float(b)


def scaling_ratio(alpha_loop: float, alpha_base: float) -> float:
    """``α_loop / α_base``: how much faster accuracy grows per log-depth by looping than by stacking."""
    return alpha_loop / alpha_base if alpha_base != 0 else float("nan")


@dataclass(frozen=True)
class ModelShape:
    """``(p⊗1, k⊗L, c⊗1)``: p prelude layers, a k-layer block looped L times, c coda layers."""

    block_layers: int
    loops: int = 1
    prelude_layers: int = 0
    coda_layers: int = 0

    @property
    def depth(self) -> int:
        """Effective depth D = p + kL + c."""
        return self.prelude_layers + self.block_layers * self.loops + self.coda_layers

    @property
    def param_layers(self) -> int:
        """Distinct layers (parameters, in units of one layer): p + k + c."""
        return self.prelude_layers + self.block_layers + self.coda_layers

    @property
    def is_middle(self) -> bool:
        return self.prelude_layers > 0 or self.coda_layers > 0

    @property
    def family(self) -> str:
        """The isoplot's families: looped, plain (baseline) or middle-looped."""
        if self.is_middle:
            return "middle looped"
        return "looped (k⊗L)" if self.loops > 1 else "baseline (D⊗1)"

    @property
    def name(self) -> str:
        core = f"{self.block_layers}⊗{self.loops}"
        if not self.is_middle:
            return core
        return f"({self.prelude_layers}⊗1, {core}, {self.coda_layers}⊗1)"

    @property
    def cost(self) -> str:
        """The paper's "params / FLOPs" column, in units of one layer: ``"4x / 12x"``."""
        return f"{self.param_layers}x / {self.depth}x"


def architecture(config) -> str:
    """A model's shape in words, from a ``LoopedConfig`` or its dict in a saved ``config.yaml``: ``(k⊗L)``,
    ``(p⊗1, k⊗L, c⊗1)``, or the recursive reasoners' ``TRM: 2 layers, n=3, T=2`` and ``HRM: low 2 + high 2
    layers, 2×2 cycles`` (``looped plan`` and ``looped report`` name models with it)."""
    defaults = {"block_layers": 1, "loops": 1, "prelude_layers": 0, "coda_layers": 0, "recursion": "loop"}
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    c = {key: get(key, default) for key, default in defaults.items()}
    n, t = get("latent_steps"), get("answer_steps")
    if c["recursion"] == "trm":  # one network: n latent updates, then the answer, T times per supervision step
        return f"TRM: {c['block_layers']} layers, n={n}, T={t}"
    if c["recursion"] == "hrm":
        return f"HRM: low {c['block_layers']} + high {get('high_layers')} layers, {n}×{t} cycles"
    shape = ModelShape(c["block_layers"], c["loops"], c["prelude_layers"], c["coda_layers"])
    return shape.name if shape.is_middle else f"({shape.name})"


_SIMPLE = re.compile(r"^\s*(\d+)\s*[⊗x×]\s*(\d+)\s*$")
_MIDDLE = re.compile(r"^\s*\(?\s*(\d+)\s*[⊗x×]\s*1\s*,\s*(\d+)\s*[⊗x×]\s*(\d+)\s*,\s*(\d+)\s*[⊗x×]\s*1\s*\)?\s*$")


def parse_shape(name: str) -> ModelShape | None:
    """``"k⊗L"`` or ``"(p⊗1, k⊗L, c⊗1)"`` (``x`` or ``×`` also accepted); None for anything else."""
    if m := _SIMPLE.match(name):
        return ModelShape(int(m[1]), int(m[2]))
    if m := _MIDDLE.match(name):
        return ModelShape(int(m[2]), int(m[3]), prelude_layers=int(m[1]), coda_layers=int(m[4]))
    return None


@dataclass(frozen=True)
class GapFamily:
    """A looped ``(k⊗L)`` with its shallow ``(k⊗1)`` and deep ``(kL⊗1)`` baselines (keys into a table)."""

    looped: str
    shallow: str
    deep: str


def gap_families(names: Sequence[str]) -> list[GapFamily]:
    """Every looped ``k⊗L`` (L > 1, no prelude/coda) whose ``k⊗1`` and ``kL⊗1`` are also in ``names``.

    ``names`` are model names (see ``parse_shape``); the order of the result follows
    decreasing k, like the paper's Table 3.
    """
    shapes = {name: parse_shape(name) for name in names}
    plain_by_depth = {s.block_layers: n for n, s in shapes.items() if s and s.loops == 1 and not s.is_middle}
    families = []
    for name, shape in shapes.items():
        if shape is None or shape.loops == 1 or shape.is_middle:
            continue
        shallow = plain_by_depth.get(shape.block_layers)
        deep = plain_by_depth.get(shape.depth)
        if shallow is not None and deep is not None:
            families.append(GapFamily(name, shallow, deep))
    families.sort(key=lambda f: (-shapes[f.looped].depth, -shapes[f.looped].block_layers, shapes[f.looped].loops))
    return families


def gap_table(rows: dict[str, dict[str, float]], columns: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """``{looped name: {column: % Gap}}`` for every family ``gap_families`` finds in ``rows``.

    ``rows`` maps a model name to its numbers per column (e.g. task-group averages);
    a column missing from any of the three rows gives NaN.
    """
    nan = float("nan")
    if columns is None:
        columns = list(dict.fromkeys(c for values in rows.values() for c in values))
    gaps = {}
    for family in gap_families(list(rows)):
        looped, shallow, deep = rows[family.looped], rows[family.shallow], rows[family.deep]
        gaps[family.looped] = {
            c: percent_gap(looped.get(c, nan), shallow.get(c, nan), deep.get(c, nan)) for c in columns
        }
    return gaps


def paper_order(names: Sequence[str]) -> list[str]:
    """The paper's order: the deepest plain model first, then by k, plain before looped."""
    shapes = {n: parse_shape(n) or ModelShape(1) for n in names}
    plain = [n for n, s in shapes.items() if s.loops == 1 and not s.is_middle]
    deepest = max(plain, key=lambda n: shapes[n].depth, default=None)
    return sorted(names, key=lambda n: (n != deepest, shapes[n].block_layers, shapes[n].is_middle, shapes[n].loops))


def task_groups(columns: Sequence[str], groups: Sequence[str]) -> dict[str, list[str]]:
    """``NAME=GLOB`` options to ``{name: columns}``; no options: every column is its own group."""
    if not groups:
        return {c: [c] for c in columns}
    out = {}
    for spec in groups:
        name, sep, pattern = spec.partition("=")
        if not sep:
            raise ValueError(f"--group wants NAME=GLOB, got {spec!r}")
        out[name] = [c for c in columns if fnmatch.fnmatch(c, pattern) or fnmatch.fnmatch("test/" + c, pattern)]
    return {name: cols for name, cols in out.items() if cols}
