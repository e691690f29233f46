"""Random loop counts and truncated backpropagation through the loop."""

import statistics

import pytest
import torch

from conftest import tiny_model, tiny_module
from looped import LoopedTransformer
from looped.training.loop_schedule import LoopSchedule


def test_fixed_is_the_trained_count():
    assert {LoopSchedule().sample(4, step) for step in range(50)} == {4}


def test_uniform_covers_its_range_and_repeats_per_step():
    schedule = LoopSchedule(distribution="uniform", min_loops=2)
    draws = [schedule.sample(3, step) for step in range(400)]
    assert set(draws) == {2, 3, 4, 5, 6}  # default upper bound 2L
    # Same step, same count: every rank agrees, and a resumed run redraws the same counts.
    assert draws == [LoopSchedule(distribution="uniform", min_loops=2).sample(3, step) for step in range(400)]


def test_lognormal_poisson_mean_and_bounds():
    schedule = LoopSchedule(distribution="lognormal_poisson", mean_loops=6, sigma=0.5, max_loops=40)
    draws = [schedule.sample(4, step) for step in range(4000)]
    assert 1 <= min(draws) and max(draws) <= 40
    # Poisson(e^τ) + 1 with E[e^τ] = mean_loops.
    assert statistics.mean(draws) == pytest.approx(7.0, rel=0.05)


def test_bad_schedule_is_named():
    with pytest.raises(ValueError, match="loop_schedule.max_loops"):
        LoopSchedule(distribution="uniform", min_loops=4, max_loops=2)


def model(**kw) -> LoopedTransformer:
    return tiny_model(vocab_size=9, max_seq_len=10, loops=4, **kw)


@pytest.mark.parametrize("injection", ["none", "add"])
def test_truncated_backprop_equals_detached_reference(injection):
    """grad_loops=2: gradients equal those of running loops 1-2 detached, by hand, then loops 3-4."""
    net = model(input_injection=injection)
    x = torch.randint(0, 9, (3, 10), generator=torch.Generator().manual_seed(1))
    net(x, grad_loops=2).square().mean().backward()
    truncated = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    net.zero_grad(set_to_none=True)
    h = net.embed(x)
    injected = h
    with torch.no_grad():
        for n in range(2):
            h = net.loop_step(h + injected if injection == "add" and n > 0 else h)
    for _ in range(2, 4):  # loops 3 and 4, with gradients
        h = net.loop_step(h + injected if injection == "add" else h)
    net.readout(h).square().mean().backward()
    reference = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    assert truncated.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(truncated[name], reference[name], atol=1e-6, rtol=1e-5)
    # Without injection nothing before the truncated loops learns; with it the embedding does.
    assert ("embed.weight" in truncated) == (injection == "add")


def test_training_step_with_schedule_and_per_loop_loss():
    module = tiny_module(
        vocab_size=9,
        max_seq_len=10,
        loops=3,
        input_injection="add",
        loop_schedule=LoopSchedule(
            distribution="uniform", min_loops=2, max_loops=5, grad_loops=2, per_loop_loss_weight=0.5
        ),
    )
    batch = {"input_ids": torch.randint(0, 9, (4, 10)), "labels": torch.randint(0, 9, (4, 10))}
    loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and 2 <= module._loops_this_step <= 5
    assert all(p.grad is not None for p in module.model.block.parameters())
