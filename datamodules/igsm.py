"""i-GSM: symbolic grade-school math DAGs, arithmetic mod 7 (Table 2 of Saunshi et al. 2025).

The symbolic form of the iGSM generator of Ye, Xu, Li & Allen-Zhu ("Physics of
Language Models, Part 2.1"), with every value taken mod 7:

* **Entity hierarchy.** ``layers`` categories (the paper: depth 4), each with
  ``entities_per_layer`` entities named by capital letters, layer by layer:
  with 4 × 4 they are ``A–D | E–H | I–L | M–P``.
* **Structure graph.** ``num_edges`` distinct edges, each from an entity of one
  layer to one of the next, drawn uniformly from all such pairs. Edge
  ``(u, v)`` is an *instance parameter*, "the number of v's in each u",
  written ``u#v`` (two tokens ``u v``), e.g. ``E#I``. There are no abstract
  parameters (sums over a category), as in the symbolic i-GSM of the paper.
* **Dependency DAG.** The parameters get a random topological order. The first
  is a constant; of the others, ``num_operations`` are *derived* and the rest
  constants. A constant is ``u#v = c`` with ``c`` uniform in ``0..6``; a derived
  parameter is ``u#v = x ∘ y`` with ``∘`` uniform in ``{+, -, *}`` (mod 7) and
  ``x ≠ y`` drawn uniformly from the parameters earlier in the topological
  order (the second parameter has only the first to read: ``x ∘ x``). An
  *operation* is one derived equation, each with exactly one operator.
* **Query.** The parameter of greatest DAG depth (constants have depth 0, a
  derived parameter one more than its deepest operand); ties are broken at
  random. Its depth is between 1 and ``num_operations``.

A sample lists the equations in a uniformly SHUFFLED order (not topological:
an equation may read a parameter defined further right), then ``?``, the
queried parameter and ``=``; the answer ``0..6`` is the only label, at ``=``::

    E#I = 4 ; F#K = E#J * E#I ; E#J = E#I + E#I ; B#F = 3 ; ? F#K =      → 4

``shuffle=False`` keeps the equations in their topological order instead, so
every operand is defined further left and every value can be computed where it
is written, one hop per operation (the CPU recipes: with the shuffle, no model
that trains in ten CPU minutes learns the task, see the README).

Every sample of one setting has the same length (5 tokens per constant, 9 per
derived equation, 4 for the query), so padding only appears with ``pad_to``
(``<pad>`` on the left, which keeps the answer last).

``supervise="all"`` adds a causal auxiliary, every value a reader of the prefix
can already know: at the ``;`` that ends a parameter's equation, that
parameter's value, wherever every parameter it (transitively) reads is defined
further left; and at each operand read (the second token of its name), the
operand's value, wherever the operand's equation and everything it reads lie
to the left. The reads teach the binding of a name to its value one hop at a
time (as ``supervise="all"`` does in p-hop and the reasoning primitives).
Evaluation always scores the final answer alone.

``eval_depths`` evaluates on one named set per query depth (``depth2``, ``depth3``, …), each holding
problems whose queried parameter is that many operations deep — the depth the sample needs, known to
the generator — so ``AdaptiveExit`` reports the loop each exit rule stops at against it (``looped
report``'s known-depth table). Training keeps the natural mix of depths.
"""

from __future__ import annotations

import string
from typing import Literal

import numpy as np

from looped.contract import IGNORE
from looped.datamodules.base import SyntheticTask, answer_at_end, draw_kept
from looped.errors import InputError

PAD = "<pad>"
OPERATORS = ["+", "-", "*"]
SYMBOLS = ["=", *OPERATORS, ";", "?"]
CONSTANT_LEN, DERIVED_LEN, QUERY_LEN = 5, 9, 4  # u v = c ; | u v = x1 x2 ∘ y1 y2 ; | ? u v =


