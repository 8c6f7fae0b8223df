"""lenet_cpu.py: the tutorial network, that it learns, and the files a run writes."""

import json
import re

import pytest
import torch

import common
import lenet_cpu
from conftest import on_cpu, run_script, time_lenet_steps


def test_net_is_the_tutorial_lenet():
    net = lenet_cpu.Net()
    assert sum(p.numel() for p in net.parameters()) == 62_006
    assert net(torch.zeros(4, 3, 32, 32)).shape == (4, 10)


@pytest.mark.slow
def test_run_writes_results_and_never_overwrites(data_dir, tmp_path, capsys):
    arguments = on_cpu(data_dir, tmp_path, "--epochs", "1")
    assert lenet_cpu.main(arguments) == 0
    output = capsys.readouterr().out
    assert re.search(
        r"config_1: Configuration: \{'num_epochs': 1, 'lr': 0.001, 'momentum': 0.9, "
        r"'batch_size': 4\} "
        r"Final test accuracy: \d+\.\d\d% Training time: \d+\.\d\d seconds",
        output,
    )
    assert "Accuracy for class: plane is" in output
    folder = tmp_path / "run_001" / "config_1"
    assert sorted(p.name for p in folder.iterdir()) == [
        "checkpoint.pt",
        "confusion.png",
        "curves.png",
        "model.pth",
        "predictions.png",
        "results.json",
    ]
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "completed" and results["config"]["batch_size"] == 4
    assert [sorted(e) for e in results["history"]] == [
        [
            "epoch",
            "seconds",
            "test_accuracy",
            "train_accuracy",
            "train_loss",
            "wall_seconds",
            "warmup_seconds",
        ]
    ]
    assert results["final_test_accuracy"] == results["history"][-1]["test_accuracy"]
    assert results["train_seconds"] == results["history"][0]["seconds"]
    # the wall time holds the training time, the warm-up and the evaluation beside them
    assert results["wall_seconds"] == results["history"][0]["wall_seconds"]
    assert results["wall_seconds"] > results["train_seconds"] + results["warmup_seconds"]
    # the report's figure is saved, but a 1-epoch run is not the report's config: no comparison
    assert results["reported"]["test_accuracy"] == 60 and results["versus_report"] is None
    assert "not compared with the report: other epochs" in output and "report: 60% (" not in output
    # the confusion matrix: rows are the true classes of all 100 test images
    confusion = torch.tensor(results["confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == 100
    assert 100 * confusion.diag().sum().item() / 100 == pytest.approx(
        results["final_test_accuracy"]
    )
    assert list(results["per_class_test_accuracy"]) == list(common.CLASSES)
    assert (
        results["environment"]["torch"] == torch.__version__ and results["environment"]["seed"] == 1
    )
    state = torch.load(folder / "model.pth", weights_only=True)
    lenet_cpu.Net().load_state_dict(state)  # plain keys, no "module." prefix
    before = {p: p.read_bytes() for p in folder.iterdir()}

    assert (tmp_path / "latest").read_text() == "run_001\n"
    assert lenet_cpu.main(arguments) == 0
    assert (tmp_path / "run_002" / "config_1" / "model.pth").exists()
    assert {p: p.read_bytes() for p in folder.iterdir()} == before
    assert (tmp_path / "latest").read_text() == "run_002\n"


def test_the_report_is_compared_only_for_its_own_config_at_its_precision(
    data_dir, tmp_path, monkeypatch, capsys
):
    """The report wrote "60%": ours is compared in whole points, never with two decimals it
    lacks."""
    # the listed config
    monkeypatch.setattr(lenet_cpu, "CONFIGS", [dict(lenet_cpu.CONFIGS[0], num_epochs=1)])
    assert (
        lenet_cpu.main(["--device", "cpu", "--data-dir", str(data_dir), "--out-dir", str(tmp_path)])
        == 0
    )
    results = json.loads((tmp_path / "run_001" / "config_1" / "results.json").read_text())
    points = results["versus_report"]["test_accuracy_points"]
    assert points == round(results["final_test_accuracy"] - 60) and points == int(points)
    output = capsys.readouterr().out
    assert f"| report: 60% ({points:+.0f} point" in output and "60.00%" not in output


def test_a_long_cpu_run_says_so_early_with_how_to_shorten_it(
    data_dir, tmp_path, monkeypatch, capsys
):
    time_lenet_steps(monkeypatch, lambda call: 10.0)  # every step seems to take seconds
    assert lenet_cpu.main(on_cpu(data_dir, tmp_path, "--epochs", "2")) == 0
    lines = capsys.readouterr().out.splitlines()
    estimates = [line for line in lines if line.startswith("at this pace its training alone takes")]
    assert len(estimates) == 1 and "--subset" in estimates[0]
    # the suggested command runs when copied: it keeps the data and output folders given
    assert f"--data-dir {data_dir}" in estimates[0] and f"--out-dir {tmp_path}" in estimates[0]
    epochs = [line for line in lines if line.startswith("config_1 epoch") and "loss" in line]
    assert len(epochs) == 2 and all(line.endswith("left in the run") for line in epochs)


@pytest.mark.parametrize("seconds_per_step, estimate", [(1.0, None), (20.0, "33 min 20 s")])
@pytest.mark.slow
def test_the_estimate_leaves_the_slow_warm_up_steps_out(
    data_dir, tmp_path, monkeypatch, capsys, seconds_per_step, estimate
):
    # 1000 s for each warm-up step; the estimate comes within the first epoch's steps
    time_lenet_steps(
        monkeypatch, lambda call: 1000.0 if call < common.WARMUP_STEPS else seconds_per_step
    )
    assert lenet_cpu.main(on_cpu(data_dir, tmp_path, "--epochs", "2")) == 0
    lines = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("at this pace")
    ]
    assert len(lines) == (0 if estimate is None else 1)
    if estimate:  # 50 steps of batch 4 per epoch, 2 epochs, at 20 s a step
        assert f"takes {estimate};" in lines[0]


def test_durations_read_as_a_person_would():
    assert [common.duration(s) for s in (4.2, 89, 605, 7200 + 300)] == [
        "4 s",
        "89 s",
        "10 min 05 s",
        "2 h 05 min",
    ]


@pytest.mark.slow
def test_lenet_learns_the_tiny_dataset(data_dir, tmp_path):
    arguments = on_cpu(data_dir, tmp_path, "--epochs", "15", "--lr", "0.01")
    assert lenet_cpu.main(arguments) == 0
    results = json.loads((tmp_path / "run_001" / "config_1" / "results.json").read_text())
    assert results["final_test_accuracy"] > 60  # chance is 10%
    assert results["history"][-1]["train_loss"] < results["history"][0]["train_loss"]


@pytest.mark.slow
def test_command_line_error_exits_non_zero(tmp_path):
    completed = run_script("lenet_cpu.py", "--configs", "2", "--out-dir", tmp_path)
    assert completed.returncode == 2 and "invalid choice: 2 (choose from 1)" in completed.stderr


def test_real_cifar10_two_epochs(real_data_dir, tmp_path):
    arguments = on_cpu(real_data_dir, tmp_path, "--epochs", "2")
    assert lenet_cpu.main(arguments) == 0
    results = json.loads((tmp_path / "run_001" / "config_1" / "results.json").read_text())
    assert results["final_test_accuracy"] > 20  # 28.8% on the 5,000-image subset; chance is 10%


@pytest.mark.slow
def test_dry_run_trains_two_batches_of_one_epoch(data_dir, tmp_path):
    arguments = on_cpu(data_dir, tmp_path, "--dry-run")
    assert lenet_cpu.main(arguments) == 0
    results = json.loads((tmp_path / "run_001" / "config_1" / "results.json").read_text())
    assert len(results["history"]) == 1 and results["environment"]["dry_run"]
    assert not (tmp_path / "latest").exists()  # a dry run is no result to lead to


def test_the_tutorials_loss_line_every_2000_batches(data_dir, tmp_path, capsys):
    assert lenet_cpu.main(on_cpu(data_dir, tmp_path, "--epochs", "1", "--log-interval", "10")) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[1, ")]
    assert [line[:9] for line in lines] == [
        "[1,    10",
        "[1,    20",
        "[1,    30",
        "[1,    40",
        "[1,    50",
    ]
    assert all(re.fullmatch(r"\[1, +\d+\] loss: \d\.\d{3}", line) for line in lines)
    assert common.parse_args("", lenet_cpu.CONFIGS, [], log_interval=2000).log_interval == 2000
