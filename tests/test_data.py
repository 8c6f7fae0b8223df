"""Reading CIFAR-10 safely, the batches, the validation split."""

import pickle
import shutil
import urllib.error

import numpy as np
import pytest
import torch
import torchvision.datasets.utils

import common
from conftest import assert_one_error_line, run_script


def test_loads_the_original_pickle_layout_from_either_folder(data_dir):
    data = common.load_cifar10(data_dir)
    assert data.train.images.shape == (200, 3, 32, 32) and data.train.images.dtype == torch.uint8
    assert data.test.images.shape == (100, 3, 32, 32) and data.train.labels.dtype == torch.int64
    inner = common.load_cifar10(data_dir / "cifar-10-batches-py")
    assert torch.equal(inner.test.images, data.test.images)


def test_reads_the_original_python_2_pickles(tmp_path):
    """The official files are protocol-2 pickles with bytes keys naming numpy.core's rebuilder."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    labels = [3, 7] * 10
    for name in common.FILES:
        data = np.full((20, 3072), 9, dtype=np.uint8)
        payload = pickle.dumps({b"batch_label": b"x", b"labels": labels, b"data": data}, protocol=2)
        (folder / name).write_bytes(payload.replace(b"numpy._core", b"numpy.core"))
    data = common.load_cifar10(tmp_path)
    assert data.train.labels.tolist() == labels * 5 and int(data.test.images[0, 0, 0, 0]) == 9


class RunsCode:
    """A pickle that would run a shell command when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (__import__("os").system, (f"touch {self.marker}",))


