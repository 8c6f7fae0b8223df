"""--resume continues exactly the run it names, refuses anything else in one line and changes
nothing then; nothing is written through a link, and no file runs code."""

import json
import pickle
import shutil

import pytest
import torch

import common
import dropout_regularization
import l2_regularization
import lenet_cpu
import lenet_multigpu
from conftest import (assert_one_error_line, epoch_figures, files_in, on_cpu, results, run_script,
                      start_script, torch_settings_kept, wait_for_epochs, write_cifar10)
from test_data import RunsCode


def rewrite_results(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def replace_checkpoint(path, **changes):
    torch.save({**torch.load(path, weights_only=True), **changes}, path)


def test_a_resumed_run_ends_as_an_uninterrupted_one(interrupted, data_dir, tmp_path, capsys):
    arguments, folder = interrupted
    assert not (tmp_path / "latest").exists()  # latest names complete runs only
    assert lenet_cpu.main(arguments) == 0
    assert "config_1: resuming after epoch 1" in capsys.readouterr().out
    assert lenet_cpu.main(on_cpu(data_dir, tmp_path / "b", "--epochs", "2")) == 0
    straight = tmp_path / "b" / "run_001" / "config_1"
    assert epoch_figures(results(folder)["history"]) == epoch_figures(results(straight)["history"])
    final, reference = (torch.load(f / "model.pth") for f in (folder, straight))
    assert all(torch.equal(final[key], reference[key]) for key in reference)
    assert (tmp_path / "latest").read_text() == "run_001\n"
    # both processes' epochs, the time between them apart
    walls = [entry["wall_seconds"] for entry in results(folder)["history"]]
    assert results(folder)["wall_seconds"] == sum(walls)


@pytest.mark.slow
def test_a_stop_between_the_checkpoint_and_results_json_loses_no_epoch(interrupted, capsys):
    """results.json lags the checkpoint by its last epoch: that epoch's figures come from the
    checkpoint, without its save and wall seconds, so the config's wall time is not recorded."""
    arguments, folder = interrupted
    rewrite_results(folder / "results.json", history=[])
    assert lenet_cpu.main(arguments) == 0
    assert "config_1: resuming after epoch 1" in capsys.readouterr().out
    assert len(results(folder)["history"]) == 2 and results(folder)["wall_seconds"] is None


def test_a_finished_run_resumed_changes_nothing_and_says_so(data_dir, tmp_path, capsys):
    """--resume of a finished run once rewrote its summary.json: the recorded wall time lost."""
    arguments = on_cpu(data_dir, tmp_path, "--epochs", "1")
    assert lenet_cpu.main(arguments) == 0
    before = files_in(tmp_path)
    assert lenet_cpu.main([*arguments, "--resume", "run_001"]) == 0
    output = capsys.readouterr().out
    assert "config_1: already completed" in output and "nothing changed" in output
    assert files_in(tmp_path) == before
    with pytest.raises(common.ExperimentError, match="no unfinished run of lenet_cpu.py .*1 fin"):
        lenet_cpu.main([*arguments, "--resume"])  # a habit no longer picks the finished run


@pytest.mark.slow
def test_resume_adds_configs_counting_only_the_epochs_still_to_train(data_dir, tmp_path):
    first = on_cpu(data_dir, tmp_path, "--configs", "1", "--epochs", "2")
    assert l2_regularization.main(first) == 0
    argv = on_cpu(data_dir, tmp_path, "--configs", "2", "1", "--epochs", "2", "--resume", "run_001")
    run = common.Run("l2_regularization.py", common.parse_args("", l2_regularization.CONFIGS, argv),
                     (0.5,) * 3, (0.5,) * 3)
    list(run.configs(l2_regularization.CONFIGS))
    assert run.epochs_left() == 2  # config 2's; config 1 is completed
    run.finish()  # its lock let go
    assert l2_regularization.main(argv) == 0
    summary = json.loads((tmp_path / "run_001" / "summary.json").read_text())
    assert [entry["name"] for entry in summary["configs"]] == ["config_1", "config_2"]
    assert summary["resumed"] is True  # its wall time is the resumed process's


@pytest.mark.slow
def test_bare_resume_takes_the_newest_unfinished_run_of_its_script(interrupted, data_dir, tmp_path,
                                                                    capsys):
    arguments, folder = interrupted
    assert lenet_cpu.main(on_cpu(data_dir, tmp_path, "--epochs", "1")) == 0  # run_002, complete
    assert dropout_regularization.main(on_cpu(data_dir, tmp_path, "--dry-run")) == 0  # run_003
    before = files_in(tmp_path / "run_002")
    assert lenet_cpu.main(arguments) == 0
    assert f"resuming {tmp_path / 'run_001'}: the newest unfinished run" in capsys.readouterr().out
    assert results(folder)["status"] == "completed" and files_in(tmp_path / "run_002") == before


@pytest.mark.parametrize("change, setting", [
    (["--seed", "2"], "seed"), (["--subset", "150"], "subset"), (["--data-dir", "OTHER"], "data"),
    (["--threads", "2"], "cpu_threads"), (["--lr", "0.5"], "config"), (["--dry-run"], "config"),
])
def test_resume_with_other_settings_is_refused_naming_the_difference(change, setting, interrupted,
                                                                       tmp_path):
    """Other --threads once resumed to other weights (CPU kernels sum in another order)."""
    arguments, folder = interrupted
    other = write_cifar10(tmp_path / "other" / "cifar-10-batches-py", seed=5).parent
    change = [str(other) if value == "OTHER" else value for value in change]
    before = files_in(folder.parent)
    with pytest.raises(common.ExperimentError, match=f"trained with {setting} "):
        lenet_cpu.main([*arguments, *change])
    assert files_in(folder.parent) == before


def test_resume_notices_other_images_with_the_same_labels(interrupted, data_dir, tmp_path):
    arguments, folder = interrupted
    other = write_cifar10(tmp_path / "other" / "cifar-10-batches-py")
    batch = pickle.loads((other / "data_batch_3").read_bytes())
    batch["data"][0, :100] ^= 1  # one image, a little changed; every label kept
    (other / "data_batch_3").write_bytes(pickle.dumps(batch))
    arguments[arguments.index(str(data_dir))] = str(other.parent)
    with pytest.raises(common.ExperimentError, match="trained with data .*images_crc32"):
        lenet_cpu.main(arguments)


def without_key(path, key):
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != key}))


