"""Long runs survive Ctrl-C and SIGTERM (--resume), damaged run files and divergence (the NaN
guard)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.optim as optim

import common
import l2_regularization
import lenet_cpu
from conftest import ROOT, epoch_figures, new_run, on_cpu


def history(folder):
    return json.loads((folder / "results.json").read_text())["history"]


def wait_for_epochs(process, folder, count):
    deadline = time.monotonic() + 120
    while not ((folder / "results.json").exists() and len(history(folder)) >= count):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("signal_number, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.slow
def test_interrupt_then_resume_matches_an_uninterrupted_run(
    signal_number, status, data_dir, tmp_path
):
    """Ctrl-C and SIGTERM (kill, job schedulers) alike: epochs saved, one resume line, same
    result."""
    # 60 short epochs: seconds of training after the signal's trigger, so it lands inside an epoch
    # and not in the final evaluation and pictures (tested on their own below)
    arguments = [
        "--device",
        "cpu",
        "--data-dir",
        str(data_dir),
        "--epochs",
        "60",
        "--log-interval",
        "0",
    ]
    assert lenet_cpu.main([*arguments, "--out-dir", str(tmp_path / "straight")]) == 0

    command = [
        sys.executable,
        "lenet_cpu.py",
        *arguments,
        "--out-dir",
        str(tmp_path / "interrupted"),
    ]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    folder = tmp_path / "interrupted" / "run_001" / "config_1"
    wait_for_epochs(process, folder, 2)
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == status
    assert "Traceback" not in stderr
    message = stderr.strip().splitlines()
    assert len(message) == 1 and "continue with: python lenet_cpu.py" in message[0]
    assert message[0].endswith("--resume run_001")  # names the run it continues
    interrupted = json.loads((folder / "results.json").read_text())
    finished = len(interrupted["history"])
    assert interrupted["status"] == "interrupted" and 2 <= finished < 60

    assert not (tmp_path / "interrupted" / "latest").exists()  # latest names complete runs only
    resumed = subprocess.run(
        [*command, "--resume", "run_001"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after epoch {finished}" in resumed.stdout
    straight = tmp_path / "straight" / "run_001" / "config_1"
    assert [e["epoch"] for e in history(folder)] == list(range(1, 61))
    assert (tmp_path / "interrupted" / "latest").read_text().strip() == "run_001"
    assert epoch_figures(history(folder)) == epoch_figures(history(straight))
    final = torch.load(folder / "model.pth")
    reference = torch.load(straight / "model.pth")
    assert all(torch.equal(final[key], reference[key]) for key in reference)
    # the wall time of both processes' epochs, the time between them apart
    results = json.loads((folder / "results.json").read_text())
    assert results["wall_seconds"] == sum(entry["wall_seconds"] for entry in history(folder))


def test_a_config_resumed_from_epochs_that_were_not_wall_timed_has_no_wall_time(
    data_dir, tmp_path
):
    """Epochs saved by code from before wall times were recorded: a sum of the others would be
    taken for the whole."""
    arguments, folder = interrupted_run(data_dir, tmp_path)
    checkpoint = torch.load(folder / "checkpoint.pt", weights_only=True)
    untimed = [{k: v for k, v in e.items() if k != "wall_seconds"} for e in checkpoint["history"]]
    replace_checkpoint(folder / "checkpoint.pt", history=untimed)
    assert lenet_cpu.main(arguments) == 0  # finishes the config: its final figures
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "completed" and results["wall_seconds"] is None
    assert results["train_seconds"] == results["history"][0]["seconds"]


@pytest.mark.slow
def test_two_quick_ctrl_c_end_with_one_message(data_dir, tmp_path):
    command = [
        sys.executable,
        "lenet_cpu.py",
        *on_cpu(data_dir, tmp_path, "--epochs", "60", "--log-interval", "0"),
    ]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for_epochs(process, tmp_path / "run_001" / "config_1", 2)
    process.send_signal(signal.SIGINT)
    time.sleep(0.15)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.strip().endswith("--resume run_001")


def test_resume_skips_finished_configs_and_refuses_changed_ones(data_dir, tmp_path, capsys):
    arguments = on_cpu(data_dir, tmp_path, "--epochs", "1")
    assert lenet_cpu.main(arguments) == 0
    before = (tmp_path / "run_001" / "config_1" / "model.pth").read_bytes()
    assert lenet_cpu.main([*arguments, "--resume"]) == 0
    assert "config_1: already completed" in capsys.readouterr().out
    assert (tmp_path / "run_001" / "config_1" / "model.pth").read_bytes() == before
    assert not (tmp_path / "run_002").exists()
    with pytest.raises(common.ExperimentError, match="trained with config .* not .*'lr': 0.5"):
        lenet_cpu.main([*arguments, "--resume", "--lr", "0.5"])


def test_a_resumed_run_counts_only_the_epochs_it_has_left(data_dir, tmp_path):
    """On the CPU: the time left leaves out every epoch the run folder holds, even of a completed
    config that --configs names after one still to train."""
    first = on_cpu(data_dir, tmp_path, "--configs", "1", "--epochs", "2")
    assert l2_regularization.main(first) == 0
    arguments = on_cpu(data_dir, tmp_path, "--configs", "2", "1", "--epochs", "2", "--resume")
    parsed = common.parse_args("test", l2_regularization.CONFIGS, arguments)
    run = new_run("l2_regularization.py", parsed)
    list(run.configs(l2_regularization.CONFIGS))
    assert run.epochs_left == 2  # config 2's; config 1 is completed


def test_resume_without_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(common.ExperimentError, match="no run of .* to continue"):
        args = common.parse_args("", [dict(num_epochs=1)], ["--out-dir", str(tmp_path), "--resume"])
        new_run("x.py", args)


def test_diverging_config_is_marked_and_the_next_one_runs(data_dir, tmp_path, capsys):
    configs = [
        dict(num_epochs=3, lr=1e6, momentum=0.9, batch_size=8),
        dict(num_epochs=1, lr=0.001, momentum=0.9, batch_size=8),
    ]
    args = common.parse_args(
        "", configs, ["--device", "cpu", "--data-dir", str(data_dir), "--out-dir", str(tmp_path)]
    )
    run = new_run("x.py", args)
    data = run.load_data()
    test_batches = run.batches(data.test, 100)
    trained_epochs = []
    for name, config in run.configs(configs):
        model = lenet_cpu.Net()
        optimizer = optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"])
        train_batches = run.batches(data.train, config["batch_size"], train=True)
        record = common.Record(run, name, config)
        for epoch in range(record.resume(model, optimizer), config["num_epochs"]):
            trained_epochs.append((name, epoch))
            meter = record.meter(epoch, train_batches.steps)
            lenet_cpu.train(
                model, train_batches.epoch(epoch), torch.nn.CrossEntropyLoss(), optimizer, meter
            )
            if not record.add_epoch(
                meter, 0.1, test_accuracy=common.evaluate(model.eval(), test_batches)
            ):
                break
        if record.status == "running":
            record.finish(test_batches)
    assert run.finish() == 1
    assert trained_epochs == [("config_1", 0), ("config_2", 0)]  # no epoch after the divergence
    error = capsys.readouterr().err
    # the facts: which config, that it diverged, where, and the lr to lower
    assert "config_1 diverged" in error and "nan in epoch 1" in error and "1000000.0" in error
    run_dir = tmp_path / "run_001"

    def no_nan(text):
        raise ValueError(f"{text} is not JSON")

    diverged = json.loads(
        (run_dir / "config_1" / "results.json").read_text(), parse_constant=no_nan
    )
    assert diverged["status"] == "diverged" and diverged["history"][0]["train_loss"] is None
    assert json.loads((run_dir / "config_2" / "results.json").read_text())["status"] == "completed"


def test_ctrl_c_after_the_last_epoch_says_what_is_saved(data_dir, tmp_path, monkeypatch, capsys):
    arguments = on_cpu(data_dir, tmp_path, "--epochs", "1")

    def interrupted_summary(result):
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "summary_line", interrupted_summary)
    with pytest.raises(SystemExit) as exit:
        common.run_main(lambda: lenet_cpu.main(arguments))
    assert exit.value.code == 130
    message = capsys.readouterr().err.strip()
    assert (
        "nothing was saved" not in message
        and f"saved in {tmp_path / 'run_001'}: config_1 completed" in message
    )
    assert message.endswith("--resume run_001")
    monkeypatch.undo()
    assert lenet_cpu.main([*arguments, "--resume"]) == 0
    assert "config_1: already completed" in capsys.readouterr().out


@pytest.mark.slow
def test_ctrl_c_in_the_final_evaluation_keeps_the_epochs_for_resume(
    data_dir, tmp_path, monkeypatch, capsys
):
    import resnet18

    arguments = on_cpu(
        data_dir,
        tmp_path,
        "--configs",
        "5",
        "--subset",
        "64",
        "--epochs",
        "1",
        "--batch-size",
        "32",
    )

    def interrupted_tta(model, batches):
        raise KeyboardInterrupt

    monkeypatch.setattr(resnet18, "flip_tta_accuracy", interrupted_tta)
    with pytest.raises(SystemExit) as exit:
        common.run_main(lambda: resnet18.main(arguments))
    assert exit.value.code == 130
    assert "config_5 at epoch 1/1" in capsys.readouterr().err
    folder = tmp_path / "run_001" / "config_5"
    assert json.loads((folder / "results.json").read_text())["status"] == "interrupted"
    monkeypatch.undo()
    assert resnet18.main([*arguments, "--resume"]) == 0
    assert "config_5: resuming after epoch 1" in capsys.readouterr().out
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "completed" and len(results["history"]) == 1
    assert "flip_tta_test_accuracy" in results["extra"]


def interrupted_run(data_dir, tmp_path):
    """A finished one-epoch lenet_cpu run made to look interrupted after its epoch: its arguments
    and folder."""
    arguments = on_cpu(data_dir, tmp_path, "--epochs", "1")
    assert lenet_cpu.main(arguments) == 0
    folder = tmp_path / "run_001" / "config_1"
    results = json.loads((folder / "results.json").read_text())
    results["status"] = "interrupted"
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "model.pth").unlink()
    (folder.parent / "summary.json").unlink()
    return [*arguments, "--resume"], folder


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def replace_checkpoint(path, **changes):
    state = torch.load(path, weights_only=True)
    torch.save({**state, **changes}, path)


DAMAGES = {
    "checkpoint cut short": (
        lambda folder: truncate(folder / "checkpoint.pt"),
        "checkpoint.pt: it is damaged",
    ),
    "results cut short": (
        lambda folder: truncate(folder / "results.json"),
        "results.json: it is damaged",
    ),
    "results not a run's": (
        lambda folder: (folder / "results.json").write_text("[1, 2]"),
        "results.json: it is damaged",
    ),
    "checkpoint of another config": (
        lambda folder: replace_checkpoint(folder / "checkpoint.pt", config={"lr": 1}),
        "checkpoint.pt: it does not fit .*it is of config",
    ),
    "checkpoint of another model": (
        lambda folder: replace_checkpoint(
            folder / "checkpoint.pt", model=torch.nn.Linear(2, 2).state_dict()
        ),
        "checkpoint.pt: it does not fit this model",
    ),
    "checkpoint missing": (
        lambda folder: (folder / "checkpoint.pt").unlink(),
        "checkpoint.pt: it is missing",
    ),
    "results missing": (
        lambda folder: (folder / "results.json").unlink(),
        "has no results.json beside it",
    ),
}


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.slow
def test_damaged_run_files_stop_resume_with_one_line_and_change_nothing(damage, data_dir, tmp_path):
    arguments, folder = interrupted_run(data_dir, tmp_path)
    make_damage, message = DAMAGES[damage]
    make_damage(folder)
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    with pytest.raises(common.ExperimentError, match=message) as error:
        lenet_cpu.main(arguments)
    assert f"cannot resume {folder.parent}" in str(error.value) and f"delete {folder}" in str(
        error.value
    )
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before


@pytest.mark.slow
def test_completed_config_without_its_weights_is_a_clear_error(data_dir, tmp_path):
    arguments = on_cpu(data_dir, tmp_path, "--epochs", "1")
    assert lenet_cpu.main(arguments) == 0
    (tmp_path / "run_001" / "config_1" / "model.pth").unlink()
    with pytest.raises(common.ExperimentError, match="model.pth: it is missing"):
        lenet_cpu.main([*arguments, "--resume"])


@pytest.mark.slow
def test_results_of_another_script_are_refused(data_dir, tmp_path):
    arguments, folder = interrupted_run(data_dir, tmp_path)
    results = json.loads((folder / "results.json").read_text())
    (folder / "results.json").write_text(json.dumps({**results, "script": "resnet18.py"}))
    with pytest.raises(
        common.ExperimentError,
        match=r"no run of lenet_cpu.py .*\(run_001 is a run of resnet18.py\)",
    ):
        lenet_cpu.main(arguments)


@pytest.mark.slow
def test_damaged_results_from_the_command_line_end_with_one_line(data_dir, tmp_path):
    arguments, folder = interrupted_run(data_dir, tmp_path)
    truncate(folder / "results.json")
    completed = subprocess.run(
        [sys.executable, "lenet_cpu.py", *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 1 and "Traceback" not in completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("error: cannot resume ")
        and "results.json: it is damaged" in lines[0]
    )


def signal_then_wait(signal_number):
    """A main() that sends its own process `signal_number`, then waits half a second."""

    def main():
        os.kill(os.getpid(), signal_number)
        time.sleep(0.5)  # the handler runs at once; an ignored signal lets the wait end normally
        return 0

    return main


@pytest.mark.parametrize("signal_number", common.STOPPING_SIGNALS)
def test_a_stopping_signal_is_handled_like_ctrl_c_unless_it_was_ignored(signal_number, capsys):
    """SIGTERM (kill) and SIGHUP (a closed terminal); a run started under nohup, SIGHUP ignored,
    goes on when its terminal closes."""
    before = signal.getsignal(signal_number)  # as the tests' fixtures left it
    signal.signal(signal_number, signal.SIG_DFL)  # as a shell starts a program
    try:
        with pytest.raises(SystemExit) as exit:
            common.run_main(signal_then_wait(signal_number))
        assert exit.value.code == 128 + signal_number
        message = capsys.readouterr().err.strip().splitlines()
        assert len(message) == 1 and "interrupted" in message[0]
        assert "nothing was saved" in message[0]
        # the process's own handler is back
        assert signal.getsignal(signal_number) == signal.SIG_DFL

        signal.signal(signal_number, signal.SIG_IGN)  # as nohup, or a launcher, leaves it
        with pytest.raises(SystemExit) as exit:
            common.run_main(signal_then_wait(signal_number))
        assert exit.value.code == 0
    finally:
        signal.signal(signal_number, before)
