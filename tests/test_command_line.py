"""The command line every script shares, and what Run makes of it before any training."""

import pytest
import torch

import common
from conftest import assert_one_error_line, on_cpu, run_script

CONFIGS = [
    dict(num_epochs=1, lr=0.1, momentum=0.9, batch_size=4),
    dict(num_epochs=2, lr=0.2, momentum=0.9, batch_size=4),
]


def parse(*argv, **defaults):
    return common.parse_args("test", CONFIGS, list(argv), **defaults)


def new_run(tmp_path, *argv, script="x.py", data_parallel=False):
    args = parse("--out-dir", str(tmp_path), *argv)
    return common.Run(script, args, (0.5,) * 3, (0.5,) * 3, data_parallel=data_parallel)


@pytest.mark.parametrize("argv, option", [
    (["--seed", "-1"], "--seed"), (["--seed", "4294967296"], "--seed"),
    (["--momentum", "-1"], "--momentum"), (["--momentum", "2"], "--momentum"),
    (["--momentum", "nan"], "--momentum"), (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"),
    (["--lr", "0"], "--lr"), (["--epochs", "0"], "--epochs"),
    (["--batch-size", "-4"], "--batch-size"),
    (["--subset", "x"], "--subset"), (["--log-interval", "-1"], "--log-interval"),
    (["--configs", "1", "1"], "--configs"), (["--configs", "3"], "--configs"),
    (["--out-dir", ""], "--out-dir"), (["--data-dir", ""], "--data-dir"),
    (["--evaluate", ""], "--evaluate"), (["--val-fraction", "1"], "--val-fraction"),
])
def test_bad_values_are_refused_with_argparses_line(argv, option, capsys):
    """--evaluate "" (an unset $MODEL) once started hours of training."""
    with pytest.raises(SystemExit) as exit:
        parse(*argv)
    error = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(error) == 1 and f"error: argument {option}" in error[0]


@pytest.mark.slow
def test_an_argument_error_is_one_line_without_the_usage_block():
    completed = run_script("lenet_cpu.py", "--seed", "-1")
    assert_one_error_line(completed, status=2)
    assert completed.stderr.startswith("lenet_cpu.py: error: argument --seed")


def test_list_configs_and_help(capsys):
    with pytest.raises(SystemExit) as exit:
        parse("--list-configs")
    assert exit.value.code == 0
    assert capsys.readouterr().out.splitlines()[1] == f"config_2: {CONFIGS[1]}"
    with pytest.raises(SystemExit):
        parse("--help")
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: False)" not in text
    assert text.count("(default: all)") == 1 and "(default: ./data)" in text
    assert "--evaluate" in text and "--resume [RUN]" in text


def test_overrides_apply_to_the_chosen_configs_and_stop_the_comparison(tmp_path):
    run = new_run(tmp_path, "--configs", "2", "--epochs", "7", "--lr", "0.5")
    expected = dict(num_epochs=7, lr=0.5, momentum=0.9, batch_size=4)
    assert list(run.configs(CONFIGS)) == [("config_2", expected)]
    assert run.changed == ["epochs", "lr"]


def test_threads_come_from_the_flag_then_the_environment_then_the_script(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert parse(threads=1).threads == 1 and parse("--threads", "2", threads=1).threads == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert parse(threads=1).threads is None  # torch reads the variable itself


@pytest.mark.parametrize("out_dir", ["file/out", "loop/out"])
def test_an_output_folder_that_cannot_be_made_is_named_before_the_data(out_dir, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(common.ExperimentError, match=f"{tmp_path / out_dir.split('/')[0]} is not"):
        new_run(tmp_path / out_dir)


def test_nothing_is_made_before_a_first_epoch_is_saved(tmp_path):
    """A mistyped --data-dir or a refused --resume once left an empty output folder behind."""
    run = new_run(tmp_path / "new" / "out", "--device", "cpu")
    assert run.gpu_count == 1 and not (tmp_path / "new").exists()
    assert run.folder().name == "run_001" and (run.folder() / "run.json").exists()


def test_each_run_gets_a_new_folder_and_other_files_are_not_runs(tmp_path):
    (tmp_path / "run_009").write_text("a file, not a run folder")
    folders = [new_run(tmp_path).folder() for _ in range(2)]
    assert [f.name for f in folders] == ["run_010", "run_011"]


def test_results_files_are_strict_json_and_leave_no_temporary(tmp_path):
    with pytest.raises(ValueError):  # NaN is no JSON: results store null instead
        common.write_json(tmp_path / "x.json", {"loss": float("nan")})
    common.write_json(tmp_path / "x.json", {"loss": None})
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_files_get_the_permissions_of_an_ordinary_write(tmp_path):
    """mkstemp's 0600 once kept a teammate from reading results.json."""
    common.write_json(tmp_path / "x.json", {})
    (tmp_path / "plain").write_text("")
    assert (tmp_path / "x.json").stat().st_mode == (tmp_path / "plain").stat().st_mode


def simulate_gpus(monkeypatch, count):
    """`count` CUDA GPUs as far as device counting and naming go (the CPU stands in)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: f"GPU {index}")


def test_only_a_data_parallel_script_counts_every_gpu_and_compile_needs_one(tmp_path, monkeypatch):
    """lenet_cpu.py trains on one GPU of four; dynamo cannot reach DataParallel's replicas."""
    simulate_gpus(monkeypatch, 4)
    one = new_run(tmp_path, "--compile", script="lenet_cpu.py")
    assert one.gpu_count == 1 and one.describe == "GPU 0"
    assert new_run(tmp_path, data_parallel=True).gpu_count == 4
    with pytest.raises(common.ExperimentError, match="--compile .*DataParallel"):
        new_run(tmp_path, "--compile", data_parallel=True)


def test_torchrun_is_refused_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(common.ExperimentError, match="start x.py with python, not torchrun"):
        new_run(tmp_path)


def test_the_clock_waits_for_every_gpu(monkeypatch):
    """nn.DataParallel queues work on every GPU: an epoch's time must include the slowest."""
    simulate_gpus(monkeypatch, 3)
    synchronized = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synchronized.append(device))
    common.clock(torch.device("cuda"))
    assert sorted(synchronized) == [0, 1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("env, fact", [
    ({"MPLBACKEND": "nonsense"}, "MPLBACKEND"),
    ({"PATH": "/nonexistent", "CXX": "", "CC": ""}, "C++ compiler"),
])
def test_a_tool_that_cannot_work_is_one_line_before_any_training(env, fact, data_dir, tmp_path):
    completed = run_script("lenet_cpu.py", *on_cpu(data_dir, tmp_path, "--compile"), env=env)
    assert_one_error_line(completed)
    assert fact in completed.stderr and not list(tmp_path.iterdir())


def test_durations_read_as_a_person_would():
    assert [common.duration(s) for s in (45, 725, 7500)] == ["45 s", "12 min 05 s", "2 h 05 min"]
