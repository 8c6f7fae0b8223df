"""The shared helpers: reading CIFAR-10 safely, batches, the command line, run folders."""

import json
import pickle
import shutil
import urllib.error

import numpy as np
import pytest
import torch

import common
from conftest import new_run, run_script


def test_loads_the_original_pickle_layout(data_dir):
    data = common.load_cifar10(data_dir)
    assert data.train.images.shape == (200, 3, 32, 32) and data.train.images.dtype == torch.uint8
    assert data.test.images.shape == (100, 3, 32, 32)
    assert (
        data.train.labels.dtype == torch.int64
        and 0 <= data.train.labels.min() <= data.train.labels.max() <= 9
    )
    inner = common.load_cifar10(data_dir / "cifar-10-batches-py")
    assert torch.equal(inner.test.images, data.test.images)


def test_reads_the_original_python_2_pickles(tmp_path):
    """The official files are protocol-2 pickles with bytes keys that name numpy.core's array
    rebuilder."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    labels = [3, 7] * 10
    for name in common.FILES:
        data = np.full((20, 3072), 9, dtype=np.uint8)
        payload = pickle.dumps({b"batch_label": b"x", b"labels": labels, b"data": data}, protocol=2)
        (folder / name).write_bytes(
            payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        )
    data = common.load_cifar10(tmp_path)
    assert data.train.labels.tolist() == labels * 5 and int(data.test.images[0, 0, 0, 0]) == 9


def copy_of(data_dir, tmp_path):
    return shutil.copytree(data_dir / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")


class RunsCode:
    """A pickle that would run a shell command when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (__import__("os").system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_before_it_runs(data_dir, tmp_path):
    folder = copy_of(data_dir, tmp_path)
    marker = tmp_path / "ran"
    with open(folder / "data_batch_2", "wb") as file:
        pickle.dump({"data": RunsCode(marker), "labels": [0]}, file)
    with pytest.raises(common.ExperimentError, match="data_batch_2 .*asks for .*system"):
        common.load_cifar10(tmp_path)
    assert not marker.exists()


def rewrite_batch(folder, name, **changes):
    with open(folder / name, "rb") as file:
        batch = pickle.load(file)
    with open(folder / name, "wb") as file:
        pickle.dump({**batch, **changes}, file)


@pytest.mark.parametrize(
    "labels, fact",
    [
        (["cat"] * 40, "labels of type <U3"),
        ([None] * 40, "labels of type object"),
        ([10] + [0] * 39, "a label is 10, outside 0-9"),
        ([0] * 39, "39 labels .* for 40 images"),
    ],
)
def test_labels_that_are_not_cifar10s_are_named(labels, fact, data_dir, tmp_path):
    folder = copy_of(data_dir, tmp_path)
    rewrite_batch(folder, "data_batch_4", labels=labels)
    with pytest.raises(
        common.ExperimentError, match=f"data_batch_4 is not a CIFAR-10 batch: .*{fact}"
    ):
        common.load_cifar10(tmp_path)


def test_truncated_batch_is_a_clear_error(data_dir, tmp_path):
    folder = copy_of(data_dir, tmp_path)
    content = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(content[: len(content) // 2])
    with pytest.raises(common.ExperimentError, match="cannot read CIFAR-10 file .*data_batch_3"):
        common.load_cifar10(tmp_path)


def test_malformed_batch_is_a_clear_error(data_dir, tmp_path):
    folder = copy_of(data_dir, tmp_path)
    with open(folder / "test_batch", "wb") as file:
        pickle.dump({b"data": np.zeros((5, 100), dtype=np.uint8), b"labels": [0] * 5}, file)
    with pytest.raises(common.ExperimentError, match="test_batch is not a CIFAR-10 batch"):
        common.load_cifar10(tmp_path)


def test_missing_batch_is_a_clear_error(data_dir, tmp_path):
    folder = copy_of(data_dir, tmp_path)
    (folder / "data_batch_5").unlink()
    with pytest.raises(common.ExperimentError, match="data_batch_5 is missing"):
        common.load_cifar10(tmp_path)


def test_a_file_given_as_the_data_folder_is_named_as_such(tmp_path):
    (tmp_path / "cifar.bin").write_bytes(b"x")
    with pytest.raises(common.ExperimentError, match="is a file"):
        common.load_cifar10(tmp_path / "cifar.bin")


def test_a_damaged_archive_is_named_not_downloaded_again(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    def download(*args, **kwargs):
        raise AssertionError("no download: the archive is there")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", download)
    (tmp_path / common.ARCHIVE).write_bytes(b"not a tar.gz")
    with pytest.raises(common.ExperimentError, match="cifar-10-python.tar.gz is damaged"):
        common.load_cifar10(tmp_path)


def test_failed_download_says_where_to_put_the_data(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    with pytest.raises(common.ExperimentError) as error:
        common.load_cifar10(tmp_path / "data")
    assert "cifar-10-python.tar.gz" in str(error.value) and str(tmp_path / "data") in str(
        error.value
    )
    assert "--data-dir" in str(error.value)


@pytest.mark.slow
def test_script_offline_without_data_ends_with_one_line(tmp_path):
    # a proxy on a closed local port makes the download fail at once, as it does offline
    proxy = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    completed = run_script(
        "lenet_cpu.py", "--data-dir", tmp_path / "none", "--out-dir", tmp_path / "out", env=proxy
    )
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not download CIFAR-10")
    assert not list((tmp_path / "out").glob("run_*"))  # no empty run folder is left behind


def indexed_split(count):
    """Image i is filled with the value i, so batches reveal which images they hold."""
    images = (
        torch.arange(count, dtype=torch.uint8)
        .view(-1, 1, 1, 1)
        .expand(count, 3, 32, 32)
        .contiguous()
    )
    return common.Split(images, torch.arange(count) % 10)


def image_indices(batches):
    return [round(v) for x, _ in batches for v in (x[:, 0, 0, 0] * 255).tolist()]


def test_training_batches_shuffle_every_epoch_and_repeat_with_the_seed():
    batches = common.Batches(indexed_split(100), 8, "cpu", (0, 0, 0), (1, 1, 1), seed=3)
    first = image_indices(batches.epoch(0))
    # every image once, the last batch short (as the report's DataLoaders): 13 steps
    assert sorted(first) == list(range(100)) and batches.steps == 13
    second = image_indices(batches.epoch(1))
    assert second != first
    again = common.Batches(indexed_split(100), 8, "cpu", (0, 0, 0), (1, 1, 1), seed=3)
    assert image_indices(again.epoch(1)) == second and image_indices(again.epoch(0)) == first


def test_evaluation_batches_keep_order_and_every_image():
    assert image_indices(
        common.Batches(indexed_split(100), 32, "cpu", (0, 0, 0), (1, 1, 1))
    ) == list(range(100))


def test_normalization_is_the_tutorials():
    split = common.Split(
        torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), torch.arange(64) % 10
    )
    ((images, labels),) = list(common.Batches(split, 64, "cpu", (0.5,) * 3, (0.5,) * 3))
    assert torch.allclose(
        images, (split.images.float() / 255 - 0.5) / 0.5, atol=1e-6
    ) and labels.shape == (64,)


def test_evaluating_a_model_in_training_mode_is_refused():
    with pytest.raises(RuntimeError, match="model.eval"):
        common.evaluate(
            torch.nn.Linear(2, 2), common.Batches(indexed_split(4), 4, "cpu", (0,) * 3, (1,) * 3)
        )


CONFIGS = [
    dict(num_epochs=1, lr=0.1, momentum=0.9, batch_size=4),
    dict(num_epochs=2, lr=0.2, momentum=0.9, batch_size=4),
]


def test_unknown_config_number_is_an_error_listing_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as exit:
        common.parse_args("test", CONFIGS, ["--configs", "3"])
    assert exit.value.code == 2
    assert "invalid choice: 3 (choose from 1, 2)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--seed", "-1"], "--seed"),
        (["--seed", "4294967296"], "--seed"),
        (["--momentum", "-1"], "--momentum"),
        (["--momentum", "2"], "--momentum"),
        (["--momentum", "nan"], "--momentum"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--lr", "0"], "--lr"),
        (["--epochs", "0"], "--epochs"),
        (["--batch-size", "-4"], "--batch-size"),
        (["--subset", "x"], "--subset"),
        (["--log-interval", "-1"], "--log-interval"),
        (["--configs", "1", "1"], "--configs"),
        (["--out-dir", ""], "--out-dir"),
        (["--data-dir", ""], "--data-dir"),
    ],
)
def test_bad_values_are_refused_with_argparses_line(argv, option, capsys):
    with pytest.raises(SystemExit) as exit:
        common.parse_args("test", CONFIGS, argv)
    error = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and "error: argument " + option in error[-1]


def run_of(tmp_path, *argv):
    return new_run("x.py", common.parse_args("test", CONFIGS, ["--out-dir", str(tmp_path), *argv]))


def test_overrides_apply_to_the_chosen_configs(tmp_path):
    run = run_of(tmp_path, "--configs", "2", "--epochs", "7", "--lr", "0.5")
    assert list(run.configs(CONFIGS)) == [
        ("config_2", dict(num_epochs=7, lr=0.5, momentum=0.9, batch_size=4))
    ]
    assert run.changed == ["epochs", "lr"]


def test_list_configs(capsys):
    with pytest.raises(SystemExit) as exit:
        common.parse_args("test", CONFIGS, ["--list-configs"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.splitlines()[1] == f"config_2: {CONFIGS[1]}"


def test_help_shows_each_default_once_and_no_none(capsys):
    with pytest.raises(SystemExit):
        common.parse_args("test", CONFIGS, ["--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: False)" not in text
    assert (
        text.count("(default: all)") == 1 and "(default: ./data)" in text and "(default: 1)" in text
    )
    assert "--evaluate" in text and "--resume [RUN]" in text


@pytest.mark.slow
def test_unwritable_output_folder_is_one_line_naming_it(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    completed = run_script("lenet_cpu.py", "--out-dir", tmp_path / "file" / "out")
    assert completed.returncode == 1 and "Traceback" not in completed.stderr
    assert completed.stderr.count("\n") == 1 and str(tmp_path / "file") in completed.stderr


def test_each_run_gets_a_new_folder_and_other_files_are_not_runs(tmp_path):
    (tmp_path / "run_009").write_text("a file, not a run folder")
    folders = [run_of(tmp_path).new_run_dir() for _ in range(2)]
    assert [f.name for f in folders] == ["run_001", "run_002"]


def test_one_gpu_or_the_cpu_trains_without_data_parallel(tmp_path):
    assert run_of(tmp_path, "--device", "cpu").gpu_count == 1


def test_results_files_are_strict_json(tmp_path):
    with pytest.raises(ValueError):  # NaN is no JSON: results store null instead
        common.write_json(tmp_path / "x.json", {"loss": float("nan")})
    assert not list(tmp_path.iterdir())  # neither the file nor its temporary
    common.write_json(tmp_path / "x.json", {"loss": None})
    assert json.loads((tmp_path / "x.json").read_text()) == {"loss": None}


def test_threads_come_from_the_flag_then_the_environment_then_the_script(tmp_path, monkeypatch):
    """A LeNet script's default of one thread gives way to OMP_NUM_THREADS, and both to --threads
    (cpu)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert common.parse_args("", CONFIGS, [], threads=1).threads == 1
    assert common.parse_args("", CONFIGS, ["--threads", "2"], threads=1).threads == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    # torch reads the variable itself
    assert common.parse_args("", CONFIGS, [], threads=1).threads is None
    torch.set_num_threads(2)
    run_of(tmp_path, "--device", "cpu", "--threads", "1")
    assert torch.get_num_threads() == 1
