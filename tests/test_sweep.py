"""``looped sweep``: grid expansion, bad sweep files, a real two-cell sweep, and the study heatmap."""

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import RECIPES
from looped.tools import report
from looped.tools.study import StudyPoint, plot_study, study_points, study_table
from looped.tools.sweep import load_sweep
from looped.tools.sweep import main as sweep_main

QUICK = str(RECIPES / "quickstart.yaml")


def write(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_every_cell_is_one_combination_with_its_overrides(tmp_path):
    spec = {
        "name": "grid",
        "overrides": {"trainer.max_steps": 7},
        "tasks": {
            "a": {"recipe": QUICK, "size_key": "data.init_args.hops", "sizes": [2, 3]},
            "b": {"recipe": QUICK, "size_key": "data.init_args.length", "sizes": [16]},
        },
        "axes": {
            "mixer": {
                "softmax": {"model.init_args.config.attention": "softmax"},
                "hybrid": {"model.init_args.config.attention": ["linear", "softmax"]},
            },
            "width": {"32": {"model.init_args.config.d_model": 32}, "64": {"model.init_args.config.d_model": 64}},
        },
    }
    sweep = load_sweep(write(tmp_path, spec), tmp_path / "runs")
    expected = [("a", 2), ("a", 3), ("b", 16)]
    combos = list(itertools.product(["softmax", "hybrid"], ["32", "64"]))
    assert [(c.task, c.size, c.labels["mixer"], c.labels["width"]) for c in sweep.cells] == [
        (t, s, m, w) for t, s in expected for m, w in combos
    ]
    assert len({c.name for c in sweep.cells}) == len(sweep.cells)  # one directory each
    cell = next(c for c in sweep.cells if c.task == "b" and c.labels == {"mixer": "hybrid", "width": "64"})
    assert cell.overrides == {
        "trainer.max_steps": 7,
        "data.init_args.length": 16,
        "model.init_args.config.attention": ["linear", "softmax"],
        "model.init_args.config.d_model": 64,
    }
    command = sweep.command(cell)
    assert command[command.index("--model.init_args.config.attention") + 1] == '["linear", "softmax"]'
    assert command[command.index("--trainer.logger.init_args.name") + 1] == cell.name


@pytest.mark.parametrize(
    "spec, field",
    [
        ({"tasks": {"a": {"recipe": QUICK}}}, "name"),
        ({"name": "x", "tasks": {"a": {"recipe": "nope.yaml"}}}, "tasks.a.recipe"),
        ({"name": "x", "tasks": {"a": {"recipe": QUICK}}, "axis": {}}, "unknown"),
        ({"name": "x", "tasks": {"a": {"recipe": QUICK}}, "axes": {"width": {"64": 64}}}, "axes.width.64"),
    ],
)
def test_bad_sweep_files_name_the_field(tmp_path, spec, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_sweep(write(tmp_path, spec))


@pytest.mark.slow
def test_a_real_sweep_runs_every_cell_once_and_reports_the_heatmap(run_dir, capsys):
    spec = {
        "name": "tiny",
        "metric": "test/exact_match",
        "solved_at": 0.5,
        "overrides": {
            "trainer.max_steps": 3,
            "trainer.val_check_interval": 3,
            "data.init_args.val_size": 64,
            "data.init_args.test_size": 64,
            "data.init_args.batch_size": 8,
            "model.init_args.config.n_heads": 2,
            "model.init_args.config.d_ff": 64,
        },
        "tasks": {"phop": {"recipe": QUICK, "size_key": "data.init_args.hops", "sizes": [1]}},
        "axes": {
            "mixer": {
                "softmax": {"model.init_args.config.attention": "softmax"},
                "linear": {"model.init_args.config.attention": "linear"},
            },
            "width": {"16": {"model.init_args.config.d_model": 16}},
        },
    }
    path = write(run_dir, spec)
    sweep_main([str(path), "--runs-dir", "runs"])
    cells = sorted(p.parent.name for p in (run_dir / "runs" / "tiny").glob("*/cell.json"))
    assert cells == ["phop-size1-mixer_linear-width_16", "phop-size1-mixer_softmax-width_16"]
    record = json.loads((run_dir / "runs/tiny/phop-size1-mixer_linear-width_16/cell.json").read_text())
    assert record["cell"] == {"task": "phop", "size": 1, "mixer": "linear", "width": "16"}
    config = yaml.safe_load(
        next((run_dir / "runs/tiny/phop-size1-mixer_linear-width_16").glob("version_*/config.yaml")).read_text()
    )
    assert config["model"]["init_args"]["config"]["attention"] == "linear"  # the override reached the run
    assert config["model"]["init_args"]["config"]["d_model"] == 16

    capsys.readouterr()
    sweep_main([str(path), "--runs-dir", "runs", "--print"])  # finished cells are not run again
    assert capsys.readouterr().out.strip() == ""

    runs = report.load_runs([run_dir / "runs" / "tiny"])
    points = study_points(runs)
    assert sorted(p.panel for p in points) == ["mixer=linear", "mixer=softmax"]
    for point in points:
        run = next(r for r in runs if r.path.parent.name.endswith(point.panel.split("=")[1] + "-width_16"))
        assert point.accuracy == run.last("test/exact_match")
        assert point.solved == (run.last("test/exact_match") >= 0.5)
    out = report.write_report(runs, run_dir / "report")
    assert "Width × problem size" in out.read_text()
    assert (run_dir / "report" / "study_heatmap.png").stat().st_size > 0


def test_study_table_marks_exactly_the_cells_at_or_above_the_threshold(tmp_path):
    accuracy = {
        ("softmax", "64", "4"): 0.95,
        ("softmax", "64", "8"): 0.90,
        ("linear", "64", "4"): 0.899,
        ("linear", "128", "8"): 0.2,
    }
    points = [StudyPoint("lis", f"mixer={m}", w, s, a, 0.9) for (m, w, s), a in accuracy.items()]
    table = study_table(points)
    assert "| 64 | 95.0 ✓ | 90.0 ✓ |" in table  # 0.90 is solved (≥)
    assert "| 64 | 89.9 | — |" in table  # 0.899 is not
    assert "| 128 | — | 20.0 |" in table
    assert plot_study(points, tmp_path / "h.png").stat().st_size > 0


def test_study_points_read_cell_records_and_keep_the_best_version(tmp_path):
    cell = tmp_path / "sweep" / "lis-size8-mixer_linear-width_64"
    record = {
        "sweep": "s",
        "metric": "test/answer_accuracy",
        "solved_at": 0.9,
        "cell": {"task": "lis", "size": 8, "mixer": "linear", "width": "64"},
    }
    (cell / "version_0").mkdir(parents=True)
    (cell / "version_1").mkdir()
    (cell / "cell.json").write_text(json.dumps(record))
    runs = [
        SimpleNamespace(path=cell / f"version_{i}", last={"test/answer_accuracy": acc}.get)
        for i, acc in enumerate([0.5, 0.93])
    ]
    runs.append(SimpleNamespace(path=tmp_path / "elsewhere", last=lambda tag: 1.0))  # not a sweep run
    [point] = study_points(runs)
    assert (point.task, point.panel, point.width, point.size, point.accuracy) == (
        "lis",
        "mixer=linear",
        "64",
        "8",
        0.93,
    )
    assert point.solved


SWEEPS = sorted((RECIPES / "sweeps").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_sweep_cell_builds(path, run_dir):
    """Each task × size × mixer of a shipped sweep parses and builds (at the sweep's smallest width)."""
    from looped.cli import LoopedCLI

    sweep = load_sweep(path)
    widths = {c.labels.get("width", "") for c in sweep.cells}
    smallest = min(widths, key=lambda w: float(w or 0))
    cells = [c for c in sweep.cells if c.labels.get("width", "") == smallest]
    assert len(cells) * len(widths) == len(sweep.cells)
    for cell in cells:
        args = ["--config", cell.recipe]
        for key, value in cell.overrides.items():
            args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
        cli = LoopedCLI(args=args, run=False)
        config = cli.model.config
        assert config.attention == cell.overrides["model.init_args.config.attention"]
        assert cli.datamodule.size == cell.size
        assert config.max_seq_len == cli.datamodule.seq_len