class IGSM(SyntheticTask):
    """Symbolic i-GSM: evaluate a queried node of a random dependency DAG, mod ``modulus``.

    Args:
        num_operations: derived (one-operator) equations per problem; the query needs
            between 1 and this many of them.
        num_edges: instance parameters (structure-graph edges) per problem = equations.
        layers: categories in the entity hierarchy (the paper: 4).
        entities_per_layer: entities per category.
        modulus: arithmetic modulus; values and answers are ``0..modulus-1`` (the paper: 7).
        pad_to: left-pad every sample to this length (default: none), so that settings of
            different sizes share one sequence length.
        supervise: ``last`` trains on the answer only (the paper); ``all`` also labels the
            ``;`` of every equation and every operand read whose value the prefix determines.
        shuffle: list the equations in a random order (the paper); ``False`` keeps their
            topological order (every operand defined before it is read).
        eval_depths: evaluate on one named set per query depth (``depth2``, ``depth3``, ...) instead
            of one set of the natural mix; each depth must occur in this setting (checked).
        **kwargs: batch sizes, eval set sizes, seed, workers (see ``SyntheticTask``).
    """

    def __init__(
        self,
        num_operations: int = 12,
        num_edges: int = 20,
        layers: int = 4,
        entities_per_layer: int = 4,
        modulus: int = 7,
        pad_to: int | None = None,
        supervise: Literal["last", "all"] = "last",
        shuffle: bool = True,
        eval_depths: list[int] | None = None,
        **kwargs,
    ) -> None:
        self.eval_depths = sorted(set(eval_depths or []))
        self.eval_names = [f"depth{d}" for d in self.eval_depths]  # before SyntheticTask draws the sets
        super().__init__(**kwargs)
        if layers < 2:
            raise InputError(f"data.layers must be >= 2 (an edge joins two consecutive layers), got {layers}")
        if entities_per_layer < 1:
            raise InputError(f"data.entities_per_layer must be >= 1, got {entities_per_layer}")
        if layers * entities_per_layer > len(string.ascii_uppercase):
            raise InputError(
                f"data.layers * data.entities_per_layer = {layers * entities_per_layer} entities, but only "
                f"{len(string.ascii_uppercase)} letter names exist; lower data.entities_per_layer"
            )
        possible = (layers - 1) * entities_per_layer**2
        if not 2 <= num_edges <= possible:
            raise InputError(
                f"data.num_edges={num_edges} is impossible: a hierarchy of data.layers={layers} with "
                f"data.entities_per_layer={entities_per_layer} has {possible} possible edges and a problem "
                f"needs at least 2 (a constant and a derived parameter). Use 2 <= data.num_edges <= {possible}."
            )
        if not 1 <= num_operations <= num_edges - 1:
            raise InputError(
                f"data.num_operations={num_operations} is impossible with data.num_edges={num_edges}: the first "
                f"parameter of the DAG must be a constant, so 1 <= data.num_operations <= {num_edges - 1}"
            )
        if modulus < 2:
            raise InputError(f"data.modulus must be >= 2, got {modulus}")
        self.num_operations, self.num_edges = num_operations, num_edges
        self.layers, self.entities_per_layer, self.modulus = layers, entities_per_layer, modulus
        self.supervise = supervise
        self.shuffle = shuffle
        if pad_to is not None and pad_to < self.natural_len:
            raise InputError(
                f"data.pad_to={pad_to} is shorter than a sample of this setting ({self.natural_len} tokens: "
                f"{num_edges - num_operations} constants x {CONSTANT_LEN} + {num_operations} operations x "
                f"{DERIVED_LEN} + {QUERY_LEN}); use data.pad_to >= {self.natural_len} or leave it unset"
            )
        self.pad_to = pad_to
        self._entity0, self._digit0 = self.token_ids["A"], self.token_ids["0"]
        self._op0 = self.token_ids[OPERATORS[0]]
        self._depth_rate = self._check_eval_depths()

    def _check_eval_depths(self) -> dict[int, float]:
        """How often each of ``eval_depths`` is the query depth (a pilot draw); refuse one that (almost) never is."""
        if not self.eval_depths:
            return {}
        *_, depth = self.draw(np.random.default_rng(0), 4096)
        rate = {d: float(np.mean(depth == d)) for d in range(1, self.num_operations + 1)}
        rare = [d for d in self.eval_depths if rate.get(d, 0.0) < 0.001]
        if rare:
            seen = ", ".join(f"{d} ({100 * r:.0f}%)" for d, r in rate.items() if r >= 0.001)
            raise InputError(
                f"data.eval_depths: no query of this setting is {', '.join(map(str, rare))} operations deep "
                f"(the query is the deepest parameter); the depths that occur: {seen}. Evaluate those, "
                "or change data.num_operations / data.num_edges"
            )
        return rate

    # -- vocabulary and lengths ------------------------------------------------
    @property
    def entities(self) -> list[str]:
        return list(string.ascii_uppercase[: self.layers * self.entities_per_layer])

    @property
    def vocab(self) -> list[str]:
        return [PAD] + self.entities + [str(v) for v in range(self.modulus)] + SYMBOLS

    @property
    def natural_len(self) -> int:
        constants = self.num_edges - self.num_operations
        return CONSTANT_LEN * constants + DERIVED_LEN * self.num_operations + QUERY_LEN

    @property
    def seq_len(self) -> int:
        return self.pad_to or self.natural_len

    def decode(self, ids) -> str:
        """``E#I = 4 ; F#K = E#J * E#I ; … ; ? F#K =`` (an entity pair joined by ``#``)."""
        words: list[str] = []
        entity = False
        for i in np.asarray(ids).tolist():
            if not 0 < i < self.vocab_size:
                continue
            token = self.vocab[i]
            if entity and token in self.entities:
                words[-1] += "#" + token
                entity = False
            else:
                words.append(token)
                entity = token in self.entities
        return " ".join(words)

    def describe(self) -> str:
        return (
            f"{super().describe()}; {self.num_edges} equations ({self.num_operations} operations "
            f"in {{{', '.join(OPERATORS)}}} mod {self.modulus}), "
            f"{'shuffled' if self.shuffle else 'in topological order'}; entity layers "
            + " | ".join(
                "".join(self.entities[i * self.entities_per_layer : (i + 1) * self.entities_per_layer])
                for i in range(self.layers)
            )
        )

    # -- generation --------------------------------------------------------------
    def _structure(self, rng: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Distinct edges in topological order: (parent entity, child entity), each ``[m e]``."""
        n = self.entities_per_layer
        # argsort of uniform keys = a uniform permutation of all edges; its first e
        # are a uniform e-subset in a uniform (topological) order.
        edge = np.argsort(rng.random((m, (self.layers - 1) * n * n)), axis=1)[:, : self.num_edges]
        layer, within = np.divmod(edge, n * n)
        parent, child = np.divmod(within, n)
        return layer * n + parent, (layer + 1) * n + child

    def generate(self, rng: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray]:
        input_ids, labels, _ = self.draw(rng, m)
        return input_ids, labels

    def generate_eval(self, name: str, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` problems whose query is ``depth<d>``'s d operations deep (drawn, the others dropped)."""
        depth = int(name.removeprefix("depth"))

        def of_that_depth(m: int) -> tuple[np.ndarray, np.ndarray]:
            input_ids, labels, query_depth = self.draw(rng, m)
            return input_ids[query_depth == depth], labels[query_depth == depth]

        return draw_kept(n, self._depth_rate[depth], of_that_depth)

    def draw(self, rng: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``m`` problems: ``input_ids`` and ``labels`` ``[m t]`` and each query's DAG depth ``[m]``."""
        e, ops, p = self.num_edges, self.num_operations, self.modulus
        rows = np.arange(m)
        parent, child = self._structure(rng, m)
        # Which topological positions 1..e-1 are derived (position 0 must be a constant).
        derived = np.zeros((m, e), dtype=bool)
        derived[rows[:, None], 1 + np.argsort(rng.random((m, e - 1)), axis=1)[:, :ops]] = True
        # Two distinct operands, uniform over the k earlier positions (position 1 has only
        # one: it reads it twice). Distinct, so ``x - x`` does not pile answers onto 0.
        k = np.arange(e)
        left = (rng.random((m, e)) * k).astype(np.int64)
        right = (left + 1 + (rng.random((m, e)) * np.maximum(k - 1, 0)).astype(np.int64)) % np.maximum(k, 1)
        right = np.where(k >= 2, right, left)
        operator = rng.integers(0, len(OPERATORS), size=(m, e))
        constant = rng.integers(0, p, size=(m, e))

        value = np.zeros((m, e), dtype=np.int64)
        depth = np.zeros((m, e), dtype=np.int64)
        for i in range(e):  # topological order: operands are already known
            x, y = value[rows, left[:, i]], value[rows, right[:, i]]
            computed = np.choose(operator[:, i], [(x + y) % p, (x - y) % p, (x * y) % p])
            value[:, i] = np.where(derived[:, i], computed, constant[:, i])
            deeper = np.maximum(depth[rows, left[:, i]], depth[rows, right[:, i]]) + 1
            depth[:, i] = np.where(derived[:, i], deeper, 0)
        query = np.argmax(depth + rng.random((m, e)) * 0.5, axis=1)  # deepest; ties at random

        # Tokens of every equation in topological order, [m e 9], with a mask of the used slots.
        name = np.stack([self._entity0 + parent, self._entity0 + child], axis=2)  # [m e 2]
        tokens = np.full((m, e, DERIVED_LEN), self.token_ids[";"], dtype=np.int64)
        tokens[:, :, 0:2] = name
        tokens[:, :, 2] = self.token_ids["="]
        tokens[:, :, 3:5] = np.take_along_axis(name, left[:, :, None], axis=1)
        tokens[:, :, 5] = self._op0 + operator
        tokens[:, :, 6:8] = np.take_along_axis(name, right[:, :, None], axis=1)
        constant_row = np.full((m, e, DERIVED_LEN), -1, dtype=np.int64)
        constant_row[:, :, :5] = tokens[:, :, :5]
        constant_row[:, :, 3] = self._digit0 + constant
        constant_row[:, :, 4] = self.token_ids[";"]
        tokens = np.where(derived[:, :, None], tokens, constant_row)
        if self.shuffle:  # a random presentation order; every row keeps the same number of tokens
            order = np.argsort(rng.random((m, e)), axis=1)
            tokens = np.take_along_axis(tokens, order[:, :, None], axis=1)
        tokens = tokens.reshape(m, -1)
        body = tokens[tokens >= 0].reshape(m, self.natural_len - QUERY_LEN)

        question = np.stack([np.full(m, self.token_ids["?"]), *name[rows, query].T], axis=1)  # ? u v
        pad = np.full((m, self.seq_len - self.natural_len), self.token_ids[PAD], dtype=np.int64)
        input_ids, labels = answer_at_end(
            np.concatenate([pad, body, question], axis=1), self._digit0 + value[rows, query], self.token_ids["="]
        )
        return input_ids, labels, depth[rows, query]

    # -- dense labels ------------------------------------------------------------
    def labels_at_every_position(self, input_ids: np.ndarray) -> np.ndarray:
        """Each ``;`` and operand read labelled with its value where the prefix determines it; ``=`` with the answer.

        Read back from the tokens (the base class redraws samples that collide with
        evaluation sets, so labels cannot be carried from ``generate``).
        """
        m, e, p = len(input_ids), self.num_edges, self.modulus
        rows = np.arange(m)[:, None]
        ends = np.nonzero(input_ids == self.token_ids[";"])[1].reshape(m, e)  # each equation's ';'
        is_derived = input_ids[rows, ends - 2] != self.token_ids["="]  # a constant ends '= c ;'
        start = np.where(is_derived, ends - 8, ends - 4)

        def key(at: np.ndarray) -> np.ndarray:
            """A number per parameter name ``u v`` whose ``u`` sits at column ``at``."""
            at = np.broadcast_to(at, (m, np.shape(at)[-1]))
            return (input_ids[rows, at] - self._entity0) * 26 + input_ids[rows, at + 1] - self._entity0

        own = key(start)
        # Equation index of each parameter name, per row.
        lookup = np.zeros((m, 26 * 26), dtype=np.int64)
        np.put_along_axis(lookup, own, np.broadcast_to(np.arange(e), (m, e)), axis=1)
        left = np.where(is_derived, np.take_along_axis(lookup, key(start + 3), axis=1), 0)
        right = np.where(is_derived, np.take_along_axis(lookup, key(start + 6), axis=1), 0)
        operator = np.where(is_derived, input_ids[rows, start + 5] - self._op0, 0)
        value = np.where(is_derived, 0, input_ids[rows, start + 3] - self._digit0)
        ready = ends.copy()  # rightmost ';' among the parameter and everything it reads
        for _ in range(self.num_operations):  # synchronous updates: exact after depth <= ops rounds
            x, y = np.take_along_axis(value, left, axis=1), np.take_along_axis(value, right, axis=1)
            computed = np.choose(operator, [(x + y) % p, (x - y) % p, (x * y) % p])
            value = np.where(is_derived, computed, value)
            reach = np.maximum(np.take_along_axis(ready, left, axis=1), np.take_along_axis(ready, right, axis=1))
            ready = np.where(is_derived, np.maximum(ends, reach), ends)
        labels = np.full_like(input_ids, IGNORE)
        known = ready == ends
        np.put_along_axis(labels, ends, np.where(known, self._digit0 + value, IGNORE), axis=1)
        for operand, at in ((left, start + 4), (right, start + 7)):  # a read: its name's second token
            row, eq = np.nonzero(is_derived & (np.take_along_axis(ready, operand, axis=1) < at))
            labels[row, at[row, eq]] = self._digit0 + value[row, operand[row, eq]]
        query = np.take_along_axis(lookup, key(np.array([input_ids.shape[1] - 3])), axis=1)  # ? u v =
        labels[:, -1] = self._digit0 + np.take_along_axis(value, query, axis=1)[:, 0]
        return labels
