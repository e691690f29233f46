"""Retrofitted recurrence (McLeish et al. 2025): the curriculum's values against their formulas, the backprop
depth ramp, the concatenation adapter and the noise-initialised state."""

import math
from dataclasses import replace

import pytest
import torch

from looped.errors import InputError
from looped.model import LoopedConfig, LoopedTransformer
from looped.training.loop_schedule import LoopSchedule


@pytest.mark.parametrize("kind", ["linear", "one_minus_sqrt"])
def test_mean_recurrence_follows_its_formula(kind):
    schedule = LoopSchedule(curriculum=kind, curriculum_steps=100, curriculum_start=1.0, mean_loops=9)
    for step in (0, 10, 25, 50, 75, 99, 100, 150):
        f = min(step / 100, 1.0)
        way = f if kind == "linear" else 1 - math.sqrt(1 - f)
        assert schedule.mean_at(4, step) == pytest.approx(1 + 8 * way)
    assert schedule.mean_at(4, 0) == 1 and schedule.mean_at(4, 100) == 9


def test_fixed_loops_and_backprop_depth_ramp_with_the_curriculum():
    schedule = LoopSchedule(curriculum="linear", curriculum_steps=10, grad_loops=5)
    assert [schedule.sample(4, s) for s in range(0, 12, 2)] == [round(1 + 3 * s / 10) for s in range(0, 12, 2)]
    assert [schedule.grad_loops_at(s) for s in (0, 1, 5, 10, 20)] == [1, math.ceil(1 + 4 * 0.1), 3, 5, 5]
    assert LoopSchedule(grad_loops=3).grad_loops_at(0) == 3  # no curriculum: the fixed depth
    # the lognormal-Poisson draws centre on the ramped mean
    drawn = LoopSchedule(distribution="lognormal_poisson", curriculum="linear", curriculum_steps=1000, mean_loops=8)
    early = sum(drawn.sample(8, s) for s in range(50)) / 50
    late = sum(drawn.sample(8, 1000 + s) for s in range(50)) / 50
    assert early < 3 < 6 < late


def test_curriculum_needs_steps():
    with pytest.raises(InputError, match="curriculum_steps must be >= 1"):
        LoopSchedule(curriculum="linear")


def test_concat_adapter_starts_as_the_model_without_a_state():
    """At initialisation the adapter passes the loop input, so with a noise state one loop computes what the
    same layers compute without recurrence; the noise matters once the adapter reads the state."""
    torch.manual_seed(0)
    plain = LoopedConfig(vocab_size=23, max_seq_len=16, d_model=16, n_heads=2, d_ff=32, prelude_layers=1, coda_layers=1)
    reference = LoopedTransformer(plain).eval()
    model = LoopedTransformer(replace(plain, input_injection="concat", state_noise=1.0)).eval()
    missing, _ = model.load_state_dict(reference.state_dict(), strict=False)
    assert missing == ["adapter.weight"]
    ids = torch.randint(0, 23, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids))
        model.adapter.weight[:, 16:].normal_(std=0.5)  # now the state (noise at loop 1) flows in
        assert not torch.allclose(model(ids), model(ids))


def test_noise_state_needs_an_input_injection():
    with pytest.raises(InputError, match="state_noise: a loop state that starts as noise never sees the input"):
        LoopedConfig(state_noise=1.0)