def rewritten(data_dir, tmp_path, name, batch):
    """A copy of the tiny data with batch file `name` holding `batch` (a pickle, or bytes)."""
    folder = shutil.copytree(data_dir / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")
    if batch is None:
        (folder / name).unlink()
    else:
        (folder / name).write_bytes(batch if isinstance(batch, bytes) else pickle.dumps(batch))
    return tmp_path


def tiny_batch(data_dir, **changes):
    return {**pickle.loads((data_dir / "cifar-10-batches-py" / "data_batch_4").read_bytes()),
            **changes}


DAMAGED = {
    "labels not numbers": (dict(labels=["cat"] * 40), "40 labels of type <U3"),
    "labels not a list": (dict(labels=[None] * 40), "labels of type object"),
    "a label out of range": (dict(labels=[10] + [0] * 39), "labels of type int64 from 0 to 10"),
    "a label short": (dict(labels=[0] * 39), "40 images of uint8 .*39 labels"),
    "images not CIFAR-10's": (dict(data=np.zeros((40, 100), np.uint8)), r"uint8 \(100,\)"),
}


@pytest.mark.parametrize("damage", DAMAGED)
def test_a_batch_not_in_cifar10s_layout_is_named_with_what_it_holds(damage, data_dir, tmp_path):
    changes, fact = DAMAGED[damage]
    folder = rewritten(data_dir, tmp_path, "data_batch_4", tiny_batch(data_dir, **changes))
    with pytest.raises(common.ExperimentError, match=f"cannot read .*data_batch_4 .*{fact}"):
        common.load_cifar10(folder)


@pytest.mark.parametrize("batch, message", [
    (b"\x80\x04cut short", "cannot read CIFAR-10 file .*data_batch_4"),
    (None, "data_batch_4 is missing"),
])
def test_a_missing_or_truncated_batch_is_one_line(batch, message, data_dir, tmp_path):
    with pytest.raises(common.ExperimentError, match=message):
        common.load_cifar10(rewritten(data_dir, tmp_path, "data_batch_4", batch))


def test_a_pickle_that_would_run_code_is_refused_before_it_runs(data_dir, tmp_path):
    marker = tmp_path / "ran"
    folder = rewritten(data_dir, tmp_path, "data_batch_2", {"data": RunsCode(marker)})
    with pytest.raises(common.ExperimentError, match="data_batch_2 .*asks for .*system"):
        common.load_cifar10(folder)
    assert not marker.exists()


def test_a_file_given_as_the_data_folder_is_named_as_such(tmp_path):
    (tmp_path / "cifar.bin").write_bytes(b"x")
    with pytest.raises(common.ExperimentError, match="is a file"):
        common.load_cifar10(tmp_path / "cifar.bin")


def test_a_damaged_archive_is_named_not_downloaded_again(tmp_path, monkeypatch):
    def download(*args, **kwargs):
        raise AssertionError("no download: the archive is there")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", download)
    (tmp_path / common.ARCHIVE).write_bytes(b"not a tar.gz")
    with pytest.raises(common.ExperimentError, match="cifar-10-python.tar.gz is damaged"):
        common.load_cifar10(tmp_path)


def test_a_failed_download_says_where_to_put_the_data(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    with pytest.raises(common.ExperimentError) as error:
        common.load_cifar10(tmp_path / "data")
    for fact in ("cifar-10-python.tar.gz", str(tmp_path / "data"), "--data-dir"):
        assert fact in str(error.value)


@pytest.mark.slow
def test_a_script_offline_without_data_ends_with_one_line_and_makes_no_folder(tmp_path):
    # a proxy on a closed local port makes the download fail at once, as it does offline
    proxy = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    out = tmp_path / "out"
    completed = run_script("lenet_cpu.py", "--data-dir", tmp_path / "none", "--out-dir", out,
                           env=proxy)
    assert_one_error_line(completed)
    assert completed.stderr.startswith("error: could not download CIFAR-10") and not out.exists()


@pytest.mark.slow
def test_a_data_dir_in_a_symlink_loop_is_one_line(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert_one_error_line(run_script("lenet_cpu.py", "--data-dir", tmp_path / "loop"))


def indexed_split(count):
    """Image i is filled with the value i, so batches reveal which images they hold."""
    images = torch.arange(count, dtype=torch.uint8).view(-1, 1, 1, 1).expand(count, 3, 32, 32)
    return common.Split(images.contiguous(), torch.arange(count) % 10)


def image_indices(batches):
    return [round(v) for x, _ in batches for v in (x[:, 0, 0, 0] * 255).tolist()]


def test_training_batches_shuffle_every_epoch_and_repeat_with_the_seed():
    batches = common.Batches(indexed_split(100), 8, "cpu", (0, 0, 0), (1, 1, 1), seed=3)
    first = image_indices(batches.epoch(0))
    # every image once, the last batch short (as the report's DataLoaders): 13 steps
    assert sorted(first) == list(range(100)) and batches.steps == 13
    second = image_indices(batches.epoch(1))
    again = common.Batches(indexed_split(100), 8, "cpu", (0, 0, 0), (1, 1, 1), seed=3)
    assert second != first and image_indices(again.epoch(1)) == second
    assert image_indices(again.epoch(0)) == first


def test_evaluation_batches_keep_order_and_every_image():
    batches = common.Batches(indexed_split(100), 32, "cpu", (0, 0, 0), (1, 1, 1))
    assert image_indices(batches) == list(range(100))


def test_normalization_is_the_tutorials():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    split = common.Split(images, torch.arange(64))
    ((images, labels),) = list(common.Batches(split, 64, "cpu", (0.5,) * 3, (0.5,) * 3))
    assert torch.allclose(images, (split.images.float() / 255 - 0.5) / 0.5, atol=1e-6)


def test_evaluating_a_model_in_training_mode_is_refused():
    batches = common.Batches(indexed_split(4), 4, "cpu", (0,) * 3, (1,) * 3)
    with pytest.raises(RuntimeError, match="model.eval"):
        common.evaluate(torch.nn.Linear(2, 2), batches)


def test_a_validation_split_holds_out_the_last_training_images():
    train, validation = common.hold_out(indexed_split(100), 0.1)
    assert train.labels.tolist() == (torch.arange(90) % 10).tolist()
    assert len(validation.labels) == 10 and int(validation.images[0, 0, 0, 0]) == 90
    assert common.hold_out(indexed_split(10), None)[1] is None
    with pytest.raises(common.ExperimentError, match="leaves 0 of 1"):
        common.hold_out(indexed_split(1), 0.9)
