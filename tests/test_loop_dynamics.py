"""``LoopDynamics`` against separate forwards, and the one shared evaluation pass of every loop reader.

References: a forward per loop count (the logit lens' top probability and argmax after loop n,
hence the flip rate), the loop states of one forward for the residual, and the same evaluation
without callbacks (the module's own metrics must not change when the pass is shared).
"""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import looped
from looped.callbacks import AdaptiveExit, LoopDynamics, PerLoopAccuracy
from looped.contract import IGNORE
from looped.datamodules import PHop

LOOPS, MAX_LOOPS = 2, 5


def setup(tmp_path, callbacks, seed: int = 0):
    torch.manual_seed(seed)
    data = PHop(length=16, hops=2, batch_size=16, val_size=48, test_size=48, eval_batch_size=16)
    config = looped.LoopedConfig(
        vocab_size=data.vocab_size, max_seq_len=data.seq_len, d_model=32, n_heads=4, d_ff=64, loops=LOOPS
    )
    module = looped.LoopedLM(config, warmup_steps=2, decay_steps=5)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    return module, data, trainer


def reference_dynamics(model, data) -> dict[str, list[float]]:
    """Per loop, over the validation set's labelled positions: the residual from one forward's loop
    states, the top probability and argmax from a separate forward with ``loops=n``."""
    data.setup("validate")
    residual, top, flips, positions = [0.0] * MAX_LOOPS, [0.0] * MAX_LOOPS, [0.0] * MAX_LOOPS, 0
    with torch.no_grad():
        for batch in data.val_dataloader():
            mask = batch["labels"] != IGNORE
            _, states = model(batch["input_ids"], loops=MAX_LOOPS, return_loop_states=True)
            previous = None
            for n in range(1, MAX_LOOPS + 1):
                probs = model(batch["input_ids"], loops=n)[mask].softmax(-1)
                top[n - 1] += probs.max(-1).values.sum().item()
                if n > 1:
                    step = (states[n - 1] - states[n - 2])[mask].norm(dim=-1) / states[n - 2][mask].norm(dim=-1)
                    residual[n - 1] += step.sum().item()
                    flips[n - 1] += (probs.argmax(-1) != previous).sum().item()
                previous = probs.argmax(-1)
            positions += int(mask.sum())
    return {
        "residual": [v / positions for v in residual],
        "top_prob": [v / positions for v in top],
        "flip_rate": [v / positions for v in flips],
    }


def test_dynamics_equal_separate_forwards_and_are_drawn(tmp_path):
    module, data, trainer = setup(tmp_path, [LoopDynamics(max_eval_loops=MAX_LOOPS)])
    trainer.validate(module, datamodule=data, verbose=False)
    want = reference_dynamics(module.model, data)
    for name, values in want.items():
        for n, value in enumerate(values, start=1):
            key = f"val/dynamics/{name}_loop{n}"
            if n == 1 and name != "top_prob":
                assert key not in trainer.callback_metrics  # loop 1 has no previous loop
            else:
                assert trainer.callback_metrics[key].item() == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert 0 < sum(want["flip_rate"]) and all(0 < v < 1 for v in want["top_prob"])  # nothing degenerate
    events = EventAccumulator(str(trainer.logger.log_dir), size_guidance={"images": 0, "tensors": 0}).Reload()
    assert "val/dynamics" in events.Tags()["images"]
    lens = events.Tensors("val/logit_lens/text_summary")[-1].tensor_proto.string_val[0].decode()
    rows = [line.split("|")[1].strip() for line in lens.splitlines()[2:]]
    assert rows == [str(n) for n in range(1, MAX_LOOPS + 1)]  # a row per loop under the header


class CountForwards:
    def __init__(self, model):
        self.calls = 0
        model.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_every_loop_reader_shares_one_forward_per_batch(tmp_path, stage):
    readers = [PerLoopAccuracy(max_eval_loops=MAX_LOOPS, perplexity=True), LoopDynamics(max_eval_loops=4)]
    readers.append(AdaptiveExit(max_eval_loops=MAX_LOOPS))
    module, data, trainer = setup(tmp_path, readers)
    forwards = CountForwards(module.model)
    run = trainer.validate if stage == "validate" else trainer.test
    with_readers = dict(run(module, datamodule=data, verbose=False)[0])
    batches = 3  # 48 samples in batches of 16
    assert forwards.calls == batches, "the module and its loop readers ran the model more than once per batch"
    prefix = "val" if stage == "validate" else "test"
    assert (
        f"{prefix}/exact_match_loop{MAX_LOOPS}" in with_readers and f"{prefix}/dynamics/top_prob_loop4" in with_readers
    )
    # The module's own metrics, read at the trained L from the deeper pass, are those of a plain forward.
    plain_module, plain_data, plain_trainer = setup(tmp_path / "plain", [])
    plain_module.load_state_dict(module.state_dict())
    alone = dict(
        (plain_trainer.validate if stage == "validate" else plain_trainer.test)(
            plain_module, datamodule=plain_data, verbose=False
        )[0]
    )
    for key in (f"{prefix}/loss", f"{prefix}/exact_match", f"{prefix}/token_accuracy"):
        assert with_readers[key] == pytest.approx(alone[key], rel=1e-6), key
    # Per-loop accuracy at L from the shared pass agrees with the module's metric at L.
    assert with_readers[f"{prefix}/exact_match_loop{LOOPS}"] == pytest.approx(with_readers[f"{prefix}/exact_match"])
    assert not math.isnan(with_readers[f"{prefix}/perplexity_loop1"])
