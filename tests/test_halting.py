"""Learned exits: each objective against a slow loop-by-loop reference, gradients to the gate, the gate and
entropy exit rules against a per-sample reference, and a real training run with each objective."""

import math

import lightning as L
import pytest
import torch

from conftest import tiny_model, tiny_module
from looped.callbacks import AdaptiveExit
from looped.datamodules import PHop
from looped.errors import InputError
from looped.evaluation.exits import adaptive_exits, exit_loops_entropy, exit_loops_gate, exit_loops_gate_sample
from looped.evaluation.loop_readout import per_loop_predictions
from looped.training.halting import ExitObjective, exit_distribution

# -- a slow reference, in Python floats, one token at a time -------------------------------------


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def reference_distribution(halts: list[float]) -> list[float]:
    p, survive = [], 1.0
    for n, h in enumerate(halts):
        lam = sigmoid(h) if n < len(halts) - 1 else 1.0  # the last loop run takes what is left
        p.append(survive * lam)
        survive *= 1 - lam
    return p


def reference_token_loss(objective: ExitObjective, losses: list[float], halts: list[float]) -> float:
    n_loops = len(losses)
    if objective.objective == "act":
        lams, total, halt_at = [sigmoid(h) for h in halts], 0.0, n_loops - 1
        for n in range(n_loops):
            total += lams[n]
            if total >= 1 - objective.epsilon:
                halt_at = n
                break
        remainder = 1 - sum(lams[:halt_at])
        weights = lams[:halt_at] + [remainder]
        expected = sum(w * loss for w, loss in zip(weights, losses))
        return expected + objective.tau * (halt_at + 1 + remainder)
    p = reference_distribution(halts)
    expected = sum(pn * loss for pn, loss in zip(p, losses))
    if objective.objective == "ouro":
        entropy = -sum(pn * math.log(pn) for pn in p if pn > 0)
        return expected - objective.beta * entropy
    q = [objective.prior * (1 - objective.prior) ** n for n in range(n_loops)]
    q = [x / sum(q) for x in q]
    kl = sum(pn * (math.log(pn) - math.log(qn)) for pn, qn in zip(p, q) if pn > 0)
    return expected + objective.beta * kl


OBJECTIVES = [
    ExitObjective("ouro", beta=0.1),
    ExitObjective("pondernet", beta=0.3, prior=0.3),
    ExitObjective("act", tau=0.05, epsilon=0.1),
]


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: o.objective)
@pytest.mark.parametrize("loops", [1, 3, 6])
def test_objective_equals_the_loop_by_loop_reference(objective, loops):
    g = torch.Generator().manual_seed(loops)
    losses = torch.rand(loops, 40, generator=g, dtype=torch.float64) * 3
    halts = torch.randn(loops, 40, generator=g, dtype=torch.float64) * 2
    expected = sum(reference_token_loss(objective, losses[:, m].tolist(), halts[:, m].tolist()) for m in range(40)) / 40
    assert math.isclose(objective.loss(losses, halts).item(), expected, rel_tol=1e-5, abs_tol=1e-6)
    p = exit_distribution(halts)
    torch.testing.assert_close(p.sum(0), torch.ones(40, dtype=torch.float64))
    assert p[:, 7].tolist() == pytest.approx(reference_distribution(halts[:, 7].tolist()))


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: o.objective)
def test_gradients_reach_the_gate_and_the_block(objective):
    module = tiny_module(exit_gate=True, loops=3, exit=objective)
    input_ids = torch.randint(0, 11, (4, 16), generator=torch.Generator().manual_seed(0))
    labels = input_ids.roll(1, dims=1)
    loss = module.exit_loss(input_ids, labels, loops=3)
    loss.backward()
    assert module.model.exit_gate.weight.grad.abs().sum() > 0
    assert module.model.block[0].ffn.w1.weight.grad.abs().sum() > 0


