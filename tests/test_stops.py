"""Long runs survive Ctrl-C, SIGTERM, SIGHUP, a closed output, a full disk and divergence with one
line that says what is saved and how to go on; their clocks count what they say they count."""

import errno
import itertools
import os
import signal
import time

import pytest
import torch

import common
import lenet_cpu
import resnet18
from conftest import (assert_one_error_line, fail_writes, files_in, on_cpu, results, run_script,
                      start_script, stopped, wait_for_epochs)

LONG = ["--epochs", "60", "--log-interval", "0"]  # seconds of training: a signal lands inside it


@pytest.mark.slow
@pytest.mark.parametrize("signal_number, status", [
    (signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_stopping_signal_saves_the_run_and_prints_how_to_resume_it(signal_number, status,
                                                                      data_dir, tmp_path):
    """A closed terminal (SIGHUP) once left the status `running` without a word."""
    process = start_script("lenet_cpu.py", *on_cpu(data_dir, tmp_path, *LONG))
    folder = tmp_path / "run_001" / "config_1"
    wait_for_epochs(process, folder, 2)
    process.send_signal(signal_number)
    if signal_number == signal.SIGINT:  # a second Ctrl-C while saving changes nothing
        time.sleep(0.15)
        process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == status and "Traceback" not in stderr, stderr
    assert stderr.startswith("interrupted; saved in") and stderr.count("\n") == 1
    assert stderr.strip().endswith("--resume run_001")  # names the run it continues
    assert results(folder)["status"] == "interrupted" and 2 <= len(results(folder)["history"]) < 60


@pytest.mark.slow
def test_a_closed_output_stops_the_run_as_an_interruption(data_dir, tmp_path):
    process = start_script("lenet_cpu.py", *on_cpu(data_dir, tmp_path, *LONG))
    for _ in range(4):  # as `| head -4` does
        process.stdout.readline()
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 141 and "Traceback" not in stderr, stderr
    assert stderr.startswith("interrupted: the output was closed; saved in")
    assert results(tmp_path / "run_001" / "config_1")["status"] == "interrupted"


def signal_then_wait(signal_number):
    """A main() that sends its own process `signal_number`, then waits half a second."""

    def main():
        os.kill(os.getpid(), signal_number)
        time.sleep(0.5)  # the handler runs at once; an ignored signal lets the wait end normally
        return 0

    return main


@pytest.mark.parametrize("signal_number", common.STOPPING_SIGNALS)
def test_a_stopping_signal_is_handled_like_ctrl_c_unless_it_was_ignored(signal_number, capsys):
    """A run started under nohup, SIGHUP ignored, goes on when its terminal closes."""
    before = signal.getsignal(signal_number)  # as the tests' fixtures left it
    signal.signal(signal_number, signal.SIG_DFL)  # as a shell starts a program
    try:
        status, stderr = stopped(signal_then_wait(signal_number), capsys)
        assert status == 128 + signal_number and stderr.count("\n") == 1
        assert stderr.startswith("interrupted") and "nothing was saved" in stderr
        assert signal.getsignal(signal_number) == signal.SIG_DFL  # the process's own handler back
        signal.signal(signal_number, signal.SIG_IGN)  # as nohup, or a launcher, leaves it
        assert stopped(signal_then_wait(signal_number), capsys)[0] == 0
    finally:
        signal.signal(signal_number, before)


def test_a_run_stopped_before_its_first_epoch_leaves_no_folder(data_dir, tmp_path, monkeypatch,
                                                               capsys):
    """bare --resume once picked the empty run_NNN such a run left."""

    def stop_at_the_first_step(meter, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(common.EpochMeter, "add", stop_at_the_first_step)
    status, stderr = stopped(lambda: lenet_cpu.main(on_cpu(data_dir, tmp_path)), capsys)
    assert status == 130 and "nothing was saved" in stderr and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_ctrl_c_after_the_last_epoch_says_what_is_saved(data_dir, tmp_path, monkeypatch, capsys):
    arguments = on_cpu(data_dir, tmp_path, "--epochs", "1")

    def interrupted_summary(result):
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "summary_line", interrupted_summary)
    status, stderr = stopped(lambda: lenet_cpu.main(arguments), capsys)
    assert status == 130 and f"saved in {tmp_path / 'run_001'}: config_1 completed" in stderr
    assert stderr.strip().endswith("--resume run_001")


@pytest.mark.slow
def test_ctrl_c_in_the_final_evaluation_keeps_the_epochs_for_resume(data_dir, tmp_path, monkeypatch,
                                                                    capsys):
    arguments = on_cpu(data_dir, tmp_path, "--configs", "5", "--subset", "64", "--epochs", "1",
                       "--batch-size", "32")

    def interrupted_tta(model, batches):
        raise KeyboardInterrupt

    monkeypatch.setattr(resnet18, "flip_tta_accuracy", interrupted_tta)
    status, stderr = stopped(lambda: resnet18.main(arguments), capsys)
    assert status == 130 and "config_5 at epoch 1/1" in stderr
    folder = tmp_path / "run_001" / "config_5"
    assert results(folder)["status"] == "interrupted"
    monkeypatch.undo()
    assert resnet18.main([*arguments, "--resume"]) == 0
    assert "config_5: resuming after epoch 1" in capsys.readouterr().out
    assert results(folder)["status"] == "completed" and len(results(folder)["history"]) == 1
    assert "flip_tta_test_accuracy" in results(folder)["extra"]


FULL_DISK = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.slow
@pytest.mark.parametrize("name, nth, epoch", [
    ("checkpoint.pt", 2, "1/3"), ("results.json", 2, "2/3"), ("model.pth", 1, "3/3"),
    ("curves.png", 1, "3/3"),
])
def test_a_full_disk_names_the_file_and_leaves_the_run_resumable(name, nth, epoch, data_dir,
                                                                 tmp_path, monkeypatch, capsys):
    arguments = on_cpu(data_dir, tmp_path, "--epochs", "3")
    fail_writes(monkeypatch, name, nth, FULL_DISK)
    status, stderr = stopped(lambda: lenet_cpu.main(arguments), capsys)
    monkeypatch.undo()
    error, resume = stderr.strip().splitlines()
    folder = tmp_path / "run_001" / "config_1"
    assert status == 1 and error == f"error: cannot write {folder / name} (No space left on device)"
    assert f"config_1 at epoch {epoch}" in resume and resume.endswith("--resume run_001")
    assert not [path for path in folder.iterdir() if path.name.endswith(".tmp")]
    assert results(folder)["status"] != "completed"
    assert lenet_cpu.main([*arguments, "--resume", "run_001"]) == 0
    assert results(folder)["status"] == "completed" and len(results(folder)["history"]) == 3


def test_ctrl_c_during_a_write_leaves_no_temporary_file(data_dir, tmp_path, monkeypatch, capsys):
    fail_writes(monkeypatch, "model.pth", 1, KeyboardInterrupt())
    assert stopped(lambda: lenet_cpu.main(on_cpu(data_dir, tmp_path, "--epochs", "1")), capsys)[0]
    assert not [path for path in tmp_path.rglob("*") if path.name.endswith(".tmp")]


@pytest.mark.slow
@pytest.mark.parametrize("out_dir, fact", [("x" * 300, "File name too long"), ("latest", "Is a")])
def test_a_path_the_system_refuses_is_one_line_naming_it(out_dir, fact, data_dir, tmp_path):
    """A folder named `latest` is found only once the run is saved, and said so."""
    (tmp_path / "latest").mkdir()
    out = tmp_path / out_dir if out_dir != "latest" else tmp_path
    completed = run_script("lenet_cpu.py", *on_cpu(data_dir, out, "--epochs", "1"))
    assert_one_error_line(completed)
    assert fact in completed.stderr
    if out_dir == "latest":
        assert results(tmp_path / "run_001" / "config_1")["status"] == "completed"


@pytest.mark.slow
def test_an_ascii_terminal_and_a_non_ascii_out_dir(data_dir, tmp_path):
    argv = on_cpu(data_dir, tmp_path / "résultats", "--epochs", "1")
    completed = run_script("lenet_cpu.py", *argv, env={"PYTHONIOENCODING": "ascii"})
    assert completed.returncode == 0 and "Traceback" not in completed.stderr, completed.stderr
    assert (tmp_path / "résultats" / "run_001" / "summary.json").exists()


@pytest.mark.slow
def test_a_diverging_config_is_marked_and_the_next_one_runs(data_dir, tmp_path, monkeypatch,
                                                             capsys):
    tutorial = lenet_cpu.CONFIGS[0]
    configs = [dict(tutorial, num_epochs=3, lr=1e6), dict(tutorial, num_epochs=1)]
    monkeypatch.setattr(lenet_cpu, "CONFIGS", configs)
    assert lenet_cpu.main(on_cpu(data_dir, tmp_path)) == 1
    error = capsys.readouterr().err
    # the facts: which config, that it diverged, where, and the lr to lower
    assert "config_1 diverged" in error and "nan in epoch 1" in error and "1000000.0" in error
    diverged = results(tmp_path / "run_001" / "config_1")
    assert diverged["status"] == "diverged" and len(diverged["history"]) == 1
    assert diverged["history"][0]["train_loss"] is None  # strict JSON: null, not NaN
    assert results(tmp_path / "run_001" / "config_2")["status"] == "completed"


def test_a_loss_that_blows_up_without_becoming_nan_is_divergence(data_dir, tmp_path, monkeypatch,
                                                                  capsys):
    """lr 10 once ended `completed` at chance accuracy with a training loss of 1.4e18."""
    add = common.EpochMeter.add
    monkeypatch.setattr(common.EpochMeter, "add",
                        lambda meter, loss, *rest: add(meter, loss.detach() * 0 + 1.4e18, *rest))
    assert lenet_cpu.main(on_cpu(data_dir, tmp_path, "--epochs", "3")) == 1
    assert results(tmp_path / "run_001" / "config_1")["status"] == "diverged"
    assert "diverged: the training loss is 1.4e+18 in epoch 1" in capsys.readouterr().err


def time_lenet_steps(monkeypatch, seconds_of_call):
    """time.perf_counter stands still except in lenet_cpu.Net's forward, whose n-th call (0-based,
    evaluation's too) moves it by seconds_of_call(n) seconds."""
    now = [0.0]
    calls = itertools.count()
    forward = lenet_cpu.Net.forward

    def timed_forward(model, images):
        now[0] += seconds_of_call(next(calls))
        return forward(model, images)

    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(lenet_cpu.Net, "forward", timed_forward)


def test_the_warm_up_of_the_first_steps_is_timed_apart(data_dir, tmp_path, monkeypatch, capsys):
    """Compilation and cuDNN autotuning happen in a config's first steps: a slow first step stands
    in for them. Evaluation (one forward of 100 test images: 1 s) is timed apart too."""
    time_lenet_steps(monkeypatch, lambda call: 1000.0 if call == 0 else 1.0)
    assert lenet_cpu.main(on_cpu(data_dir, tmp_path, "--epochs", "2")) == 0
    result = results(tmp_path / "run_001" / "config_1")
    first, second = result["history"]
    steps = 200 // 4  # 200 training images, batch 4
    warmup = common.WARMUP_STEPS
    assert first["warmup_seconds"] == 1000 + warmup - 1 and "warmup_seconds" not in second
    assert first["seconds"] == steps - warmup and second["seconds"] == steps
    assert first["eval_seconds"] == second["eval_seconds"] == 1
    assert result["train_seconds"] == first["seconds"] + second["seconds"]
    assert f"(+ {result['warmup_seconds']:.2f} s warm-up)" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("seconds_per_step, estimate", [(1.0, None), (20.0, "33 min 20 s")])
def test_a_long_cpu_run_says_early_how_long_and_how_to_shorten_it(seconds_per_step, estimate,
                                                                   data_dir, tmp_path, monkeypatch,
                                                                   capsys):
    """1000 s for each warm-up step, left out of the estimate; it comes within the first epoch."""
    slow = common.WARMUP_STEPS
    time_lenet_steps(monkeypatch, lambda call: 1000.0 if call < slow else seconds_per_step)
    assert lenet_cpu.main(on_cpu(data_dir, tmp_path, "--epochs", "2")) == 0
    lines = capsys.readouterr().out.splitlines()
    estimates = [line for line in lines if line.startswith("at this pace")]
    assert len(estimates) == (0 if estimate is None else 1)
    if estimate:  # 100 steps, the warm-up's left out, at 20 s a step
        assert estimates[0].endswith(f"takes {estimate}; for a short run, add --subset 10000")
    epochs = [line for line in lines if line.startswith("config_1 epoch")]
    assert len(epochs) == 2 and all(line.endswith("left in the run") for line in epochs)


def test_a_checkpoint_that_cannot_be_saved_takes_its_epoch_back(data_dir, tmp_path, monkeypatch):
    fail_writes(monkeypatch, "checkpoint.pt", 2, FULL_DISK)
    with pytest.raises(common.ExperimentError, match="No space left"):
        lenet_cpu.main(on_cpu(data_dir, tmp_path, "--epochs", "3"))
    folder = tmp_path / "run_001" / "config_1"
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert len(results(folder)["history"]) == 1 and files_in(folder)
