"""The figures published in the README and the scripts' docstrings are those of the runs in modelset/reference/,
and saved weights can be checked in seconds with --evaluate."""

import json
import re

import pytest
import torch

import common
import dropout_regularization
import l2_regularization
import lenet_cpu
import lenet_multigpu
import resnet18
from conftest import ROOT, run_script

REFERENCE = ROOT / "modelset" / "reference"
SCRIPTS = {"lenet_cpu": lenet_cpu, "lenet_multigpu": lenet_multigpu, "l2_regularization": l2_regularization,
           "dropout_regularization": dropout_regularization}
# what a column of a published table shows, and how the table writes it
COLUMNS = {"ours": ("final_test_accuracy", "{:.2f}%"), "test accuracy": ("final_test_accuracy", "{:.2f}%"),
           "train accuracy (eval mode)": ("final_train_eval_accuracy", "{:.2f}%"),
           "train accuracy (last epoch)": ("final_train_accuracy", "{:.2f}%"),
           "train-test gap": ("train_test_gap", "{:.2f} points"), "weight norm": ("weight_norm", "{:.2f}"),
           "training time": ("train_seconds", "{:.0f} s"), "report": ("reported", "{:.2f}%")}


def reference(script, name):
    return json.loads((REFERENCE / script / name / "results.json").read_text())


def figure(result, key):
    if key == "weight_norm":
        return result["extra"]["weight_norm"]
    return result["reported"]["test_accuracy"] if key == "reported" else result[key]


def published_tables(text):
    """(script, header, rows) of every table marked `<!-- evidence: SCRIPT -->` in `text`."""
    for script, table in re.findall(r"<!-- evidence: (\w+) -->\n((?:\|.*\n)+)", text):
        lines = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table.splitlines()]
        yield script, [cell.lower() for cell in lines[0]], lines[2:]


def test_every_published_table_is_the_committed_runs():
    text = (ROOT / "README.md").read_text()
    tables = list(published_tables(text))
    assert {script for script, _, _ in tables} == set(SCRIPTS)
    checked = 0
    for script, header, rows in tables:
        for row in rows:
            result = reference(script, "config_" + re.match(r"\d+", row[0]).group())
            for column, cell in zip(header, row):
                if column in COLUMNS:
                    key, shape = COLUMNS[column]
                    assert cell.strip("*") == shape.format(figure(result, key)), (script, row[0], column)
                    checked += 1
    assert checked >= 60


def test_the_sample_summary_line_is_the_committed_runs():
    result = reference("lenet_cpu", "config_1")
    assert common.summary_line(result) in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_docstring_table_is_the_committed_runs(script):
    """Docstring tables: a row per config, first its number, then figures in the order of their header."""
    docstring = SCRIPTS[script].__doc__
    header = re.search(r"\n *config *\|(.*)\n", docstring)
    columns = [cell.strip().lower() for cell in header.group(1).split("|")]
    rows = re.findall(r"\n *(\d+) *\|(.*)", docstring)
    assert rows
    for number, cells in rows:
        result = reference(script, f"config_{number}")
        for column, cell in zip(columns, cells.split("|")):
            if column in COLUMNS:
                key, shape = COLUMNS[column]
                assert cell.split("  ")[0].strip() == shape.format(figure(result, key)), (script, number, column)


def test_reference_runs_hold_what_the_readme_promises():
    for script in SCRIPTS:
        summary = json.loads((REFERENCE / script / "summary.json").read_text())
        assert summary and all(entry["status"] == "completed" and entry["environment"] if "environment" in entry
                               else entry["status"] == "completed" for entry in summary)
        for entry in summary:
            result = reference(script, entry["name"])
            assert result["data"]["train_images"] == 50_000 and result["data"]["test_images"] == 10_000
            assert result["environment"]["subset"] is None and not result["environment"]["dry_run"]
            assert (REFERENCE / script / entry["name"] / "curves.png").exists()
    assert not list(REFERENCE.rglob("checkpoint.pt")) and not list(REFERENCE.rglob(".lock"))
    assert sum(path.stat().st_size for path in REFERENCE.rglob("*") if path.is_file()) < 8_000_000


def test_every_committed_weights_file_fits_its_script_and_records_its_figure():
    weights = list(REFERENCE.rglob("model.pth"))
    assert {path.parent.parent.name for path in weights} == set(SCRIPTS)
    for path in weights:
        model = dropout_regularization.DropoutNet(0.0) if path.parts[-3] == "dropout_regularization" else lenet_cpu.Net()
        model.load_state_dict(torch.load(path, weights_only=True))
        assert "final_test_accuracy" in json.loads((path.parent / "results.json").read_text())


