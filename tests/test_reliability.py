"""Nothing runs code from a file, --resume continues exactly the run it names, and faults end with
one line."""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import lenet_cpu
import lenet_multigpu
from conftest import ROOT, interrupt_after_epochs, on_cpu, run_script, write_cifar10
from test_common import RunsCode
from test_interruptions import interrupted_run, wait_for_epochs


def test_a_checkpoint_that_would_run_code_is_refused_before_it_runs(data_dir, tmp_path):
    arguments, folder = interrupted_run(data_dir, tmp_path)
    marker = tmp_path / "ran"
    torch.save({"config": {}, "payload": RunsCode(marker)}, folder / "checkpoint.pt")
    with pytest.raises(
        common.ExperimentError, match="checkpoint.pt: it holds more than tensors and plain data"
    ):
        lenet_cpu.main(arguments)
    assert not marker.exists()


@pytest.mark.slow
def test_weights_that_would_run_code_are_refused_by_evaluate(data_dir, tmp_path):
    marker = tmp_path / "ran"
    torch.save({"conv1.weight": RunsCode(marker)}, tmp_path / "model.pth")
    completed = run_script(
        "lenet_cpu.py", "--evaluate", tmp_path / "model.pth", "--data-dir", data_dir
    )
    assert completed.returncode == 1 and "Traceback" not in completed.stderr and not marker.exists()
    assert completed.stderr.startswith(
        f"error: --evaluate {tmp_path / 'model.pth'}: it holds more than"
    )


@pytest.mark.slow
def test_resume_continues_the_interrupted_run_after_another_one(
    data_dir, tmp_path, monkeypatch, capsys
):
    arguments = on_cpu(data_dir, tmp_path, "--configs", "4", "--epochs", "4")
    interrupt_after_epochs(monkeypatch, 2)
    with pytest.raises(SystemExit):
        common.run_main(lambda: lenet_multigpu.main(arguments))
    assert capsys.readouterr().err.strip().endswith("--resume run_001")
    monkeypatch.undo()
    assert (
        lenet_multigpu.main(on_cpu(data_dir, tmp_path, "--configs", "7", "--epochs", "1")) == 0
    )  # another run in between: run_002
    before = {
        path: path.read_bytes() for path in (tmp_path / "run_002").rglob("*") if path.is_file()
    }
    assert lenet_multigpu.main([*arguments, "--resume"]) == 0
    output = capsys.readouterr().out
    assert f"resuming {tmp_path / 'run_001'}: the newest unfinished run" in output
    assert "config_4: resuming after epoch 2" in output
    results = json.loads((tmp_path / "run_001" / "config_4" / "results.json").read_text())
    assert results["status"] == "completed" and [e["epoch"] for e in results["history"]] == [
        1,
        2,
        3,
        4,
    ]
    assert {
        path: path.read_bytes() for path in (tmp_path / "run_002").rglob("*") if path.is_file()
    } == before


def test_resume_of_a_run_that_is_not_there_names_the_runs_that_are(data_dir, tmp_path):
    arguments = on_cpu(data_dir, tmp_path, "--epochs", "1")
    assert lenet_cpu.main(arguments) == 0
    (tmp_path / "run_009").write_text("a file, not a run")
    with pytest.raises(
        common.ExperimentError,
        match="--resume run_009: no run folder .*run_009; the runs of lenet_cpu.py in .*: run_001",
    ):
        lenet_cpu.main([*arguments, "--resume", "run_009"])


@pytest.mark.parametrize(
    "change, setting",
    [(["--seed", "2"], "seed"), (["--subset", "150"], "subset"), (["--data-dir", "OTHER"], "data")],
)
def test_resume_with_other_settings_is_refused_naming_the_difference(
    change, setting, data_dir, tmp_path
):
    arguments, folder = interrupted_run(data_dir, tmp_path)
    other = write_cifar10(tmp_path / "other" / "cifar-10-batches-py", seed=5).parent
    change = [str(other) if value == "OTHER" else value for value in change]
    before = (folder / "results.json").read_bytes()
    with pytest.raises(
        common.ExperimentError, match=f"results.json: it was trained with {setting} "
    ):
        lenet_cpu.main([*arguments, *change])
    assert (folder / "results.json").read_bytes() == before


