"""The figures published in the README and the scripts' docstrings are those of the runs in
modelset/reference/, and saved weights can be checked in seconds with --evaluate."""

import json
import re
from pathlib import Path

import pytest
import torch

import common
import dropout_regularization
import error_bars
import l2_regularization
import lenet_cpu
import lenet_multigpu
import resnet18
from conftest import ROOT, epoch_figures, on_cpu, run_script

REFERENCE = ROOT / "modelset" / "reference"
SCRIPTS = {
    "lenet_cpu": lenet_cpu,
    "lenet_multigpu": lenet_multigpu,
    "l2_regularization": l2_regularization,
    "dropout_regularization": dropout_regularization,
}
# the scripts whose README table and docstring table publish their reference configs' figures
PUBLISHED = SCRIPTS | {"resnet18": resnet18}


def wall_time(seconds):
    """A config's wall time as the tables write it: None or absent when the code that trained it
    did not record wall times yet."""
    return "not recorded" if seconds is None else common.duration(seconds)


# what a column of a published table shows, and how the table writes it (a format or a function)
COLUMNS = {
    "ours": ("final_test_accuracy", "{:.2f}%"),
    "test accuracy": ("final_test_accuracy", "{:.2f}%"),
    "train accuracy (eval mode)": ("final_train_eval_accuracy", "{:.2f}%"),
    "train accuracy (last epoch)": ("final_train_accuracy", "{:.2f}%"),
    "train-test gap": ("train_test_gap", "{:.2f} points"),
    "weight norm": ("weight_norm", "{:.2f}"),
    "training time": ("train_seconds", "{:.0f} s"),
    "wall time": ("wall_seconds", wall_time),
    "report": ("reported", None),
}


def reference(script, name):
    return json.loads((REFERENCE / script / name / "results.json").read_text())


def figure(result, key):
    if key == "weight_norm":
        return result["extra"]["weight_norm"]
    if key == "wall_seconds":
        return result.get(key)
    return result["reported"]["test_accuracy"] if key == "reported" else result[key]


def shown(result, column):
    """A column's figure of `result` as a published table writes it; the report's with its own
    decimals."""
    key, shape = COLUMNS[column]
    reported = result["reported"]
    if key == "reported" and reported is None:  # a config the report did not train
        return "none"
    if key == "reported":
        return f"{reported['test_accuracy']:.{reported.get('decimals', 2)}f}%"
    return shape(figure(result, key)) if callable(shape) else shape.format(figure(result, key))


def summary_configs(path):
    """The configs of a summary.json: a list in runs before the run's wall time was recorded, else
    under "configs"."""
    summary = json.loads(path.read_text())
    return summary if isinstance(summary, list) else summary["configs"]


