"""LoopedLM: metrics against a hand count, optimiser groups, the schedule, FLOPs, per-loop accuracy."""

import math

import pytest
import torch
from torch import nn

from conftest import tiny_module
from looped import LoopedLM
from looped.callbacks.per_loop import exact_match_per_loop
from looped.training.module import warmup_cosine


def make_module(**model) -> LoopedLM:
    return tiny_module(**{**dict(vocab_size=7, max_seq_len=12, loops=3), **model})


def batch(n: int = 64, t: int = 12, vocab: int = 7):
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, vocab, (n, t), generator=g)
    labels = torch.full((n, t), -100)
    labels[:, -2:] = torch.randint(0, vocab, (n, 2), generator=g)  # two answer tokens per sample
    labels[::5, 4] = torch.randint(0, vocab, (len(labels[::5]),), generator=g)
    return {"input_ids": input_ids, "labels": labels}


def test_eval_metrics_match_a_hand_count():
    module = make_module().eval()
    data = batch()
    with torch.no_grad():
        logits = module(data["input_ids"])
    preds = logits.argmax(-1)
    module.val_metrics["exact_match"].update(preds, data["labels"])
    module.val_metrics["token_accuracy"].update(preds, data["labels"])
    # Hand count: a sample is right when every labelled position is right.
    right_samples, right_tokens, tokens = 0, 0, 0
    for p_row, l_row in zip(preds.tolist(), data["labels"].tolist()):
        marks = [p == label for p, label in zip(p_row, l_row) if label != -100]
        right_samples += all(marks)
        right_tokens += sum(marks)
        tokens += len(marks)
    assert module.val_metrics["exact_match"].compute().item() == pytest.approx(right_samples / len(preds))
    assert module.val_metrics["token_accuracy"].compute().item() == pytest.approx(right_tokens / tokens)


def test_per_loop_exact_match_matches_separate_forwards():
    module = make_module(prelude_layers=1, coda_layers=1).eval()
    data = batch()
    with torch.no_grad():
        per_loop = exact_match_per_loop(module.model, data["input_ids"], data["labels"], loops=5)
        for n in range(1, 6):
            preds = module.model(data["input_ids"], loops=n).argmax(-1)
            mask = data["labels"] != -100
            expected = ((preds == data["labels"]) | ~mask).all(dim=1)
            assert torch.equal(per_loop[n - 1], expected)


def test_weight_decay_only_on_matrices():
    module = make_module(tie_embeddings=False, bias=True)
    decay, no_decay = module.parameter_groups()
    names = {id(p): n for n, p in module.model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0.0
    assert "embed.weight" in kept and "head.weight" in decayed
    assert all(n.endswith(".weight") and "norm" not in n for n in decayed)
    assert any(n.endswith(".bias") for n in kept) and any("norm" in n for n in kept)
    assert len(decayed) + len(kept) == len(list(module.model.parameters()))


def test_tied_embedding_is_one_parameter_without_decay():
    module = make_module(tie_embeddings=True)
    decay, no_decay = module.parameter_groups()
    head = module.model.head.weight
    assert any(p is head for p in no_decay["params"]) and not any(p is head for p in decay["params"])


def test_warmup_cosine_schedule():
    values = [warmup_cosine(s, warmup_steps=10, decay_steps=110, min_lr_ratio=0.1) for s in range(130)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert values[110] == pytest.approx(0.1) and values[129] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[9:], values[10:]))


@pytest.mark.parametrize("optimizer", [torch.optim.AdamW, torch.optim.Adafactor])
def test_optimizer_factory_and_schedule(optimizer):
    module = make_module()
    module.optimizer_factory = lambda groups: optimizer(groups, lr=0.01)
    config = module.configure_optimizers()
    opt, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(opt, optimizer) and len(opt.param_groups) == 2
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 / 2)  # first warmup step
    loss = module.compute_loss(module(batch()["input_ids"]), batch()["labels"])
    loss.backward()
    opt.step()
    schedule.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)


@pytest.mark.parametrize(
    "shape", [{"loops": 4}, {"loops": 1, "block_layers": 3}, {"prelude_layers": 1, "coda_layers": 1}]
)
def test_flops_per_batch_equals_the_flop_counter_on_a_training_step(shape):
    """What ThroughputMonitor reads (forward + backward of the last step) against torch's own count of that step."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    module = make_module(**shape)
    counter = FlopCounterMode(display=False)
    # The math backend spells attention as matmuls the counter sees (the fused CPU kernel it does not).
    with counter, sdpa_kernel(SDPBackend.MATH):
        module.training_step(batch(), 0).backward()
    assert module.flops_per_batch == pytest.approx(counter.get_total_flops(), rel=0.01)


def test_loss_ignores_unlabelled_positions():
    module = make_module()
    data = batch()
    logits = torch.randn(64, 12, 7)
    loss = module.compute_loss(logits, data["labels"])
    mask = data["labels"] != -100
    expected = nn.functional.cross_entropy(logits[mask], data["labels"][mask])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