@pytest.mark.slow
def test_summary_lists_every_config_the_run_folder_holds(data_dir, tmp_path):
    arguments = on_cpu(data_dir, tmp_path, "--epochs", "1")
    assert lenet_multigpu.main([*arguments, "--configs", "5", "7"]) == 0
    assert lenet_multigpu.main([*arguments, "--configs", "5", "--resume"]) == 0
    summary = json.loads((tmp_path / "run_001" / "summary.json").read_text())
    assert [entry["name"] for entry in summary["configs"]] == ["config_5", "config_7"]
    assert summary["resumed"] is True  # its wall time is the resumed process's


@pytest.mark.slow
def test_a_run_in_use_is_refused_naming_its_process(data_dir, tmp_path):
    command = [
        sys.executable,
        "lenet_cpu.py",
        *on_cpu(data_dir, tmp_path, "--epochs", "60", "--log-interval", "0"),
    ]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for_epochs(process, tmp_path / "run_001" / "config_1", 1)
        with pytest.raises(
            common.ExperimentError, match=f"run_001 is in use by process {process.pid}"
        ):
            lenet_cpu.main([*on_cpu(data_dir, tmp_path, "--epochs", "60", "--resume")])
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)


@pytest.mark.slow
def test_a_closed_output_stops_the_run_as_an_interruption(data_dir, tmp_path):
    command = [
        sys.executable,
        "lenet_cpu.py",
        *on_cpu(data_dir, tmp_path, "--epochs", "60", "--log-interval", "0"),
    ]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for _ in range(4):  # as `| head -4` does
        process.stdout.readline()
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 141 and "Traceback" not in stderr, stderr
    assert (
        stderr.startswith("interrupted: the output was closed; saved in")
        and stderr.count("\n") == 1
    )
    results = json.loads((tmp_path / "run_001" / "config_1" / "results.json").read_text())
    assert results["status"] == "interrupted" and stderr.strip().endswith("--resume run_001")


def test_a_full_disk_ends_with_the_file_its_cause_and_the_resume_line(
    data_dir, tmp_path, monkeypatch, capsys
):
    full_disk_on_the_nth(monkeypatch, "checkpoint.pt", 2)
    with pytest.raises(SystemExit) as exit:
        common.run_main(lambda: lenet_cpu.main(on_cpu(data_dir, tmp_path, "--epochs", "3")))
    error, resume = capsys.readouterr().err.strip().splitlines()
    folder = tmp_path / "run_001" / "config_1"
    assert (
        exit.value.code == 1
        and error == f"error: cannot write {folder / 'checkpoint.pt'} (No space left on device)"
    )
    assert "config_1 at epoch 1/3" in resume and resume.endswith("--resume run_001")
    monkeypatch.undo()
    # the last good one, intact
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not [path for path in folder.iterdir() if path.name.endswith(".tmp")]


def full_disk_on_the_nth(monkeypatch, name, nth):
    """The nth write of a file called `name` fails as on a full disk, after writing part of it."""
    write_bytes = common._write_bytes
    writes = []

    def fill_the_disk(descriptor, temporary, data):
        writes.append(Path(temporary).name)
        if (
            writes[-1].startswith(f".{name}.")
            and sum(w.startswith(f".{name}.") for w in writes) == nth
        ):
            write_bytes(descriptor, temporary, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write_bytes(descriptor, temporary, data)

    monkeypatch.setattr(common, "_write_bytes", fill_the_disk)


@pytest.mark.slow
def test_a_path_too_long_for_the_file_system_is_one_line(data_dir, tmp_path):
    completed = run_script(
        "lenet_cpu.py", *on_cpu(data_dir, tmp_path / ("x" * 300), "--epochs", "1")
    )
    assert completed.returncode == 1 and "Traceback" not in completed.stderr
    assert completed.stderr.startswith("error: ") and completed.stderr.count("\n") == 1


@pytest.mark.slow
def test_a_folder_named_latest_is_reported_after_the_run_is_saved(data_dir, tmp_path):
    (tmp_path / "latest").mkdir()
    completed = run_script("lenet_cpu.py", *on_cpu(data_dir, tmp_path, "--epochs", "1"))
    assert completed.returncode == 1 and "Traceback" not in completed.stderr
    assert completed.stderr.count("\n") == 1 and str(tmp_path / "latest") in completed.stderr
    assert "Is a directory" in completed.stderr
    assert (
        json.loads((tmp_path / "run_001" / "config_1" / "results.json").read_text())["status"]
        == "completed"
    )
