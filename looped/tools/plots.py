"""Figures drawn both live (callbacks, into TensorBoard) and afterwards (``looped report``, as PNG).

Only matplotlib and the numbers it is handed: no Lightning, nothing of ``looped``, so the
callbacks and the report tool draw the same figure from one function.
"""

from __future__ import annotations

from pathlib import Path

DPI = 100


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display on a cluster; must be chosen before pyplot loads)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(figure, path: Path) -> Path:
    """Write ``figure`` as a PNG and free it."""
    figure.savefig(path, dpi=DPI)
    pyplot().close(figure)
    return path


def per_loop_figure(accuracy: list[float], trained_loops: int):
    """Exact match against loops 1..len(accuracy), the trained L marked by a vertical line."""
    plt = pyplot()
    loops = range(1, len(accuracy) + 1)
    fig, ax = plt.subplots(figsize=(4.5, 3.0))
    ax.plot(loops, [100 * a for a in accuracy], marker="o")
    ax.axvline(trained_loops, color="grey", linestyle="--", label=f"trained L = {trained_loops}")
    ax.set_xlabel("loops at inference")
    ax.set_ylabel("exact match %")
    ax.set_xticks(list(loops))
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def cosine_heatmap(values: dict[str, list[float]], block_layers: int):
    """Figure 5 as a heatmap: rows = groups, columns = lower layer l, cell = ``cos(θ^(l), θ^(l+k))``.

    The colour scale is fixed to [-1, 1] so runs compare by eye; every cell is annotated.
    """
    plt = pyplot()
    groups = list(values)
    columns = max((len(v) for v in values.values()), default=0)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * max(columns, 1), 0.8 + 0.45 * max(len(groups), 1)))
    image = ax.imshow(
        [values[g] for g in groups], vmin=-1.0, vmax=1.0, cmap="RdBu_r", aspect="auto", interpolation="nearest"
    )
    for row, group in enumerate(groups):
        for col, value in enumerate(values[group]):
            ax.text(
                col,
                row,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if abs(value) > 0.6 else "black",
            )
    ax.set_xticks(range(columns))
    ax.set_xticklabels([str(i) for i in range(columns)])
    ax.set_yticks(range(len(groups)))
    ax.set_yticklabels(groups)
    ax.set_xlabel(f"lower layer l (paired with l + {block_layers})")
    ax.set_title(f"cos(θ(l), θ(l+k)), k = {block_layers}")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def pareto_figure(fixed: list[float], adaptive: list, trained_loops: int):
    """Accuracy against mean loops: fixed loop counts as a line, adaptive rules (``looped.evaluation.exits.Point``)
    marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.5))
    loops = list(range(1, len(fixed) + 1))
    ax.plot(loops, [100 * a for a in fixed], marker=".", color="grey", label="fixed loops")
    ax.axvline(trained_loops, color="grey", linestyle=":", linewidth=1)
    for rule, marker in (("stable", "o"), ("kl", "s"), ("entropy", "^"), ("gate", "D")):
        points = [p for p in adaptive if p.name.startswith(rule + "_")]
        if not points:
            continue
        xs, ys = [p.mean_loops for p in points], [100 * p.accuracy for p in points]
        ax.scatter(xs, ys, marker=marker, label=rule, zorder=3)
        for p in points:
            ax.annotate(
                p.name.split("_", 1)[1],
                (p.mean_loops, 100 * p.accuracy),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xlabel("mean loops used")
    ax.set_ylabel("exact match %")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def dynamics_figure(dynamics: dict[str, list[float]], trained_loops: int):
    """``LoopDynamics``: one panel per quantity against the loop, the trained L marked in each.

    ``dynamics`` maps a quantity (``residual``, ``top_prob``, ``flip_rate``) to its value after loops
    1..n (NaN where it is undefined: the residual and the flip rate of loop 1 compare with nothing).
    """
    plt = pyplot()
    titles = {
        "residual": "fixed-point residual ‖h_n − h_{n−1}‖ / ‖h_{n−1}‖",
        "top_prob": "logit lens: probability of the argmax",
        "flip_rate": "answer flips: argmax changed since loop n−1",
    }
    names = [name for name in titles if name in dynamics]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        values = dynamics[name]
        ax.plot(range(1, len(values) + 1), values, marker="o")
        ax.axvline(trained_loops, color="grey", linestyle="--", label=f"trained L = {trained_loops}")
        ax.set_title(titles[name], fontsize=8)
        ax.set_xlabel("loop")
        ax.set_xticks(list(range(1, len(values) + 1)))
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig
