"""--resume writes only into a run of the same script on the same data, files are never written
through planted links, and every fault ends with one line (all on the CPU, on tiny data)."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import common
import dropout_regularization
import lenet_cpu
from conftest import ROOT, interrupt_after_epochs, on_cpu, run_script
from test_interruptions import interrupted_run, wait_for_epochs
from test_reliability import full_disk_on_the_nth


def files_in(folder):
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def run_lenet_cpu_until_interrupted(monkeypatch, capsys, arguments, epochs=1):
    """lenet_cpu.main(arguments) stopped as by Ctrl-C after `epochs` epochs: its exit status and
    stderr."""
    interrupt_after_epochs(monkeypatch, epochs)
    with pytest.raises(SystemExit) as exit:
        common.run_main(lambda: lenet_cpu.main(arguments))
    monkeypatch.undo()
    return exit.value.code, capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# 1-4: what --resume accepts


@pytest.mark.parametrize("target", ["elsewhere", "../elsewhere", "out"])
def test_resume_refuses_a_folder_that_is_not_a_run_and_writes_nothing(
    target, data_dir, tmp_path, monkeypatch
):
    """--resume /tmp once wrote config_1/ and summary.json there; --resume of the out-dir itself
    overwrote it."""
    out = tmp_path / "out"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "notes.txt").write_text("someone's files")
    arguments = on_cpu(data_dir, out, "--epochs", "1")
    assert lenet_cpu.main(arguments) == 0
    before = files_in(tmp_path)
    monkeypatch.chdir(out)
    with pytest.raises(common.ExperimentError, match="is not a run folder"):
        lenet_cpu.main(
            [*arguments, "--resume", str(tmp_path / target) if target != "../elsewhere" else target]
        )
    assert files_in(tmp_path) == before


def test_the_printed_resume_command_names_the_run_it_saved(data_dir, tmp_path, monkeypatch, capsys):
    """After --out-dir X --resume /Y/run_001 the line once said --resume run_001: X's run, not
    Y's."""
    elsewhere = tmp_path / "elsewhere"
    arguments = ["--device", "cpu", "--data-dir", str(data_dir), "--epochs", "3"]
    run_lenet_cpu_until_interrupted(monkeypatch, capsys, [*arguments, "--out-dir", str(elsewhere)])
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "lenet_cpu.py",
            *arguments,
            "--out-dir",
            str(tmp_path / "x"),
            "--resume",
            str(elsewhere / "run_001"),
        ],
    )
    status, stderr = run_lenet_cpu_until_interrupted(monkeypatch, capsys, sys.argv[1:], epochs=2)
    assert status == 130 and stderr.strip().endswith(f"--resume {elsewhere / 'run_001'}"), stderr
    assert not (tmp_path / "x").exists() or not list((tmp_path / "x").glob("run_*"))


def test_resume_notices_other_images_with_the_same_labels(data_dir, tmp_path):
    arguments, folder = interrupted_run(data_dir, tmp_path)
    other = tmp_path / "other" / "cifar-10-batches-py"
    other.mkdir(parents=True)
    for path in (data_dir / "cifar-10-batches-py").iterdir():
        (other / path.name).write_bytes(path.read_bytes())
    batch = pickle.loads((other / "data_batch_3").read_bytes())
    batch["data"][0, :100] ^= 1  # one image, a little changed; every label kept
    (other / "data_batch_3").write_bytes(pickle.dumps(batch))
    arguments[arguments.index(str(data_dir))] = str(other.parent)
    with pytest.raises(common.ExperimentError, match="it was trained with data .*images_crc32"):
        lenet_cpu.main(arguments)


@pytest.mark.slow
def test_resume_refuses_a_run_of_another_script(data_dir, tmp_path):
    """lenet_cpu.py --resume into a dropout run once added its config_1 to it."""
    common_arguments = on_cpu(data_dir, tmp_path, "--epochs", "1")
    assert dropout_regularization.main([*common_arguments, "--configs", "2"]) == 0
    before = files_in(tmp_path)
    with pytest.raises(
        common.ExperimentError, match="is a run of dropout_regularization.py, not of lenet_cpu.py"
    ):
        lenet_cpu.main([*common_arguments, "--resume", "run_001"])
    with pytest.raises(common.ExperimentError, match="no run of lenet_cpu.py to continue"):
        lenet_cpu.main([*common_arguments, "--resume"])
    assert files_in(tmp_path) == before


# ----------------------------------------------------------------------------------------------
# 5: a full disk after the last epoch


@pytest.mark.parametrize("name", ["model.pth", "curves.png"])
@pytest.mark.slow
def test_a_full_disk_after_the_last_epoch_prints_the_resume_line_and_resume_finishes(
    name, data_dir, tmp_path, monkeypatch, capsys
):
    arguments = on_cpu(data_dir, tmp_path, "--epochs", "2")
    full_disk_on_the_nth(monkeypatch, name, 1)
    with pytest.raises(SystemExit) as exit:
        common.run_main(lambda: lenet_cpu.main(arguments))
    monkeypatch.undo()
    error, resume = capsys.readouterr().err.strip().splitlines()
    folder = tmp_path / "run_001" / "config_1"
    assert exit.value.code == 1 and "No space left on device" in error and name in error
    assert "config_1 at epoch 2/2" in resume and resume.endswith("--resume run_001")
    assert json.loads((folder / "results.json").read_text())["status"] != "completed"
    assert lenet_cpu.main([*arguments, "--resume", "run_001"]) == 0
    assert json.loads((folder / "results.json").read_text())["status"] == "completed"
    assert {"model.pth", "curves.png", "confusion.png"} <= {path.name for path in folder.iterdir()}


# ----------------------------------------------------------------------------------------------
# 6: one line, never a traceback


def assert_one_error_line(completed):
    assert completed.returncode == 1 and "Traceback" not in completed.stderr, completed.stderr
    assert completed.stderr.startswith("error: ") and completed.stderr.count("\n") == 1, (
        completed.stderr
    )


