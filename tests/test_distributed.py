"""FSDP2 (``looped.training.parallel``) through Lightning's ModelParallelStrategy on CPU processes over gloo.

The multi-process checks run ``tests/fsdp_run.py`` (Lightning launches its second rank) and
compare against single-process references: the same weights and global batch on one plain
model, and an uninterrupted run for the resumed one.
"""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_config
from looped import LoopedConfig, LoopedLM
from looped.model import FeedForward, LoopedTransformer
from looped.training.optim import Adafactor
from looped.training.parallel import materialize, parallelize

SCRIPT = ROOT / "tests" / "fsdp_run.py"


def tiny(**fields) -> LoopedConfig:
    return tiny_config(d_model=32, n_heads=4, d_ff=48, block_layers=2, loops=3, **fields)


def test_activation_checkpointing_recomputes_each_layer_application(monkeypatch):
    """Each of the L applications of a block layer is its own checkpoint: L calls forward, L more in backward."""
    torch.manual_seed(0)
    plain = LoopedTransformer(tiny(prelude_layers=1))
    checkpointed = LoopedTransformer(tiny(prelude_layers=1))
    checkpointed.load_state_dict(plain.state_dict())
    parallelize(checkpointed, activation_checkpointing=True)
    ids = torch.randint(0, 11, (3, 16))
    plain(ids).square().mean().backward()
    # Count FFN runs per layer (module hooks are silenced during recomputation, so patch forward).
    calls, forward = {}, FeedForward.forward
    monkeypatch.setattr(
        FeedForward, "forward", lambda self, x: calls.update({self: calls.get(self, 0) + 1}) or forward(self, x)
    )
    counts = lambda: (calls.get(checkpointed.prelude[0].ffn, 0), calls.get(checkpointed.block[1].ffn, 0))  # noqa: E731
    out = checkpointed(ids)
    assert counts() == (1, 3)
    out.square().mean().backward()
    assert counts() == (2, 6)  # every application recomputed once, separately
    # Parameter names are unchanged (checkpoints and the regulariser address layers by name).
    assert [n for n, _ in checkpointed.named_parameters()] == [n for n, _ in plain.named_parameters()]
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_meta_model_materialises_like_the_constructor():
    """A model built on the meta device gets the constructor's initialisation after ``materialize``."""
    config = tiny(prelude_layers=1, coda_layers=1, bias=True)
    torch.manual_seed(0)
    reference = LoopedTransformer(config)
    with torch.device("meta"):
        model = LoopedTransformer(config)
    materialize(model, torch.device("cpu"))
    assert not any(p.is_meta for p in model.parameters())
    torch.testing.assert_close(model.rope.cos, reference.rope.cos)
    torch.testing.assert_close(model.rope.sin, reference.rope.sin)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if p.dim() < 2:  # norms are ones, biases zeros: exactly the constructor's values
            torch.testing.assert_close(p, q, msg=name)
        else:  # normal init: the constructor's std (depth-scaled on residual outputs), a fresh draw
            assert abs(p.std().item() / q.std().item() - 1) < 0.15, name
            assert not torch.equal(p, q), name
    assert torch.isfinite(model(torch.randint(0, 11, (2, 16)))).all()


def test_configure_model_without_a_mesh_changes_nothing():
    module = LoopedLM(tiny())
    before = {n: p.clone() for n, p in module.model.named_parameters()}
    module.configure_model()
    assert type(module.model) is LoopedTransformer
    assert all(torch.equal(p, before[n]) for n, p in module.model.named_parameters())


def test_adafactor_on_plain_parameters_is_stock_adafactor():
    """Unsharded, ``looped.training.optim.Adafactor`` is torch's: same parameters and state, step hooks run once
    per step."""
    torch.manual_seed(0)
    model = LoopedTransformer(tiny(bias=True))
    copy = LoopedTransformer(tiny(bias=True))
    copy.load_state_dict(model.state_dict())
    stock = torch.optim.Adafactor(model.parameters(), lr=0.01, weight_decay=0.1)  # also hooks the stock class's step
    ours = Adafactor(copy.parameters(), lr=0.01, weight_decay=0.1)
    calls = []
    ours.register_step_pre_hook(lambda *_: calls.append(1))
    for _ in range(3):
        ids = torch.randint(0, 11, (2, 16))
        for m, optimizer in ((model, stock), (copy, ours)):
            optimizer.zero_grad()
            m(ids).square().mean().backward()
            optimizer.step()
    assert len(calls) == 3
    for (name, a), b in zip(model.named_parameters(), copy.parameters()):
        assert torch.equal(a, b), name
        assert all(torch.equal(v, ours.state[b][k]) for k, v in stock.state[a].items()), name


