"""Long runs survive Ctrl-C (--resume) and divergence (the NaN guard)."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.optim as optim

import common
import lenet_cpu
from conftest import ROOT


def history(folder):
    return json.loads((folder / "results.json").read_text())["history"]


def test_ctrl_c_then_resume_matches_an_uninterrupted_run(data_dir, tmp_path):
    arguments = ["--data-dir", str(data_dir), "--epochs", "30", "--log-interval", "0"]
    assert lenet_cpu.main([*arguments, "--out-dir", str(tmp_path / "straight")]) == 0

    command = [sys.executable, "lenet_cpu.py", *arguments, "--out-dir", str(tmp_path / "interrupted")]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = tmp_path / "interrupted" / "run_001" / "config_1"
    deadline = time.monotonic() + 120
    while not ((folder / "results.json").exists() and len(history(folder)) >= 2):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Traceback" not in stderr
    message = stderr.strip().splitlines()
    assert len(message) == 1 and "continue with: python lenet_cpu.py" in message[0] and message[0].endswith("--resume")
    interrupted = json.loads((folder / "results.json").read_text())
    finished = len(interrupted["history"])
    assert interrupted["status"] == "interrupted" and 2 <= finished < 30

    resumed = subprocess.run([*command, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after epoch {finished}" in resumed.stdout
    straight = tmp_path / "straight" / "run_001" / "config_1"
    assert [e["epoch"] for e in history(folder)] == list(range(1, 31))
    strip = [{k: v for k, v in e.items() if k != "seconds"} for e in history(straight)]
    assert [{k: v for k, v in e.items() if k != "seconds"} for e in history(folder)] == strip
    final, reference = torch.load(folder / "model.pth"), torch.load(straight / "model.pth")
    assert all(torch.equal(final[key], reference[key]) for key in reference)


def test_resume_skips_finished_configs_and_refuses_changed_ones(data_dir, tmp_path, capsys):
    arguments = ["--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--epochs", "1"]
    assert lenet_cpu.main(arguments) == 0
    before = (tmp_path / "run_001" / "config_1" / "model.pth").read_bytes()
    assert lenet_cpu.main([*arguments, "--resume"]) == 0
    assert "config_1: already completed" in capsys.readouterr().out
    assert (tmp_path / "run_001" / "config_1" / "model.pth").read_bytes() == before
    assert not (tmp_path / "run_002").exists()
    with pytest.raises(common.ExperimentError, match="was run with"):
        lenet_cpu.main([*arguments, "--resume", "--lr", "0.5"])


def test_resume_without_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(common.ExperimentError, match="no run to continue"):
        common.Run("x.py", common.parse_args("", [dict(num_epochs=1)], ["--out-dir", str(tmp_path), "--resume"]))


def test_diverging_config_is_marked_and_the_next_one_runs(data_dir, tmp_path, capsys):
    configs = [dict(num_epochs=3, lr=1e6, momentum=0.9, batch_size=8),
               dict(num_epochs=1, lr=0.001, momentum=0.9, batch_size=8)]
    run = common.Run("x.py", common.parse_args("", configs, ["--data-dir", str(data_dir), "--out-dir", str(tmp_path)]))
    data = run.load_data()
    test_batches = run.batches(data.test, 100)
    trained_epochs = []
    for name, config in run.configs(configs):
        model = run.place(lenet_cpu.Net())
        optimizer = optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"])
        train_batches = run.batches(data.train, config["batch_size"], train=True)
        record = run.record(name, config, model, optimizer)
        for epoch in record.epochs():
            trained_epochs.append((name, epoch))
            loss, accuracy = common.train_one_epoch(model, train_batches, optimizer, torch.nn.CrossEntropyLoss())
            record.add_epoch(loss, accuracy, 0.1, test_accuracy=common.evaluate(model, test_batches))
        record.finish()
    assert run.finish() == 1
    assert trained_epochs == [("config_1", 0), ("config_2", 0)]  # no epoch after the divergence
    error = capsys.readouterr().err
    assert "config_1 diverged: the training loss is nan in epoch 1; try a lower learning rate than 1000000.0" in error
    run_dir = tmp_path / "run_001"
    diverged = json.loads((run_dir / "config_1" / "results.json").read_text())
    assert diverged["status"] == "diverged" and len(diverged["history"]) == 1
    assert json.loads((run_dir / "config_2" / "results.json").read_text())["status"] == "completed"
