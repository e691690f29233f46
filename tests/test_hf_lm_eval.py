"""The standard evaluation path: lm-evaluation-harness's own ``hf`` model on an exported folder scores a local
task exactly as our ``looped`` adapter scores the checkpoint it came from (and as the logits do by hand).

Reuses ``tests/test_lm_eval_adapter.py``'s offline setup (word-level tokenizer, tiny checkpoint, JSON docs);
needs the ``[eval]`` and ``[hf]`` extras.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from test_lm_eval_adapter import TASK, assets, by_hand  # noqa: E402, F401  (assets is a fixture)

from looped.tools.export import export_hf  # noqa: E402

GENERATE_TASK = """\
task: looped_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 5
  do_sample: false
metric_list:
  - metric: exact_match
"""

DOCS = [
    {"question": "the cat sat on the", "choices": ["mat", "dog", "rug ."], "answer": 0, "target": "mat"},
    {"question": "a dog", "choices": ["ran", "sat on a mat", "the"], "answer": 1, "target": "ran"},
    {"question": "the", "choices": ["cat", "dog"], "answer": 1, "target": "cat"},
    {"question": "the cat sat", "choices": ["on", "."], "answer": 0, "target": "on the mat"},
    {"question": "dog", "choices": ["a", "the rug"], "answer": 1, "target": "ran"},
]


def lm_eval(model: str, model_args: str, tasks, out) -> tuple[dict, dict]:
    """lm-eval's CLI (through ``looped lm-eval``, which imports ``looped`` first); results and samples per task."""
    args = ["--model", model, "--model_args", model_args, "--tasks", "looped_tiny,looped_tiny_gen"]
    args += ["--include_path", str(tasks), "--output_path", str(out), "--log_samples", "--batch_size", "3"]
    args += ["--device", "cpu"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "looped.tools.lm_eval_adapter", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    samples = {
        task: {
            s["doc_id"]: s
            for f in out.rglob(f"samples_{task}_[0-9]*.jsonl")
            for s in map(json.loads, f.read_text().splitlines())
        }
        for task in ("looped_tiny", "looped_tiny_gen")
    }
    return results, samples


@pytest.mark.slow
def test_lm_eval_hf_model_on_the_export_equals_the_looped_adapter(assets, tmp_path):  # noqa: F811
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "looped_tiny.yaml").write_text(TASK.format(data=data))
    (tasks / "looped_tiny_gen.yaml").write_text(GENERATE_TASK.format(data=data))
    exported = export_hf(
        str(assets.checkpoint), str(tmp_path / "exported"), tokenizer=str(assets.root / "tokenizer.json")
    )

    hf_results, hf_samples = lm_eval("hf", f"pretrained={exported},dtype=float32", tasks, tmp_path / "hf")
    ours_results, ours_samples = lm_eval(
        "looped", f"checkpoint={assets.checkpoint},tokenizer={assets.root}", tasks, tmp_path / "ours"
    )
    for doc_id, doc in enumerate(DOCS):
        hf_scores = [float(r[0][0]) for r in hf_samples["looped_tiny"][doc_id]["resps"]]
        our_scores = [float(r[0][0]) for r in ours_samples["looped_tiny"][doc_id]["resps"]]
        want = [by_hand(assets.model, doc["question"].split(), c.split())[0] for c in doc["choices"]]
        assert hf_scores == pytest.approx(our_scores, abs=1e-4) and hf_scores == pytest.approx(want, abs=1e-4), doc
        # Greedy generation, batched (lm-eval left-pads the contexts of a batch): the same text.
        assert hf_samples["looped_tiny_gen"][doc_id]["resps"] == ours_samples["looped_tiny_gen"][doc_id]["resps"], doc
    assert sum(bool(s["resps"][0][0].strip()) for s in hf_samples["looped_tiny_gen"].values()) >= 3  # text, not stops
    for task, metric in (("looped_tiny", "acc,none"), ("looped_tiny_gen", "exact_match,none")):
        assert hf_results[task][metric] == ours_results[task][metric], task
