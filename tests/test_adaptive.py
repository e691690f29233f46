"""Adaptive exit against a slow reference that really stops each sequence: one forward per loop count, per sample."""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import tiny_model, tiny_module
from looped import LoopedTransformer
from looped.callbacks import AdaptiveExit
from looped.datamodules import NaryAddition, PHop
from looped.evaluation.exits import (
    Point,
    adaptive_exits,
    correct_at_exit,
    exit_loops_kl,
    exit_loops_stable,
    first_exit,
    pareto,
)
from looped.evaluation.loop_readout import LoopPredictions, per_loop_predictions

MAX_LOOPS = 7
PATIENCE = (1, 2, 3)


def make(**overrides) -> LoopedTransformer:
    # A large init makes every loop move the prediction, so samples exit at different loops.
    fields = dict(vocab_size=5, max_seq_len=12, d_model=32, n_heads=4, d_ff=64, loops=3, init_std=0.3)
    return tiny_model(**{**fields, **overrides})


def batch(vocab_size: int = 5, size: int = 24, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab_size, (size, length), generator=g)
    labels = torch.full_like(input_ids, -100)
    labels[:, -1] = torch.randint(0, vocab_size, (size,), generator=g)
    labels[::3, 4] = torch.randint(0, vocab_size, (len(labels[::3]),), generator=g)  # some have two answers
    labels[5] = -100  # and one has none
    return input_ids, labels


def reference_run(model, input_ids, labels, rule: str, param: float) -> tuple[int, bool]:
    """One sample: run loops=1, 2, ... as separate forwards and stop when the rule fires."""
    positions = [i for i, y in enumerate(labels.tolist()) if y != -100]
    previous, run = None, 0
    for n in range(1, MAX_LOOPS + 1):
        logits = model(input_ids[None], loops=n)[0]
        logprobs = [logits[i].double().log_softmax(-1).tolist() for i in positions]
        pred = [max(range(len(lp)), key=lp.__getitem__) for lp in logprobs]
        stop = False
        if previous is not None:
            if rule == "stable":
                run = run + 1 if pred == previous[0] else 0
                stop = run >= param
            else:
                kls = [sum(math.exp(a) * (a - b) for a, b in zip(p, q)) for p, q in zip(logprobs, previous[1])]
                stop = max(kls, default=-math.inf) < param
        if stop or n == MAX_LOOPS:
            return n, all(pred[j] == labels[i].item() for j, i in enumerate(positions))
        previous = (pred, logprobs)
    raise AssertionError("unreachable")


def reference_max_kls(model, input_ids, labels) -> list[float]:
    """Every sample's largest KL(p_n ‖ p_{n-1}) at every loop: where thresholds must not sit."""
    values = []
    for b in range(len(input_ids)):
        positions = [i for i, y in enumerate(labels[b].tolist()) if y != -100]
        if not positions:
            continue
        loops = range(1, MAX_LOOPS + 1)
        dists = [model(input_ids[b : b + 1], loops=n)[0, positions].double().log_softmax(-1) for n in loops]
        for p, q in zip(dists[1:], dists[:-1]):
            values.append((p.exp() * (p - q)).sum(-1).max().item())
    return sorted(values)