def test_evaluate_reproduces_a_runs_figure_in_seconds(data_dir, tmp_path):
    assert lenet_cpu.main(["--device", "cpu", "--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--epochs", "1"]) == 0
    folder = tmp_path / "run_001" / "config_1"
    recorded = json.loads((folder / "results.json").read_text())["final_test_accuracy"]
    completed = run_script("lenet_cpu.py", "--evaluate", folder / "model.pth", "--data-dir", data_dir)
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert f"test accuracy {recorded:.2f}% on 100 images" in lines[0]
    assert len([line for line in lines if re.fullmatch(r"  \w+ +\d+\.\d%", line)]) == 10
    assert lines[-1] == f"recorded in {folder / 'results.json'}: {recorded:.2f}% on 100 test images"


def test_evaluate_refuses_a_missing_file_and_weights_of_another_model(data_dir, tmp_path):
    missing = run_script("lenet_cpu.py", "--evaluate", tmp_path / "nothing.pth", "--data-dir", data_dir)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    assert str(tmp_path / "nothing.pth") in missing.stderr and "missing" in missing.stderr
    torch.save(resnet18.ResNet18().state_dict(), tmp_path / "resnet.pth")
    other = run_script("lenet_cpu.py", "--evaluate", tmp_path / "resnet.pth", "--data-dir", data_dir)
    assert other.returncode == 1 and "Traceback" not in other.stderr and other.stderr.count("\n") == 1
    assert "resnet.pth: it does not fit this model" in other.stderr


def test_the_resnet_speed_table_is_the_committed_benchmarks():
    """docs/DEVELOPING.md's ResNet-18 speeds on the CPU: each row is a `benchmarks/resnet18_speed.py --json`
    file in modelset/reference/benchmarks/, made by committed code (it names the commit)."""
    text = (ROOT / "docs" / "DEVELOPING.md").read_text()
    table = re.search(r"<!-- evidence: resnet18_speed -->\n((?:\|.*\n)+)", text).group(1)
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table.splitlines()[2:]]
    assert len(rows) == len(list((REFERENCE / "benchmarks").glob("resnet18_speed_*.json"))) >= 4
    for file_name, batch_size, precision, train_rate, evaluation_rate, epochs_time in rows:
        figures = json.loads((REFERENCE / "benchmarks" / file_name.strip("`")).read_text())
        assert [batch_size, precision, train_rate, evaluation_rate, epochs_time] == [
            str(figures["batch_size"]), figures["precision"], f"{figures['train_images_per_second']:.1f}",
            f"{figures['evaluated_images_per_second']:.1f}", common.duration(figures["seconds_for_25_epochs"])]
        assert figures["code"]["commit"] and figures["code"]["changed"] is False


def test_the_lenet_threads_table_is_the_committed_measurement():
    text = (ROOT / "docs" / "DEVELOPING.md").read_text()
    table = re.search(r"<!-- evidence: lenet_threads -->\n((?:\|.*\n)+)", text).group(1)
    measured = json.loads((REFERENCE / "benchmarks" / "lenet_threads.json").read_text())
    seconds = {(row["script"], row["threads"], row["condition"] != "idle"): row["train_seconds"]
               for row in measured["rows"]}
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table.splitlines()[2:]]
    assert len(rows) == 3 and measured["code"]["commit"]
    for script, *cells in rows:
        keys = [(1, False), (2, False), (1, True), (2, True)]
        assert cells == [f"{seconds[script.strip('`'), threads, beside]:.2f} s" for threads, beside in keys]


def test_the_published_seed_spread_is_the_committed_runs():
    """lenet_cpu.py's seeds 1-3 on a second machine, beside the reference run's seed 1."""
    figures = [json.loads((REFERENCE / "lenet_cpu_seeds" / f"seed_{seed}" / "results.json").read_text())
               for seed in (1, 2, 3)]
    assert [result["environment"]["seed"] for result in figures] == [1, 2, 3]
    assert all(result["status"] == "completed" and result["data"]["train_images"] == 50_000 for result in figures)
    sentence = ("seeds 1, 2 and 3 gave " + ", ".join(f"{r['final_test_accuracy']:.2f}%" for r in figures[:2]) +
                f" and {figures[2]['final_test_accuracy']:.2f}%")
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert sentence in readme and f"{reference('lenet_cpu', 'config_1')['final_test_accuracy']:.2f}%" in readme
