"""The 8 symmetries of a square (the dihedral group D4) on grids, shared by the maze and ARC augmentations.

Ids follow HRM's and TRM's ``dataset/common.py``, so an augmented puzzle's name means the same
thing here and there: 0 identity, 1–3 a quarter turn counter-clockwise 1–3 times (``np.rot90``),
4 left–right flip, 5 up–down flip, 6 transpose, 7 anti-transpose. Each is its own inverse except
the quarter turns (``INVERSE``).

``dihedral`` moves one grid; ``dihedral_batch`` moves a batch of grids of different shapes, each
drawn at the top-left of a fixed canvas (ARC's 30×30), in one gather, so that augmenting a
training batch is a few numpy calls whatever the batch size.
"""

from __future__ import annotations

import numpy as np

INVERSE = np.array([0, 3, 2, 1, 4, 5, 6, 7])
"""``INVERSE[t]``: the transform that undoes ``t``."""

SWAPS_AXES = np.array([False, True, False, True, False, False, True, True])
"""Transforms that turn an h×w grid into a w×h one."""


def dihedral(grid: np.ndarray, t: int) -> np.ndarray:
    """``grid`` ``[h w]`` moved by transform ``t`` (a view where numpy allows)."""
    if t in (1, 2, 3):
        return np.rot90(grid, k=t)
    return [grid, None, None, None, grid[:, ::-1], grid[::-1], grid.T, grid[::-1, ::-1].T][t]


# Each transform as affine maps of the moved grid's cell (i, j): the source row is
# ROW[t] · (i, j, h - 1) and the source column COL[t] · (i, j, w - 1) (rot90 turns counter-clockwise).
ROW = np.array([[1, 0, 0], [0, 1, 0], [-1, 0, 1], [0, -1, 1], [1, 0, 0], [-1, 0, 1], [0, 1, 0], [0, -1, 1]])
COL = np.array([[0, 1, 0], [-1, 0, 1], [0, -1, 1], [1, 0, 0], [0, -1, 1], [0, 1, 0], [1, 0, 0], [-1, 0, 1]])


def source_cells(
    t: np.ndarray, shapes: np.ndarray, size: int, offsets: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Where each cell of the moved grids comes from: ``(flat source index, inside)``, each ``[n size size]``.

    ``t`` ``[n]`` transforms, ``shapes`` ``[n 2]`` the source grids' (h, w) at the canvas's top-left,
    ``offsets`` ``[n 2]`` where each moved grid's top-left goes (default: the canvas's); canvas cell
    (i, j) of grid b is source cell ``index[b, i, j]`` (row-major) where ``inside``, padding elsewhere.
    """
    n = len(t)
    offsets = np.zeros((n, 2), np.int32) if offsets is None else offsets.astype(np.int32)
    i = np.arange(size, dtype=np.int32)[None, :, None] - offsets[:, 0, None, None]
    j = np.arange(size, dtype=np.int32)[None, None, :] - offsets[:, 1, None, None]
    h, w = shapes[:, 0].astype(np.int32), shapes[:, 1].astype(np.int32)
    r, c = ROW[t].astype(np.int32), COL[t].astype(np.int32)
    rows = r[:, 0, None, None] * i + r[:, 1, None, None] * j + (r[:, 2] * (h - 1))[:, None, None]
    cols = c[:, 0, None, None] * i + c[:, 1, None, None] * j + (c[:, 2] * (w - 1))[:, None, None]
    out_h, out_w = np.where(SWAPS_AXES[t], w, h), np.where(SWAPS_AXES[t], h, w)
    inside = (i >= 0) & (i < out_h[:, None, None]) & (j >= 0) & (j < out_w[:, None, None])
    return np.where(inside, rows * size + cols, 0), inside


def dihedral_batch(grids: np.ndarray, t: np.ndarray, shapes: np.ndarray | None = None, fill: int = 0) -> np.ndarray:
    """Grids ``[n S S]`` moved by transforms ``t`` ``[n]``, each kept at the canvas's top-left.

    ``shapes`` ``[n 2]``: each grid's (h, w) inside the canvas (default: the whole S×S); cells
    outside the moved grid are ``fill``.
    """
    n, size, _ = grids.shape
    if shapes is None:
        shapes = np.full((n, 2), size)
    index, inside = source_cells(np.asarray(t), np.asarray(shapes), size)
    moved = np.take_along_axis(grids.reshape(n, -1), index.reshape(n, -1), axis=1).reshape(grids.shape)
    return np.where(inside, moved, np.array(fill, grids.dtype))


def moved_shapes(t: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """``[n 2]``: the (h, w) of each grid after its transform."""
    return np.where(SWAPS_AXES[np.asarray(t)][:, None], shapes[:, ::-1], shapes)