def test_exit_without_a_gate_is_refused_by_its_recipe_key():
    with pytest.raises(InputError, match=r"model.init_args.config.exit_gate: true"):
        tiny_module(exit={"objective": "ouro"})
    with pytest.raises(InputError, match=r"model.init_args.exit.objective: 'halt'"):
        ExitObjective("halt")
    with pytest.raises(InputError, match=r"loop_schedule.per_loop_loss_weight: the exit objective already"):
        tiny_module(exit_gate=True, exit={"objective": "ouro"}, loop_schedule={"per_loop_loss_weight": 0.5})


# -- exit rules at inference ------------------------------------------------------------------
def test_entropy_and_gate_rules_match_a_per_sample_reference():
    model = tiny_model(
        vocab_size=5, max_seq_len=12, d_model=32, n_heads=4, d_ff=64, loops=3, init_std=0.3, exit_gate=True
    )
    torch.nn.init.normal_(model.exit_gate.weight, std=1.0)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 5, (24, 12), generator=g)
    labels = torch.full_like(input_ids, -100)
    labels[:, -1] = torch.randint(0, 5, (24,), generator=g)
    labels[::3, 4] = 1
    max_loops = 6
    with torch.no_grad():
        pred = per_loop_predictions(model, input_ids, labels, max_loops)
        _, states = model(input_ids, loops=max_loops, return_loop_states=True)
        entropies, cdfs = [], []
        for b in range(24):
            positions = [i for i, y in enumerate(labels[b].tolist()) if y != -100]
            ent = [
                [-(p * p.log()).sum().item() for p in model(input_ids[b : b + 1], loops=n)[0, positions].softmax(-1)]
                for n in range(1, max_loops + 1)
            ]
            halts = [model.halt_logits(states[n][b, positions]).tolist() for n in range(max_loops)]
            per_position = [
                reference_distribution([halts[n][j] for n in range(max_loops)]) for j in range(len(positions))
            ]
            cdf = [[sum(p[: n + 1]) for p in per_position] for n in range(max_loops)]
            entropies.append([max(e) for e in ent])
            cdfs.append([min(c) for c in cdf])
    flat = sorted(e for row in entropies for e in row)
    taus = [(flat[i] + flat[i + 1]) / 2 for i in (len(flat) // 4, len(flat) // 2)]
    for tau in taus:
        expected = [next((n + 1 for n, e in enumerate(row) if e < tau), max_loops) for row in entropies]
        assert exit_loops_entropy(pred, tau).tolist() == expected
    for q in (0.3, 0.5, 0.9):
        expected = [next((n + 1 for n, c in enumerate(row) if c >= q - 1e-6), max_loops) for row in cdfs]
        assert exit_loops_gate(pred, q).tolist() == expected
    # PonderNet's sampling: the first loop whose cumulative exit probability reaches the sample's own u.
    draws = torch.rand(24, generator=torch.Generator().manual_seed(3), dtype=torch.float64).tolist()
    expected = [next((n + 1 for n, c in enumerate(row) if c >= u), max_loops) for row, u in zip(cdfs, draws)]
    assert exit_loops_gate_sample(pred, torch.Generator().manual_seed(3)).tolist() == expected
    assert len(set(expected)) > 1
    exits = adaptive_exits(pred, (1,), (0.1,), taus, (0.5,), gate_sample=torch.Generator().manual_seed(3))
    rules = {"stable_1", "kl_0.1", f"entropy_{taus[0]:g}", f"entropy_{taus[1]:g}", "gate_0.5", "gate_sample"}
    assert set(exits) == rules
    assert len(set(exits["gate_0.5"].tolist())) > 1  # the gate sends samples to different depths


@pytest.mark.parametrize("objective", ["ouro", "pondernet", "act"])
def test_training_with_each_objective_then_the_gate_rule_at_test(objective, tmp_path):
    data = PHop(length=12, hops=2, batch_size=8, val_size=16, test_size=16)
    module = tiny_module(
        vocab_size=data.vocab_size,
        max_seq_len=data.seq_len,
        d_model=32,
        n_heads=4,
        d_ff=64,
        loops=2,
        exit_gate=True,
        exit={"objective": objective},
    )
    trainer = L.Trainer(
        max_steps=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[AdaptiveExit(gate_quantiles=(0.5,))],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    assert 1 <= float(trainer.callback_metrics["train/exit_expected_loops"]) <= 2
    trainer.test(module, datamodule=data, verbose=False)
    for rule in ("gate_0.5", "gate_sample"):
        loops = float(trainer.callback_metrics[f"test/adaptive/{rule}/mean_loops"])
        assert 1 <= loops <= 4  # AdaptiveExit's default: up to 2L loops


# -- Ouro's second stage: the gate alone, on the frozen model's loss improvement --------------------
def stage2_reference(k: float, gamma: float, losses: list[float], halts: list[float]) -> float:
    """Per token: mean over loops n < N of −[w log(1 − λ) + (1 − w) log λ], w = σ(k (max(0, L_n − L_{n+1}) − γ))."""
    terms = []
    for n in range(len(losses) - 1):
        w = sigmoid(k * (max(0.0, losses[n] - losses[n + 1]) - gamma))
        lam = sigmoid(halts[n])
        terms.append(-(w * math.log(1 - lam) + (1 - w) * math.log(lam)))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("loops", [2, 5])
def test_ouro_stage2_equals_the_loop_by_loop_reference(loops):
    objective = ExitObjective("ouro_stage2", k=20.0, gamma=0.05)
    g = torch.Generator().manual_seed(loops)
    losses = torch.rand(loops, 30, generator=g, dtype=torch.float64) * 0.3  # improvements around γ: both targets
    halts = torch.randn(loops, 30, generator=g, dtype=torch.float64)
    per_token = [stage2_reference(20.0, 0.05, losses[:, m].tolist(), halts[:, m].tolist()) for m in range(30)]
    assert math.isclose(objective.loss(losses, halts).item(), sum(per_token) / 30, rel_tol=1e-6)
    assert objective.loss(losses[:1], halts[:1]).item() == 0.0  # one loop: nothing to judge


def test_ouro_stage2_trains_the_gate_alone_from_a_first_stage_checkpoint(tmp_path):
    """init_weights loads a checkpoint trained without a gate; a real fit step then changes the gate and
    leaves every other weight as loaded."""
    data = PHop(length=12, hops=2, batch_size=8, val_size=16, test_size=16)
    shape = dict(vocab_size=data.vocab_size, max_seq_len=data.seq_len, d_model=32, n_heads=4, d_ff=64, loops=3)
    first = tiny_module(seed=1, **shape)
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, limit_val_batches=0,
                        default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(first, datamodule=data)
    ckpt = tmp_path / "first.ckpt"
    trainer.save_checkpoint(ckpt)
    second = tiny_module(seed=2, exit_gate=True, exit={"objective": "ouro_stage2"}, **shape)
    second.init_weights = str(ckpt)
    gate_before = second.model.exit_gate.weight.detach().clone()
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        limit_val_batches=0, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(second, datamodule=data)
    loaded = first.model.state_dict()
    for name, tensor in second.model.state_dict().items():
        if name.startswith("exit_gate."):
            continue
        torch.testing.assert_close(tensor, loaded[name], rtol=0, atol=0, msg=name)
    assert not torch.equal(second.model.exit_gate.weight, gate_before)
    assert [n for n, p in second.model.named_parameters() if p.requires_grad] == ["exit_gate.weight", "exit_gate.bias"]


def test_init_weights_from_another_model_is_refused_by_its_recipe_key(tmp_path):
    from looped.training.checkpoint import load_weights

    small = tiny_module(d_model=48, n_heads=2, d_ff=96)
    torch.save({"state_dict": small.state_dict()}, tmp_path / "small.ckpt")
    with pytest.raises(InputError, match=r"init_weights .*small.ckpt holds another model \(of another shape: model\."):
        load_weights(tiny_module(), tmp_path / "small.ckpt", "model.init_args.init_weights")
    with pytest.raises(InputError, match=r"model.init_args.init_weights .*missing.ckpt does not exist"):
        load_weights(tiny_module(), tmp_path / "missing.ckpt", "model.init_args.init_weights")