def published_tables(text):
    """(script, header, rows) of every table marked `<!-- evidence: SCRIPT -->` in `text`."""
    for script, table in re.findall(r"<!-- evidence: (\w+) -->\n((?:\|.*\n)+)", text):
        lines = [
            [cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in table.splitlines()
        ]
        yield script, [cell.lower() for cell in lines[0]], lines[2:]


def test_every_published_table_is_the_committed_runs():
    text = (ROOT / "README.md").read_text()
    tables = [table for table in published_tables(text) if table[0] in PUBLISHED]
    assert {script for script, _, _ in tables} == set(PUBLISHED)
    checked = 0
    for script, header, rows in tables:
        for row in rows:
            result = reference(script, "config_" + re.match(r"\d+", row[0]).group())
            for column, cell in zip(header, row):
                if column in COLUMNS:
                    assert cell.strip("*") == shown(result, column), (script, row[0], column)
                    checked += 1
    assert checked >= 60


def test_the_sample_summary_line_is_the_committed_runs():
    result = reference("lenet_cpu", "config_1")
    assert common.summary_line(result) in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("script", PUBLISHED)
def test_every_docstring_table_is_the_committed_runs(script):
    """Docstring tables: a row per config, first its number, then figures in the order of their
    header."""
    docstring = PUBLISHED[script].__doc__
    header = re.search(r"\n *config *\|(.*)\n", docstring)
    columns = [cell.strip().lower() for cell in header.group(1).split("|")]
    rows = re.findall(r"\n *(\d+) *\|(.*)", docstring)
    assert rows
    for number, cells in rows:
        result = reference(script, f"config_{number}")
        for column, cell in zip(columns, cells.split("|")):
            if column in COLUMNS:
                assert cell.split("  ")[0].strip() == shown(result, column), (
                    script,
                    number,
                    column,
                )


def assert_whole_run_on_the_full_data(script, name):
    """The reference config `name` of `script` trained on all of CIFAR-10, no --subset or
    --dry-run, and drew its curves; its results."""
    result = reference(script, name)
    assert result["data"]["train_images"] == 50_000 and result["data"]["test_images"] == 10_000
    assert result["environment"]["subset"] is None and not result["environment"]["dry_run"]
    assert (REFERENCE / script / name / "curves.png").exists()
    return result


def test_reference_runs_hold_what_the_readme_promises():
    for script in SCRIPTS:
        summary = summary_configs(REFERENCE / script / "summary.json")
        assert summary and all(
            entry["status"] == "completed" and entry["environment"]
            if "environment" in entry
            else entry["status"] == "completed"
            for entry in summary
        )
        for entry in summary:
            assert_whole_run_on_the_full_data(script, entry["name"])
    assert not list(REFERENCE.rglob("checkpoint.pt")) and not list(REFERENCE.rglob(".lock"))
    assert sum(path.stat().st_size for path in REFERENCE.rglob("*") if path.is_file()) < 8_000_000


def test_the_resnet_reference_configs_trained_every_epoch_on_the_full_data():
    """modelset/reference/resnet18/: each config trained to its last epoch on the full data, from
    committed code, in bf16 (the CPU that trained them computes it natively); its pictures beside
    it; no weights (45 MB each) and no checkpoints."""
    folders = sorted((REFERENCE / "resnet18").glob("config_*"))
    assert "config_4" in {folder.name for folder in folders}
    for folder in folders:
        result = assert_whole_run_on_the_full_data("resnet18", folder.name)
        assert result["status"] == "completed"
        assert len(result["history"]) == result["config"]["num_epochs"]
        assert re.fullmatch("[0-9a-f]{40}", result["environment"]["code"]["commit"])
        assert result["environment"]["code"]["changed"] is False
        assert result["precision"].startswith("bf16")
        assert (folder / "confusion.png").exists()
        assert not (folder / "model.pth").exists()


def test_every_committed_weights_file_fits_its_script_and_records_its_figure():
    weights = list(REFERENCE.rglob("model.pth"))
    assert {path.parent.parent.name for path in weights} == set(SCRIPTS)
    for path in weights:
        model = (
            dropout_regularization.DropoutNet(0.0)
            if path.parts[-3] == "dropout_regularization"
            else lenet_cpu.Net()
        )
        model.load_state_dict(torch.load(path, weights_only=True))
        assert "final_test_accuracy" in json.loads((path.parent / "results.json").read_text())


@pytest.mark.slow
def test_evaluate_reproduces_a_runs_figure_in_seconds(data_dir, tmp_path):
    assert lenet_cpu.main(on_cpu(data_dir, tmp_path, "--epochs", "1")) == 0
    folder = tmp_path / "run_001" / "config_1"
    recorded = json.loads((folder / "results.json").read_text())["final_test_accuracy"]
    completed = run_script(
        "lenet_cpu.py", "--evaluate", folder / "model.pth", "--data-dir", data_dir
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert f"test accuracy {recorded:.2f}% on 100 images" in lines[0]
    assert len([line for line in lines if re.fullmatch(r"  \w+ +\d+\.\d%", line)]) == 10
    assert lines[-1] == f"recorded in {folder / 'results.json'}: {recorded:.2f}% on 100 test images"


@pytest.mark.slow
def test_evaluate_refuses_a_missing_file_and_weights_of_another_model(data_dir, tmp_path):
    missing = run_script(
        "lenet_cpu.py", "--evaluate", tmp_path / "nothing.pth", "--data-dir", data_dir
    )
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    assert str(tmp_path / "nothing.pth") in missing.stderr and "missing" in missing.stderr
    torch.save(resnet18.ResNet18().state_dict(), tmp_path / "resnet.pth")
    other = run_script(
        "lenet_cpu.py", "--evaluate", tmp_path / "resnet.pth", "--data-dir", data_dir
    )
    assert (
        other.returncode == 1 and "Traceback" not in other.stderr and other.stderr.count("\n") == 1
    )
    assert "resnet.pth: it does not fit this model" in other.stderr


def test_the_resnet_speed_table_is_the_committed_benchmarks():
    """docs/DEVELOPING.md's ResNet-18 speeds on the CPU: each row is a `benchmarks/resnet18_speed.py
    --json` file in modelset/reference/benchmarks/, made by committed code (it names the commit)."""
    rows = evidence_rows((ROOT / "docs" / "DEVELOPING.md").read_text(), "resnet18_speed")
    assert len(rows) == len(list((REFERENCE / "benchmarks").glob("resnet18_speed_*.json"))) >= 4
    for file_name, batch_size, precision, train_rate, evaluation_rate, epochs_time in rows:
        figures = json.loads((REFERENCE / "benchmarks" / file_name.strip("`")).read_text())
        assert [batch_size, precision, train_rate, evaluation_rate, epochs_time] == [
            str(figures["batch_size"]),
            figures["precision"],
            f"{figures['train_images_per_second']:.1f}",
            f"{figures['evaluated_images_per_second']:.1f}",
            common.duration(figures["seconds_for_25_epochs"]),
        ]
        assert figures["code"]["commit"] and figures["code"]["changed"] is False


def test_the_lenet_threads_table_is_the_committed_measurement():
    measured = json.loads((REFERENCE / "benchmarks" / "lenet_threads.json").read_text())
    seconds = {
        (row["script"], row["threads"], row["condition"] != "idle"): row["train_seconds"]
        for row in measured["rows"]
    }
    rows = evidence_rows((ROOT / "docs" / "DEVELOPING.md").read_text(), "lenet_threads")
    assert len(rows) == 3 and measured["code"]["commit"]
    for script, *cells in rows:
        keys = [(1, False), (2, False), (1, True), (2, True)]
        assert cells == [
            f"{seconds[script.strip('`'), threads, beside]:.2f} s" for threads, beside in keys
        ]


def test_the_published_seed_spread_is_the_committed_runs():
    """lenet_cpu.py's seeds 1-3 on the reference run's machine, and seed 1 on an earlier machine."""
    folder = REFERENCE / "lenet_cpu_seeds"
    figures = [
        json.loads((folder / f"seed_{seed}" / "results.json").read_text()) for seed in (1, 2, 3)
    ]
    other_machine = json.loads((folder / "other_machine_seed_1" / "results.json").read_text())
    assert [result["environment"]["seed"] for result in figures] == [1, 2, 3]
    assert other_machine["environment"]["seed"] == 1
    assert other_machine["environment"]["platform"] != figures[0]["environment"]["platform"]
    for result in [*figures, other_machine]:
        assert result["status"] == "completed" and result["data"]["train_images"] == 50_000
    assert (
        figures[0]["final_test_accuracy"]
        == reference("lenet_cpu", "config_1")["final_test_accuracy"]
    )
    accuracies = [f"{result['final_test_accuracy']:.2f}%" for result in figures]
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"seeds 1, 2 and 3 gave {accuracies[0]}, {accuracies[1]} and {accuracies[2]}" in readme
    assert (
        f"seed 1 gave {accuracies[0]} here and {other_machine['final_test_accuracy']:.2f}%"
        in readme
    )
    spread = max(r["final_test_accuracy"] for r in figures) - min(
        r["final_test_accuracy"] for r in figures
    )
    assert f"({spread:.2f} here, from three)" in readme


def evidence_rows(text, name):
    """The cells of each row of the table marked `<!-- evidence: name -->` in `text`."""
    table = re.search(rf"<!-- evidence: {name} -->\n((?:\|.*\n)+)", text).group(1)
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in table.splitlines()[2:]
    ]


def without_paths(command):
    """A recorded command line (sys.argv) without --data-dir and --out-dir and their values."""
    kept = []
    skip = False
    for argument in command:
        if not skip and argument not in ("--data-dir", "--out-dir"):
            kept.append(argument)
        skip = argument in ("--data-dir", "--out-dir")
    return kept


def test_the_short_run_table_is_the_committed_short_runs():
    """README's short runs: each command is the run's own (less its data and output folders), its
    wall time the run's summary.json, its figures the config's results.json, made by committed
    code."""
    script = None
    rows = evidence_rows((ROOT / "README.md").read_text(), "short_runs")
    assert len(rows) >= 5
    for command, config, wall_time, test_accuracy, gap in rows:
        if command:
            argv = command.strip("`").split()[1:]
            script = Path(argv[0]).stem
            folder = REFERENCE / "short_runs" / script
            summary = json.loads((folder / "summary.json").read_text())
            assert (
                wall_time == common.duration(summary["wall_seconds"])
                and summary["resumed"] is False
            )
        result = json.loads((folder / f"config_{config.split()[0]}" / "results.json").read_text())
        assert without_paths(result["environment"]["command"]) == argv
        assert result["environment"]["code"]["changed"] is False and result["status"] == "completed"
        assert test_accuracy == f"{result['final_test_accuracy']:.2f}%"
        assert gap == (
            f"{result['train_test_gap']:.2f} points" if "train_test_gap" in result else ""
        )


def test_the_whole_run_table_is_the_reference_runs():
    """README's "What to expect": the training time and accuracies of the configs each command runs;
    the wall time of a run that trained exactly those configs in one process, else the sum of the
    configs' own wall times (over every process that trained them) where each recorded one."""
    rows = evidence_rows((ROOT / "README.md").read_text(), "whole_runs")
    assert len(rows) >= 5
    for command, _, wall_time, training_time, test_accuracy, _ in rows:
        argv = command.strip("`").split()[1:]
        summary_path = REFERENCE / Path(argv[0]).stem / "summary.json"
        configs = summary_configs(summary_path)
        if "--configs" in argv:
            numbers = [f"config_{n}" for n in argv[argv.index("--configs") + 1 :] if n.isdigit()]
            chosen = [result for result in configs if result["name"] in numbers]
            assert len(chosen) == len(numbers)
        else:
            chosen = configs
        assert training_time == f"{sum(result['train_seconds'] for result in chosen):.0f} s"
        accuracies = [result["final_test_accuracy"] for result in chosen]
        low_high = (
            f"{min(accuracies):.2f}%"
            if len(accuracies) == 1
            else f"{min(accuracies):.2f}-{max(accuracies):.2f}%"
        )
        assert test_accuracy.startswith(low_high)
        summary = json.loads(summary_path.read_text())
        configs_wall_seconds = [result.get("wall_seconds") for result in chosen]
        if isinstance(summary, dict) and chosen == configs and not summary["resumed"]:
            assert wall_time == common.duration(summary["wall_seconds"])
        elif None not in configs_wall_seconds:
            assert wall_time == common.duration(sum(configs_wall_seconds))
        else:
            assert wall_time == "not recorded"


def test_the_laptop_commands_quote_the_committed_runs():
    """README's first commands for a laptop: their wall times and accuracy are the committed
    runs'."""
    readme = (ROOT / "README.md").read_text()

    def wall_time(folder):
        return common.duration(json.loads((folder / "summary.json").read_text())["wall_seconds"])

    baseline = reference("lenet_cpu", "config_1")["final_test_accuracy"]
    lines = {
        "python lenet_cpu.py --data-dir PATH": (
            f"{wall_time(REFERENCE / 'lenet_cpu')}, {baseline:.2f}%"
        ),
        "python dropout_regularization.py --configs 1 2 --subset 5000 --data-dir PATH": wall_time(
            REFERENCE / "short_runs" / "dropout_regularization"
        ),
        "python lenet_multigpu.py --configs 4 --subset 5000 --data-dir PATH": wall_time(
            REFERENCE / "short_runs" / "lenet_multigpu"
        ),
    }
    for command, figures in lines.items():
        line = next(line for line in readme.splitlines() if line.startswith(command + " "))
        assert line.split("#")[1].strip().endswith(figures), line


def test_the_two_scripts_controls_train_alike():
    """Dropout's control (rate 0) trains exactly as L2's (weight decay 0): one control serves
    both."""
    l2_control = reference("l2_regularization", "config_1")
    dropout_control = reference("dropout_regularization", "config_1")
    assert epoch_figures(l2_control["history"]) == epoch_figures(dropout_control["history"])
    assert l2_control["confusion_matrix"] == dropout_control["confusion_matrix"]


def test_the_error_bars_are_error_bars_py_over_the_committed_seed_runs():
    """README's regularization error bars: error_bars.py over modelset/reference/seeds/, whose runs
    hold out a validation split, train on the full data and name the committed code that made
    them."""
    found = {}
    for script in ("l2_regularization", "dropout_regularization"):
        folders = sorted((REFERENCE / "seeds" / script).iterdir())
        for summary in error_bars.summaries(folders):
            found[summary["script"], summary["names"][0]] = summary
            for path in summary["results"]:
                result = json.loads(Path(path).read_text())
                assert result["config"]["val_fraction"] == 0.1 and result["validation"] is True
                assert result["data"]["train_images"] == 50_000
                assert result["environment"]["subset"] is None
                assert result["environment"]["code"]["changed"] is False
                assert re.fullmatch("[0-9a-f]{40}", result["environment"]["code"]["commit"])
    rows = evidence_rows((ROOT / "README.md").read_text(), "seeds")
    assert len(rows) == len(found) >= 6
    for script_cell, config, _, seeds, last_epoch, picked, gap in rows:
        script = script_cell.strip("`") or script
        summary = found[script, f"config_{config}"]
        assert seeds == ", ".join(map(str, summary["seeds"])) and len(summary["seeds"]) >= 3
        assert last_epoch == error_bars.shown(summary["last_epoch_test_accuracy"], "%")
        epochs = ", ".join(map(str, summary["val_picked_test_accuracy"]["epochs"]))
        shown = error_bars.shown(summary["val_picked_test_accuracy"], "%")
        assert picked == f"{shown} (epochs {epochs})"
        assert gap == error_bars.shown(summary["train_test_gap"], " points")
    # the docstrings quote the same figures: each script's own configs and the shared control
    for script in ("l2_regularization", "dropout_regularization"):
        mine = [summary for (name, _), summary in found.items() if name == f"{script}.py"]
        control = found["l2_regularization.py", "config_1"]
        allowed = {
            error_bars.shown(summary[key], "%")
            for summary in [*mine, control]
            for key in ("last_epoch_test_accuracy", "val_picked_test_accuracy")
        }
        quoted = re.findall(r"\d+\.\d\d \+- \d+\.\d\d%", SCRIPTS[script].__doc__)
        assert len(quoted) >= 6 and set(quoted) <= allowed
