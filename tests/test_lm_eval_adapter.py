"""The lm-eval adapter (model name ``looped``) against log-probabilities computed by hand from the model's logits.

Needs the optional ``[eval]`` extra (lm-eval, tokenizers); skipped cleanly without it.
Everything is offline: a word-level tokenizer, a tiny checkpoint and a local YAML task over a JSON file.
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")
pytest.importorskip("tokenizers")

from looped import LoopedConfig, LoopedLM  # noqa: E402
from looped.errors import InputError  # noqa: E402
from looped.tools.lm_eval_adapter import LoopedEvalLM  # noqa: E402

WORDS = ["<|endoftext|>", "<unk>", "the", "cat", "dog", "sat", "on", "mat", "a", "ran", "rug", "."]
ID = {w: i for i, w in enumerate(WORDS)}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer = Tokenizer(models.WordLevel(ID, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(root / "tokenizer.json"))
    torch.manual_seed(0)
    config = LoopedConfig(
        vocab_size=len(WORDS), max_seq_len=24, d_model=32, n_heads=4, d_ff=64, block_layers=1, loops=3
    )
    module = LoopedLM(config)
    with torch.no_grad():  # a peaked model, so greedy choices and scores differ clearly between options
        module.model.head.weight.mul_(40)
    checkpoint = root / "tiny.ckpt"
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": L.__version__,
        },
        checkpoint,
    )
    return SimpleNamespace(root=root, checkpoint=checkpoint, model=module.model.eval())


def by_hand(model, context: list[str], continuation: list[str], loops=None) -> tuple[float, bool]:
    ids = [ID[w] for w in context] or [ID["<|endoftext|>"]]
    cont = [ID[w] for w in continuation]
    with torch.no_grad():
        logits = model(torch.tensor([ids + cont]), loops=loops)[0]
    total, greedy = 0.0, True
    for i, token in enumerate(cont):  # the logits at position p predict token p + 1
        row = F.log_softmax(logits[len(ids) - 1 + i].double(), -1)
        total += row[token].item()
        greedy &= int(row.argmax()) == token
    return total, greedy


def requests(*args):
    return [SimpleNamespace(args=a) for a in args]


def test_loglikelihood_matches_the_logits(assets):
    lm = LoopedEvalLM(checkpoint=str(assets.checkpoint), tokenizer=str(assets.root), batch_size=3)
    pairs = [("the cat sat on the", " mat"), ("a dog", " ran on a rug ."), ("", "the cat"), ("the", " dog sat")]
    got = lm.loglikelihood(requests(*pairs))
    for (ctx, cont), (score, greedy) in zip(pairs, got):
        want, want_greedy = by_hand(assets.model, ctx.split(), cont.split())
        assert score == pytest.approx(want, abs=1e-4) and greedy == want_greedy, (ctx, cont)
    # loops=... evaluates at another loop count (inference-time scaling).
    deeper = LoopedEvalLM(checkpoint=str(assets.checkpoint), tokenizer=str(assets.root / "tokenizer.json"), loops=5)
    score, _ = deeper.loglikelihood(requests(pairs[0]))[0]
    assert score == pytest.approx(by_hand(assets.model, pairs[0][0].split(), ["mat"], loops=5)[0], abs=1e-4)


def test_rolling_loglikelihood_is_the_sum_over_every_token(assets):
    lm = LoopedEvalLM(checkpoint=str(assets.checkpoint), tokenizer=str(assets.root))
    text = "the cat sat on the mat . a dog ran"
    want, _ = by_hand(assets.model, [], text.split())  # each token given <|endoftext|> and all before it
    assert lm.loglikelihood_rolling(requests((text,)))[0] == pytest.approx(want, abs=1e-4)


def test_generate_until_is_greedy_and_stops(assets):
    lm = LoopedEvalLM(checkpoint=str(assets.checkpoint), tokenizer=str(assets.root))
    ids = [ID["the"], ID["cat"]]
    with torch.no_grad():  # greedy decoding by hand, 6 tokens or end-of-text
        for _ in range(6):
            token = int(assets.model(torch.tensor([ids]))[0, -1].argmax())
            if token == ID["<|endoftext|>"]:
                break
            ids.append(token)
    words = [WORDS[i] for i in ids[2:]]
    assert lm.generate_until(requests(("the cat", {"max_gen_toks": 6})))[0].split() == words
    if len(words) >= 2:  # stopping at a stop word drops it and everything after
        stop = words[1]
        cut = " ".join(words).split(stop)[0].split()
        assert lm.generate_until(requests(("the cat", {"until": [stop], "max_gen_toks": 6})))[0].split() == cut


def test_bad_arguments_name_the_fix(assets, tmp_path):
    with pytest.raises(ValueError, match="tokenizer=... is required"):
        LoopedEvalLM(checkpoint=str(assets.checkpoint))
    with pytest.raises(InputError, match=r"model_args tokenizer=.*no tokenizer\.json there"):
        LoopedEvalLM(checkpoint=str(assets.checkpoint), tokenizer=str(tmp_path))
    with pytest.raises(InputError, match=r"model_args checkpoint .*gone\.ckpt does not exist"):
        LoopedEvalLM(checkpoint=str(tmp_path / "gone.ckpt"), tokenizer=str(assets.root))
    with pytest.raises(ValueError, match="consolidate_checkpoint"):
        LoopedEvalLM(checkpoint=str(tmp_path), tokenizer=str(assets.root))


TASK = """\
task: looped_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


@pytest.mark.slow
def test_lm_eval_cli_scores_a_local_task(assets, tmp_path):
    """`python -m looped.tools.lm_eval_adapter` (lm-eval's CLI) on a local YAML task: every score is the hand one."""
    docs = [
        {"question": "the cat sat on the", "choices": ["mat", "dog", "rug ."], "answer": 0},
        {"question": "a dog", "choices": ["ran", "sat on a mat", "the"], "answer": 1},
        {"question": "the", "choices": ["cat", "dog"], "answer": 1},
    ]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "looped_tiny.yaml").write_text(TASK.format(data=data))
    out = tmp_path / "out"
    args = [
        "--model",
        "looped",
        "--model_args",
        f"checkpoint={assets.checkpoint},tokenizer={assets.root}",
        "--tasks",
        "looped_tiny",
        "--include_path",
        str(tasks),
        "--output_path",
        str(out),
        "--log_samples",
        "--batch_size",
        "2",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "looped.tools.lm_eval_adapter", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    samples = [json.loads(line) for f in out.rglob("samples_looped_tiny*.jsonl") for line in f.read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == [0, 1, 2]
    correct = 0
    for sample in samples:
        doc = docs[sample["doc_id"]]
        want = [by_hand(assets.model, doc["question"].split(), c.split())[0] for c in doc["choices"]]
        got = [float(r[0][0]) for r in sample["resps"]]
        assert got == pytest.approx(want, abs=1e-4), doc
        correct += int(max(range(len(want)), key=want.__getitem__) == doc["answer"])
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["looped_tiny"]
    assert results["acc,none"] == pytest.approx(correct / len(docs))