CHECKPOINT_CHANGES = {
    "checkpoint of another config": (dict(config={"lr": 1}), "it is of config"),
    "checkpoint of another model": (dict(model=torch.nn.Linear(2, 2).state_dict()), "not fit"),
    "checkpoint without history": (dict(history=None), "history does not list"),
    "checkpoint history short": (dict(history=[]), "history does not list epochs 1-1"),
    "checkpoint epoch a string": (dict(epoch="1"), "its epoch is '1'"),
    "checkpoint epoch too high": (dict(epoch=99), "its epoch is 99"),
    "checkpoint epoch negative": (dict(epoch=-3), "its epoch is -3"),
}
DAMAGES = {
    name: (lambda folder, changes=changes: replace_checkpoint(folder / "checkpoint.pt", **changes),
           message)
    for name, (changes, message) in CHECKPOINT_CHANGES.items()
} | {
    "checkpoint cut short": (lambda folder: (folder / "checkpoint.pt").write_bytes(b"PK\x03"),
                             "checkpoint.pt: it is damaged"),
    "checkpoint that runs code": (
        lambda folder: torch.save({"x": RunsCode(folder / "ran")}, folder / "checkpoint.pt"),
        "checkpoint.pt: it holds more than tensors"),
    "checkpoint missing": (lambda folder: (folder / "checkpoint.pt").unlink(), "it is missing"),
    "results cut short": (lambda folder: (folder / "results.json").write_text('{"na'),
                          "results.json: it is damaged"),
    "results not a run's": (lambda folder: (folder / "results.json").write_text("[1, 2]"),
                            "results.json: it is damaged"),
    "results without a key": (lambda folder: without_key(folder / "results.json", "train_seconds"),
                              "train_seconds"),
    "environment a list": (lambda folder: rewrite_results(folder / "results.json", environment=[]),
                           "environment or config"),
    "results missing": (lambda folder: (folder / "results.json").unlink(), "has no results.json"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_run_files_stop_resume_with_one_line_and_change_nothing(damage, interrupted,
                                                                         tmp_path):
    """Several of these once ended in a traceback; a checkpoint of epoch -3 trained and saved 43
    extra epochs over the files first."""
    arguments, folder = interrupted
    make_damage, message = DAMAGES[damage]
    make_damage(folder)
    before = files_in(tmp_path)
    with pytest.raises(common.ExperimentError, match=message) as error:
        lenet_cpu.main(arguments)
    assert f"cannot resume {folder.parent}" in str(error.value)
    assert f"delete {folder}" in str(error.value)
    assert files_in(tmp_path) == before and not (folder / "ran").exists()


@pytest.mark.slow
def test_damaged_results_from_the_command_line_end_with_one_line(interrupted):
    arguments, folder = interrupted
    (folder / "results.json").write_text('{"na')
    completed = run_script("lenet_cpu.py", *arguments)
    assert_one_error_line(completed)
    assert completed.stderr.startswith("error: cannot resume ")
    assert "results.json: it is damaged" in completed.stderr


@pytest.mark.slow
def test_a_completed_config_without_its_weights_is_a_clear_error(data_dir, tmp_path):
    arguments = on_cpu(data_dir, tmp_path, "--epochs", "1")
    assert lenet_cpu.main(arguments) == 0
    (tmp_path / "run_001" / "config_1" / "model.pth").unlink()
    with pytest.raises(common.ExperimentError, match="model.pth: it is missing"):
        lenet_cpu.main([*arguments, "--resume", "run_001"])


@pytest.fixture(scope="module")
def runs_and_others(tmp_path_factory, data_dir):
    """out/ with a run of lenet_cpu.py, a run of another script, a link to a run and a folder
    without run.json (older code's); beside it, someone's folder."""
    root = tmp_path_factory.mktemp("others")
    out = root / "out"
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "notes.txt").write_text("someone's files")
    with torch_settings_kept():
        assert lenet_cpu.main(on_cpu(data_dir, out, "--epochs", "1")) == 0
        argv = on_cpu(data_dir, root / "d", "--dry-run", "--configs", "2")
        assert dropout_regularization.main(argv) == 0
    (root / "d" / "run_001").rename(out / "dropout_run")
    (out / "linked_run").symlink_to(out / "run_001")
    (out / "older_run").mkdir()
    return root


@pytest.mark.parametrize("target, message", [
    ("elsewhere", "not a run folder"), ("../elsewhere", "not a run folder"), ("out", "not a run"),
    ("run_009", "no run folder; the runs of lenet_cpu.py in .*: run_001"),
    ("dropout_run", "a run of dropout_regularization.py, not of lenet_cpu.py"),
    ("linked_run", "a link"), ("older_run", "not a run folder of this version"),
])
def test_resume_refuses_what_is_not_a_run_of_its_script_and_writes_nothing(
        target, message, runs_and_others, data_dir, tmp_path, monkeypatch):
    """--resume /tmp once wrote config_1/ and summary.json there; --resume of the out-dir itself
    overwrote it, and a run of another script took a config of this one."""
    shutil.copytree(runs_and_others, tmp_path, dirs_exist_ok=True, symlinks=True)
    out = tmp_path / "out"
    (out / "linked_run").unlink()
    (out / "linked_run").symlink_to(out / "run_001")
    before = files_in(tmp_path)
    monkeypatch.chdir(out)
    named = target if target.startswith("..") or "run" in target else str(tmp_path / target)
    with pytest.raises(common.ExperimentError, match=message):
        lenet_cpu.main([*on_cpu(data_dir, out, "--epochs", "1"), "--resume", named])
    assert files_in(tmp_path) == before


def test_a_config_folder_that_is_a_link_is_neither_read_nor_written(interrupted, tmp_path):
    """A link planted as config_1 once had the checkpoint, results and pictures written into its
    target, over someone's model.pth."""
    arguments, folder = interrupted
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "model.pth").write_text("PRECIOUS")
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    folder.symlink_to(victim)
    with pytest.raises(common.ExperimentError, match="config_1: it is a link"):
        lenet_cpu.main(arguments)
    assert [p.name for p in victim.iterdir()] == ["model.pth"]