@pytest.mark.slow
def test_a_data_dir_in_a_symlink_loop_is_one_line(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert_one_error_line(
        run_script("lenet_cpu.py", "--data-dir", tmp_path / "loop", "--out-dir", tmp_path / "o")
    )


@pytest.mark.slow
def test_a_bad_matplotlib_backend_is_one_line_before_any_training(data_dir, tmp_path):
    completed = run_script(
        "lenet_cpu.py", *on_cpu(data_dir, tmp_path, "--epochs", "1"), env={"MPLBACKEND": "nonsense"}
    )
    assert_one_error_line(completed)
    assert "MPLBACKEND" in completed.stderr and not list(tmp_path.glob("run_*"))


@pytest.mark.slow
def test_a_results_file_lacking_a_key_is_one_line_on_resume(data_dir, tmp_path):
    arguments = on_cpu(data_dir, tmp_path, "--epochs", "1")
    assert dropout_regularization.main([*arguments, "--configs", "1", "2"]) == 0
    results_file = tmp_path / "run_001" / "config_1" / "results.json"
    results = json.loads(results_file.read_text())
    del results["train_seconds"]
    results_file.write_text(json.dumps(results))
    completed = run_script(
        "dropout_regularization.py", *arguments, "--configs", "2", "--resume", "run_001"
    )
    assert_one_error_line(completed)
    assert "train_seconds" in completed.stderr


@pytest.mark.slow
def test_compile_without_a_compiler_is_one_line_and_leaves_no_run_folder(data_dir, tmp_path):
    empty = tmp_path / "bin"  # a PATH with no compiler on it
    empty.mkdir()
    completed = run_script(
        "lenet_cpu.py",
        *on_cpu(data_dir, tmp_path / "o", "--compile", "--epochs", "1"),
        env={"PATH": str(empty), "CXX": "", "CC": ""},
    )
    assert_one_error_line(completed)
    assert "C++ compiler" in completed.stderr and not list((tmp_path / "o").glob("run_*"))


@pytest.mark.slow
def test_an_ascii_terminal_and_a_non_ascii_out_dir(data_dir, tmp_path):
    completed = run_script(
        "lenet_cpu.py",
        *on_cpu(data_dir, tmp_path / "résultats", "--epochs", "1"),
        env={"PYTHONIOENCODING": "ascii"},
    )
    assert completed.returncode == 0 and "Traceback" not in completed.stderr, completed.stderr
    assert (tmp_path / "résultats" / "run_001" / "summary.json").exists()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see torch loading")
def test_ctrl_c_while_torch_loads_is_one_line(data_dir, tmp_path):
    process = subprocess.Popen(
        [sys.executable, "lenet_cpu.py", "--data-dir", str(data_dir), "--out-dir", str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    maps = Path(f"/proc/{process.pid}/maps")
    deadline = time.monotonic() + 60
    # common.py imports torch
    while "libtorch" not in maps.read_text() and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert (
        stderr.startswith("interrupted")
        and "nothing was saved" in stderr
        and stderr.count("\n") == 1
    )


@pytest.mark.slow
def test_an_argument_error_is_one_line_without_the_usage_block():
    completed = run_script("lenet_cpu.py", "--seed", "-1")
    assert completed.returncode == 2 and completed.stderr.count("\n") == 1
    assert completed.stderr.startswith("lenet_cpu.py: error: argument --seed")


# ----------------------------------------------------------------------------------------------
# 7: planted links


def test_a_planted_lock_link_is_refused_and_its_target_untouched(data_dir, tmp_path):
    arguments, folder = interrupted_run(data_dir, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    lock = folder.parent / ".lock"
    lock.unlink()
    lock.symlink_to(victim)
    with pytest.raises(common.ExperimentError, match="cannot lock"):
        lenet_cpu.main(arguments)
    assert victim.read_text() == "precious"


@pytest.mark.slow
def test_a_link_planted_at_the_old_temporary_name_is_not_written_through(data_dir, tmp_path):
    arguments, folder = interrupted_run(data_dir, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("checkpoint.pt", "results.json", "model.pth"):
        (folder / f".{name}.{os.getpid()}.tmp").symlink_to(victim)
    assert lenet_cpu.main(arguments) == 0
    assert victim.read_text() == "precious"


# ----------------------------------------------------------------------------------------------
# 8: smaller


def test_ctrl_c_during_a_write_leaves_no_temporary_file(data_dir, tmp_path, monkeypatch):
    write_bytes = common._write_bytes

    def interrupted_midway(descriptor, temporary, data):
        if ".model.pth." in temporary:
            write_bytes(descriptor, temporary, data[: len(data) // 2])
            raise KeyboardInterrupt
        write_bytes(descriptor, temporary, data)

    monkeypatch.setattr(common, "_write_bytes", interrupted_midway)
    with pytest.raises(SystemExit):
        common.run_main(lambda: lenet_cpu.main(on_cpu(data_dir, tmp_path, "--epochs", "1")))
    assert not [path for path in tmp_path.rglob("*") if path.name.endswith(".tmp")]


def test_a_run_stopped_before_its_first_epoch_leaves_no_folder(
    data_dir, tmp_path, monkeypatch, capsys
):
    """bare --resume once picked the empty run_NNN such a run left."""

    def stop_at_the_first_step(meter, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(common.EpochMeter, "add", stop_at_the_first_step)
    with pytest.raises(SystemExit) as exit:
        common.run_main(lambda: lenet_cpu.main(on_cpu(data_dir, tmp_path, "--epochs", "1")))
    assert exit.value.code == 130 and "nothing was saved" in capsys.readouterr().err
    assert not list(tmp_path.glob("run_*"))


@pytest.mark.slow
def test_resuming_an_old_completed_run_leaves_latest_at_the_newest(data_dir, tmp_path):
    arguments = on_cpu(data_dir, tmp_path, "--epochs", "1")
    assert lenet_cpu.main(arguments) == 0
    assert lenet_cpu.main(arguments) == 0
    assert lenet_cpu.main([*arguments, "--resume", "run_001"]) == 0
    assert (tmp_path / "latest").read_text().strip() == "run_002"


@pytest.mark.slow
def test_sighup_stops_the_run_like_sigterm(data_dir, tmp_path):
    """A closed terminal or a dropped ssh connection once left the status `running` without a
    word."""
    process = subprocess.Popen(
        [
            sys.executable,
            "lenet_cpu.py",
            *on_cpu(data_dir, tmp_path, "--epochs", "60", "--log-interval", "0"),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    folder = tmp_path / "run_001" / "config_1"
    wait_for_epochs(process, folder, 1)
    process.send_signal(signal.SIGHUP)
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode == 129 and stderr.startswith("interrupted; saved in"), stderr
    assert json.loads((folder / "results.json").read_text())["status"] == "interrupted"


def test_a_loss_that_blows_up_without_becoming_nan_is_divergence(
    data_dir, tmp_path, monkeypatch, capsys
):
    """lr 10 once ended `completed` at chance accuracy with a training loss of 1.4e18."""
    monkeypatch.setattr(common.EpochMeter, "add", blown_up_add(common.EpochMeter.add))
    status = lenet_cpu.main(on_cpu(data_dir, tmp_path, "--epochs", "3"))
    results = json.loads((tmp_path / "run_001" / "config_1" / "results.json").read_text())
    assert status == 1 and results["status"] == "diverged" and len(results["history"]) == 1
    assert "diverged: the training loss is 1.4e+18 in epoch 1" in capsys.readouterr().err


def blown_up_add(add):
    """EpochMeter.add with every step's loss replaced by a finite 1.4e18."""

    def add_blown_up_loss(meter, loss, outputs, labels):
        add(meter, loss.detach() * 0 + 1.4e18, outputs, labels)

    return add_blown_up_loss