@pytest.mark.slow
def test_sharded_adafactor_equals_stock_adafactor_on_the_whole_tensors(tmp_path):
    """2 ranks over gloo, FSDP (1-D mesh) and HSDP (2-D mesh): 5 steps of ``looped.training.optim.Adafactor`` on
    sharded 3-D, 2-D (one splitting unevenly) and 1-D parameters, plus an unsharded one, equal stock
    ``torch.optim.Adafactor`` on unsharded copies given the same gradients, parameters and state alike."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "adafactor_run.py"), str(tmp_path), "--world-size", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    runs = torch.load(tmp_path / "adafactor.pt", weights_only=False)
    for mesh, steps in runs.items():
        assert len(steps) == 5
        for step, record in enumerate(steps):
            for name, (sharded, stock) in record["params"].items():
                torch.testing.assert_close(sharded, stock, rtol=0, atol=1e-6, msg=f"{mesh} step {step} {name}")
            for name, state in record["state"].items():
                assert set(state) == (
                    {"step", "variance"} if record["params"][name][1].dim() == 1 else {"step", "row_var", "col_var"}
                )
                for key, (sharded, stock) in state.items():
                    torch.testing.assert_close(
                        sharded, stock, rtol=0, atol=1e-6, msg=f"{mesh} step {step} {name}.{key}"
                    )
        # The updates are not vanishing: the parameters moved at every step.
        for before, after in zip(steps, steps[1:]):
            assert all(not torch.equal(before["params"][n][1], p[1]) for n, p in after["params"].items())


def launch(out, tag: str, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), tag, *args],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out / f"{tag}.pt", weights_only=False)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_gradients_match_one_process(run: dict) -> None:
    """(c) The shared block's FSDP2 gradient, summed over its 3 uses and averaged over ranks, equals the
    gradient of one plain model on the global batch (2 ranks × 4 samples, one label each)."""
    import fsdp_run

    routed = any(name.startswith("router.") for name in run["start"])
    module = LoopedLM(fsdp_run.config(run["start"]["embed.weight"].shape[0], 13, **(fsdp_run.ROUTED if routed else {})))
    module.model.load_state_dict(run["start"])
    batch = {k: torch.cat([b[k] for b in run["batch"]]) for k in ("input_ids", "labels")}
    assert ((batch["labels"] != -100).sum(1) == 1).all()  # equal label counts: mean of means = global mean
    # A router's auxiliary and z-losses are means over each row's tokens too (top-k is per row): the same holds.
    loss = module.compute_loss(module.model(batch["input_ids"]), batch["labels"])
    loss = loss + (module.model.router.loss() if routed else 0.0)
    assert loss.item() == pytest.approx(sum(run["losses"][0]) / 2, rel=1e-5)
    loss.backward()
    for name, p in module.model.named_parameters():
        torch.testing.assert_close(run["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert run["grads"]["block.1.ffn.w2.weight"].abs().sum() > 0


@pytest.mark.slow
def test_fsdp2_training_gradients_and_sharded_resume(tmp_path):
    """2 ranks: gradients equal one process's; a sharded checkpoint resumes exactly, on 2 ranks or on 1.

    The save/resume runs train with ``looped.training.optim.Adafactor`` (the Pile recipes' optimiser, whose
    state for sharded parameters is whole, replicated tensors); the HSDP run with the default AdamW."""
    ckpt = tmp_path / "ckpt"
    saved = launch(
        tmp_path, "save", "--devices", "2", "--max-steps", "3", "--save", str(ckpt), "--penalty", "--adafactor"
    )
    assert len(list(ckpt.glob("*.distcp"))) == 2  # a sharded (DCP) checkpoint: one file per rank

    assert_gradients_match_one_process(saved)
    # BlockRegularizer.penalty on sharded weights: the unsharded value and gradient.
    check = saved["penalty"]
    assert check["value"] == pytest.approx(check["expected"], rel=1e-6) and check["graded"] == 20
    assert check["grad_error"] < 1e-6

    # (a) + (b): resume for 3 more steps on 2 ranks; compare with an uninterrupted 6-step run.
    resumed = launch(tmp_path, "resumed", "--devices", "2", "--max-steps", "6", "--resume", str(ckpt), "--adafactor")
    assert_same_weights(resumed["start"], saved["end"])
    straight = launch(tmp_path, "straight", "--devices", "2", "--max-steps", "6", "--adafactor")
    assert_same_weights(straight["start"], saved["start"])
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(straight["losses"][3:]), rtol=1e-5, atol=0)
    for name, value in straight["end"].items():
        torch.testing.assert_close(resumed["end"][name], value, rtol=1e-5, atol=1e-6, msg=name)

    # 2 → 1 rank: torch.distributed.checkpoint reshards on load.
    single = launch(tmp_path, "single", "--devices", "1", "--max-steps", "4", "--resume", str(ckpt), "--adafactor")
    assert_same_weights(single["start"], saved["end"])
    assert len(single["losses"]) == 1 and all(map(torch.isfinite, torch.tensor(single["losses"])))

    # ModelParallelStrategy's defaults (auto: 1 node × 2 devices) give a 2-D mesh: HSDP, same gradients.
    hsdp = launch(tmp_path, "hsdp", "--devices", "2", "--max-steps", "1", "--hsdp")
    assert hsdp["mesh"] == [1, 2]
    assert_gradients_match_one_process(hsdp)


@pytest.mark.slow
def test_fsdp2_trains_a_routed_model_with_compiled_layers(tmp_path):
    """A Mixture-of-Recursions expert-choice router under FSDP2 on 2 ranks, every layer ``torch.compile``d (the
    routed loops run on 13, 7 and 4 gathered tokens: three shapes): the gradients, router's included, are one
    eager process's on the global batch."""
    run = launch(tmp_path, "routed", "--devices", "2", "--max-steps", "1", "--router", "--compile")
    assert run["grads"]["router.score.1.weight"].abs().sum() > 0
    assert_gradients_match_one_process(run)
