"""The block regulariser (Saunshi et al. 2025, Eq. 3-4) and its Figure-5 callback, against hand-computed cosines."""

import subprocess
import sys
import textwrap

import lightning as L
import pytest
import torch

from conftest import tiny_module
from looped import LoopedConfig, LoopedLM
from looped.callbacks import BlockCosineSimilarity
from looped.datamodules import PHop
from looped.tools.plots import cosine_heatmap
from looped.training.regularizer import PARAMETER_GROUPS, BlockRegularizer, block_cosines

PAPER_GROUPS = ["q", "k", "v", "o", "w1", "w2"]


def unshared(layers: int = 6, **fields) -> LoopedLM:
    return tiny_module(vocab_size=7, max_seq_len=12, block_layers=layers, **fields)


def paper_similarity(layers, k: int, group: str) -> float:
    """R_G(k) = 1/(L−k) Σ_{i=0}^{L/k−2} Σ_{j=0}^{k−1} cos(θ^(ik+j), θ^((i+1)k+j)); cosines by hand, float64."""
    flat = [layer.get_parameter(PARAMETER_GROUPS[group]).detach().double().flatten() for layer in layers]
    n = len(flat)
    total = 0.0
    for i in range(n // k - 1):
        for j in range(k):
            a, b = flat[i * k + j], flat[(i + 1) * k + j]
            total += (a @ b / (a.norm() * b.norm())).item()
    return total / (n - k)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_similarities_match_the_paper_formula(k):
    layers = unshared().model.block
    regularizer = BlockRegularizer(block_layers=k, groups=PAPER_GROUPS)
    regularizer.check(layers)
    with torch.no_grad():  # perturb the norms so their cosines are not trivially 1
        for layer in layers:
            layer.attn_norm.weight.add_(torch.randn_like(layer.attn_norm.weight))
    for group, r in regularizer.similarities(layers).items():
        assert r.item() == pytest.approx(paper_similarity(layers, k, group), abs=1e-6), group
    for group in PAPER_GROUPS + ["attn_norm"]:
        cosines = block_cosines(layers, k, group)
        assert cosines.shape == (len(layers) - k,)
        # Each entry l is the pair (l, l + k), so the mean is R_G.
        assert cosines.mean().item() == pytest.approx(paper_similarity(layers, k, group), abs=1e-6), group
    penalty = regularizer.penalty(layers).item()
    expected = sum(1 - paper_similarity(layers, k, g) for g in PAPER_GROUPS) / len(PAPER_GROUPS)
    assert penalty == pytest.approx(expected, abs=1e-6)


def test_one_step_on_the_penalty_makes_every_group_more_similar():
    layers = unshared().model.block
    regularizer = BlockRegularizer(block_layers=2, weight=1.0)
    before = {g: r.item() for g, r in regularizer.similarities(layers).items()}
    optimizer = torch.optim.SGD(layers.parameters(), lr=0.05)
    regularizer.penalty(layers).backward()
    optimizer.step()
    after = {g: r.item() for g, r in regularizer.similarities(layers).items()}
    for group in PAPER_GROUPS:
        assert after[group] > before[group], (group, before[group], after[group])


def test_regulariser_penalty_enters_the_training_loss():
    module = unshared(layers=4)
    module.regularizer = BlockRegularizer(block_layers=2, weight=10.0)
    batch = {"input_ids": torch.randint(0, 7, (4, 12)), "labels": torch.randint(0, 7, (4, 12))}
    module.log = lambda *args, **kwargs: None  # no trainer attached
    loss = module.training_step(batch, 0)
    plain = module.compute_loss(module(batch["input_ids"]), batch["labels"])
    penalty = module.regularizer.penalty(module.model.block)
    assert loss.item() == pytest.approx(plain.item() + 10.0 * penalty.item(), rel=1e-6)


@pytest.mark.parametrize("k, layers", [(4, 6), (6, 6), (1, 1)])
def test_check_refuses_a_block_size_that_does_not_tile(k, layers):
    with pytest.raises(ValueError, match=r"regularizer\.block_layers"):
        BlockRegularizer(block_layers=k).check(unshared(layers).model.block)


def test_looped_lm_checks_the_regulariser():
    with pytest.raises(ValueError, match=r"regularizer\.block_layers=2 does not fit a stack of 2 layers"):
        tiny_module(block_layers=2, loops=3, regularizer=BlockRegularizer(block_layers=2))
    with pytest.raises(ValueError, match=r"regularizer\.groups"):
        BlockRegularizer(groups=["q", "gate"])


def test_callback_compute_matches_block_cosines():
    module = unshared()
    callback = BlockCosineSimilarity(block_layers=2)
    values = callback.compute(module)
    assert list(values) == ["q", "k", "v", "o", "w1", "w2", "attn_norm", "ffn_norm"]
    for group, cosines in values.items():
        assert cosines == pytest.approx(block_cosines(module.model.block, 2, group).tolist(), abs=1e-6)
    assert values["attn_norm"] == pytest.approx([1.0] * 4)  # norms start at ones


def test_callback_refuses_bad_arguments():
    with pytest.raises(ValueError, match=r"BlockCosineSimilarity\.groups"):
        BlockCosineSimilarity(block_layers=2, groups=["q", "gate"])
    callback = BlockCosineSimilarity(block_layers=2, groups=["w3"])  # only SwiGLU has w3
    with pytest.raises(ValueError, match="no \\['w3'\\] parameters"):
        callback.setup(None, unshared(), "fit")
    with pytest.raises(ValueError, match="needs more layers"):
        BlockCosineSimilarity(block_layers=6).setup(None, unshared(), "fit")


def test_heatmap_has_one_annotated_cell_per_value():
    values = {"q": [0.99, -0.5, 0.1], "w2": [1.0, 0.0, -1.0]}
    figure = cosine_heatmap(values, block_layers=3)
    ax = figure.axes[0]
    image = ax.images[0]
    assert image.get_array().shape == (2, 3)
    assert image.get_clim() == (-1.0, 1.0)
    assert [t.get_text() for t in ax.texts] == ["0.99", "-0.50", "0.10", "1.00", "0.00", "-1.00"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["q", "w2"]
    import matplotlib.pyplot as plt

    plt.close(figure)


@pytest.mark.slow
def test_callback_gathers_sharded_parameters():
    """A DTensor parameter (FSDP2) is gathered with full_tensor(): same cosines as the plain model."""
    script = textwrap.dedent(
        """
        import torch, torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard, distribute_tensor
        from looped import LoopedConfig, LoopedLM
        from looped.callbacks import BlockCosineSimilarity
        from looped.training.regularizer import block_cosines
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            torch.manual_seed(0)
            config = LoopedConfig(vocab_size=7, max_seq_len=12, d_model=16, n_heads=2, d_ff=32, block_layers=4)
            module = LoopedLM(config)
            expected = {g: block_cosines(module.model.block, 2, g).tolist() for g in ("q", "w2", "ffn_norm")}
            mesh = init_device_mesh("cpu", (1,))
            for layer in module.model.block:
                for name, p in list(layer.named_parameters()):
                    owner, leaf = layer.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
                    owner.register_parameter(leaf, torch.nn.Parameter(distribute_tensor(p.data, mesh, [Shard(0)])))
            assert isinstance(module.model.block[3].ffn.w2.weight, DTensor)
            values = BlockCosineSimilarity(block_layers=2, groups=list(expected)).compute(module)
            for g in expected:
                assert all(abs(a - b) < 1e-6 for a, b in zip(values[g], expected[g])), g
            print("gathered ok")
        finally:
            dist.destroy_process_group()
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "gathered ok" in result.stdout, result.stderr[-3000:]


def train_unshared(root, weight: float, steps: int):
    """4 unshared layers on 2-hop induction with the block regulariser at k = 2; returns (module, callback)."""
    L.seed_everything(0)
    data = PHop(length=16, hops=2, batch_size=32, val_size=64, test_size=64)
    config = LoopedConfig(
        vocab_size=data.vocab_size, max_seq_len=data.seq_len, d_model=32, n_heads=4, d_ff=64, block_layers=4, loops=1
    )
    module = LoopedLM(
        config,
        regularizer=BlockRegularizer(block_layers=2, weight=weight),
        warmup_steps=5,
        decay_steps=steps,
    )
    callback = BlockCosineSimilarity(block_layers=2, every_n_steps=steps // 4)
    trainer = L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        limit_val_batches=0,
        callbacks=[callback],
        logger=L.pytorch.loggers.TensorBoardLogger(root, name="tb", version=0),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    return module, callback


STEPS = 80  # with the default AdamW (lr 1e-3) λ = 10 reaches ≥ 0.998 by then; λ = 0 stays within ±0.1


@pytest.mark.slow
def test_regulariser_makes_neighbouring_blocks_alike(tmp_path):
    """Figure 5: with λ = 10 every group's cosine ends ≥ 0.98; without the term the blocks stay unalike."""
    module, callback = train_unshared(tmp_path / "reg", weight=10.0, steps=STEPS)
    final = callback.compute(module)
    assert callback.last == final  # the callback logged the end-of-fit values
    for group, cosines in final.items():
        assert cosines == pytest.approx(block_cosines(module.model.block, 2, group).tolist(), abs=1e-6)
    for group, cosines in final.items():  # the norms too, though only q, k, v, o, w1, w2 are regularised
        assert min(cosines) >= 0.98, (group, cosines)

    plain, plain_callback = train_unshared(tmp_path / "plain", weight=0.0, steps=STEPS)
    for group in PAPER_GROUPS:
        assert max(plain_callback.last[group]) < 0.5, (group, plain_callback.last[group])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "reg" / "tb" / "version_0"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert "block_cosine/heatmap" in events.Tags()["images"]
    assert [e.step for e in events.Images("block_cosine/heatmap")] == [20, 40, 60, 80]
    means = events.Scalars("block_cosine/q/mean")
    assert means[-1].step == STEPS and means[-1].value == pytest.approx(sum(final["q"]) / 2, abs=1e-5)
    assert means[-1].value > means[0].value
    assert "block_cosine/w2/layer1" in events.Tags()["scalars"]