@pytest.mark.parametrize("overrides", [{}, {"prelude_layers": 1, "coda_layers": 1}], ids=["plain", "middle"])
def test_vectorised_exits_match_slow_reference(overrides):
    model = make(**overrides)
    input_ids, labels = batch()
    with torch.no_grad():
        kls = reference_max_kls(model, input_ids, labels)
        # Thresholds halfway (geometrically) between observed KLs, so float noise cannot flip a decision.
        thresholds = [math.sqrt(kls[i] * kls[i + 1]) for i in (len(kls) // 4, len(kls) // 2, 3 * len(kls) // 4)]
        assert all(kls[i + 1] / kls[i] > 1.001 for i in (len(kls) // 4, len(kls) // 2, 3 * len(kls) // 4))
        pred = per_loop_predictions(model, input_ids, labels, MAX_LOOPS)
        exits = adaptive_exits(pred, PATIENCE, thresholds)
        spread = set()
        for rule, params in (("stable", PATIENCE), ("kl", thresholds)):
            for param in params:
                name = f"{rule}_{param:g}"
                expected = [reference_run(model, input_ids[b], labels[b], rule, param) for b in range(len(labels))]
                assert exits[name].tolist() == [n for n, _ in expected], name
                assert correct_at_exit(pred, exits[name]).tolist() == [ok for _, ok in expected], name
                spread |= set(exits[name].tolist())
    assert len(spread) >= 4  # the rules really exit at different loops here


def test_stable_rule_by_hand():
    # one sample, one position, predictions after loops 1..5: A B B B C
    preds = torch.tensor([[0], [1], [1], [1], [2]])
    wrong = torch.zeros(5, 1, dtype=torch.bool)
    pred = LoopPredictions(preds=preds, kl=torch.zeros(5, 1), correct=wrong, sample=torch.tensor([0]))
    assert [exit_loops_stable(pred, m).item() for m in (1, 2, 3)] == [3, 4, 5]
    assert first_exit(torch.zeros(0, 2, dtype=torch.bool), 1).tolist() == [1, 1]  # one loop only: exit there


def test_kl_rule_takes_the_worst_position():
    # 4 loops, 2 positions of 1 sample
    kl = torch.tensor([[math.inf, math.inf], [0.5, 0.01], [0.05, 0.2], [0.02, 0.001]])
    preds, right = torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 1, dtype=torch.bool)
    pred = LoopPredictions(preds=preds, kl=kl, correct=right, sample=torch.tensor([0, 0]))
    assert [exit_loops_kl(pred, t).item() for t in (1.0, 0.3, 0.1, 0.01)] == [2, 3, 4, 4]


def test_pareto_front():
    points = [Point("a", 1, 0.2), Point("b", 2, 0.5), Point("c", 2.5, 0.4), Point("d", 3, 0.5), Point("e", 4, 0.9)]
    assert [p.name for p in pareto(points)] == ["a", "b", "e"]


NAMED_SETS = dict(digits=1, train_operands=(2, 3), eval_operands=(2, 3), batch_size=16, val_size=32, test_size=24)


@pytest.mark.parametrize(
    "data",
    [
        PHop(length=16, hops=2, batch_size=16, val_size=32, test_size=32),
        NaryAddition(**NAMED_SETS),  # two named test sets (n2, n3): pooled and per set
    ],
    ids=["one set", "named sets"],
)
def test_callback_logs_what_the_functions_compute(data, tmp_path):
    module = tiny_module(
        vocab_size=data.vocab_size, max_seq_len=data.seq_len, d_model=32, n_heads=4, d_ff=64, loops=2, init_std=0.3
    )
    callback = AdaptiveExit(max_eval_loops=5, patience=(1, 2), kl_thresholds=(1e-2,))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.test(module, datamodule=data, verbose=False)
    logged = trainer.callback_metrics
    loaders = data.test_dataloader()
    loaders = dict(zip(data.eval_names, loaders)) if data.eval_names else {"": loaders}
    right, loops, total = {}, {}, {}  # {set: {rule: count}}, {set: samples}
    with torch.no_grad():
        for set_name, loader in loaders.items():
            right[set_name], loops[set_name], total[set_name] = {}, {}, 0
            for b in loader:  # the plain loop over the data, batch by batch
                pred = per_loop_predictions(module.model, b["input_ids"], b["labels"], 5)
                total[set_name] += pred.batch_size
                for name, exits in adaptive_exits(pred, (1, 2), (1e-2,)).items():
                    right[set_name][name] = right[set_name].get(name, 0) + correct_at_exit(pred, exits).sum().item()
                    loops[set_name][name] = loops[set_name].get(name, 0) + exits.sum().item()
    rules = {"stable_1", "stable_2", "kl_0.01"}
    assert all(set(r) == rules for r in right.values())
    everything = sum(total.values())
    for name in rules:
        pooled_right = sum(r[name] for r in right.values())
        pooled_loops = sum(used[name] for used in loops.values())
        assert logged[f"test/adaptive/{name}/exact_match"].item() == pytest.approx(pooled_right / everything)
        assert logged[f"test/adaptive/{name}/mean_loops"].item() == pytest.approx(pooled_loops / everything)
        for set_name in data.eval_names or []:
            n = total[set_name]
            assert logged[f"test/adaptive/{name}/exact_match_{set_name}"].item() == pytest.approx(
                right[set_name][name] / n
            )
            assert logged[f"test/adaptive/{name}/mean_loops_{set_name}"].item() == pytest.approx(
                loops[set_name][name] / n
            )
    events = EventAccumulator(str(trainer.logger.log_dir), size_guidance={"images": 0}).Reload()
    assert "test/adaptive/pareto" in events.Tags()["images"]


def test_a_routed_model_is_scored_by_the_depths_its_router_gives_the_labelled_tokens(tmp_path):
    """Rules ``router_top_k`` and ``router_causal``: a token-choice router's depth for a token is the argmax of its
    scores on the state entering loop 1 (here the embeddings: no prelude), computed slowly, position by position;
    a sample's exit is the deepest of its labelled tokens, its answer the trained L's."""
    data = NaryAddition(**NAMED_SETS)
    module = tiny_module(
        vocab_size=data.vocab_size,
        max_seq_len=data.seq_len,
        d_model=32,
        n_heads=4,
        d_ff=64,
        loops=3,
        init_std=0.3,
        router="token_choice",
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[AdaptiveExit(patience=(1,), kl_thresholds=(), entropy_thresholds=())],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.test(module, datamodule=data, verbose=False)
    logged, model = trainer.callback_metrics, module.model
    depths_seen = set()
    for set_name, loader in zip(data.eval_names, data.test_dataloader(), strict=True):
        right = used = total = 0
        with torch.no_grad():
            for b in loader:
                x, labels = b["input_ids"], b["labels"]
                prediction = model(x).argmax(-1)
                for row in range(len(x)):
                    positions = [t for t in range(x.shape[1]) if labels[row, t] != -100]
                    scores = [model.router.score(model.embed_tokens(x[row : row + 1])[0, t]) for t in positions]
                    depth = max(int(s.argmax()) + 1 for s in scores)
                    depths_seen.add(depth)
                    used += depth
                    right += all(prediction[row, t] == labels[row, t] for t in positions)
                    total += 1
        for rule in ("router_top_k", "router_causal"):
            assert logged[f"test/adaptive/{rule}/mean_loops_{set_name}"].item() == pytest.approx(used / total)
            assert logged[f"test/adaptive/{rule}/exact_match_{set_name}"].item() == pytest.approx(right / total)
    assert len(depths_seen) > 1  # the samples' depths differ: the check above means something