def test_a_planted_lock_link_is_refused_and_its_target_untouched(interrupted, tmp_path):
    arguments, folder = interrupted
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (folder.parent / ".lock").unlink()
    (folder.parent / ".lock").symlink_to(victim)
    with pytest.raises(common.ExperimentError, match="cannot lock"):
        lenet_cpu.main(arguments)
    assert victim.read_text() == "precious"


@pytest.mark.slow
def test_a_file_replaced_by_a_link_is_replaced_not_written_through(interrupted, tmp_path):
    arguments, folder = interrupted
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (folder / "curves.png").unlink()
    (folder / "curves.png").symlink_to(victim)
    assert lenet_cpu.main(arguments) == 0
    assert victim.read_text() == "precious" and not (folder / "curves.png").is_symlink()


@pytest.mark.slow
def test_a_run_in_use_is_refused_naming_its_process(data_dir, tmp_path):
    arguments = on_cpu(data_dir, tmp_path, "--epochs", "60", "--log-interval", "0")
    process = start_script("lenet_cpu.py", *arguments)
    try:
        wait_for_epochs(process, tmp_path / "run_001" / "config_1", 1)
        message = f"run_001 is in use by process {process.pid}"
        with pytest.raises(common.ExperimentError, match=message):
            lenet_cpu.main([*arguments, "--resume"])
    finally:
        process.kill()
        process.communicate(timeout=60)


@pytest.mark.slow
def test_checkpoints_load_onto_the_cpu_whatever_the_training_device(interrupted, monkeypatch):
    """A load that does not ask for the CPU puts every tensor on the meta device, as a GPU
    stand-in; checkpoints hold no random state a resume on fewer GPUs could miss."""
    arguments, folder = interrupted
    load = torch.load

    def meta_unless_cpu(path, map_location=None, **options):
        return load(path, map_location=map_location if map_location == "cpu" else "meta", **options)

    monkeypatch.setattr(torch, "load", meta_unless_cpu)
    assert lenet_cpu.main(arguments) == 0
    keys = sorted(load(folder / "checkpoint.pt", weights_only=True))
    assert keys == ["config", "epoch", "history", "model", "optimizer"]


@pytest.mark.slow
def test_weights_that_would_run_code_are_refused_by_evaluate(data_dir, tmp_path):
    torch.save({"conv1.weight": RunsCode(tmp_path / "ran")}, tmp_path / "model.pth")
    completed = run_script("lenet_cpu.py", "--evaluate", tmp_path / "model.pth", "--data-dir",
                           data_dir)
    assert_one_error_line(completed)
    assert f"{tmp_path / 'model.pth'}: it holds more than" in completed.stderr
    assert not (tmp_path / "ran").exists()
