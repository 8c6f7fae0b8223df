"""The shared mechanics: CIFAR-10 loading and its errors, batches, augmentation, schedules, CLI."""

import pickle
import shutil
import urllib.error

import pytest
import torch

import common
from conftest import run_script, write_cifar10


def test_loads_the_original_pickle_layout(data_dir):
    data = common.load_cifar10(data_dir, download=False)
    assert data.train.images.shape == (200, 3, 32, 32) and data.train.images.dtype == torch.uint8
    assert data.test.images.shape == (100, 3, 32, 32)
    assert data.train.labels.dtype == torch.int64 and 0 <= data.train.labels.min() <= data.train.labels.max() <= 9
    inner = common.load_cifar10(data_dir / "cifar-10-batches-py", download=False)
    assert torch.equal(inner.test.images, data.test.images)


def copy_of(data_dir, tmp_path):
    return shutil.copytree(data_dir / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")


def test_truncated_batch_is_a_clear_error(data_dir, tmp_path):
    folder = copy_of(data_dir, tmp_path)
    content = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(content[: len(content) // 2])
    with pytest.raises(common.ExperimentError, match="cannot read CIFAR-10 file .*data_batch_3"):
        common.load_cifar10(tmp_path)


def test_malformed_batch_is_a_clear_error(data_dir, tmp_path):
    folder = copy_of(data_dir, tmp_path)
    with open(folder / "test_batch", "wb") as file:
        pickle.dump({b"data": torch.zeros(5, 100, dtype=torch.uint8).numpy(), b"labels": [0] * 5}, file)
    with pytest.raises(common.ExperimentError, match="test_batch is not a CIFAR-10 batch"):
        common.load_cifar10(tmp_path)


def test_missing_batch_is_a_clear_error(data_dir, tmp_path):
    folder = copy_of(data_dir, tmp_path)
    (folder / "data_batch_5").unlink()
    with pytest.raises(common.ExperimentError, match="data_batch_5 is missing"):
        common.load_cifar10(tmp_path)


def test_failed_download_says_where_to_put_the_data(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    with pytest.raises(common.ExperimentError) as error:
        common.load_cifar10(tmp_path / "data")
    assert "cifar-10-python.tar.gz" in str(error.value) and str(tmp_path / "data") in str(error.value)
    assert "--data-dir" in str(error.value)


def test_script_offline_without_data_ends_with_one_line(tmp_path):
    # a proxy on a closed local port makes the download fail at once, as it does offline
    proxy = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    completed = run_script("lenet_cpu.py", "--data-dir", tmp_path / "none", "--out-dir", tmp_path / "out", env=proxy)
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not download CIFAR-10")
    assert not list((tmp_path / "out").glob("run_*"))  # no empty run folder is left behind


def indexed_split(count):
    """Image i is filled with the value i, so batches reveal which images they hold."""
    images = torch.arange(count, dtype=torch.uint8).view(-1, 1, 1, 1).expand(count, 3, 32, 32).contiguous()
    return common.Split(images, torch.arange(count) % 10)


def image_indices(batches):
    return [round(v) for x, _ in batches for v in (x[:, 0, 0, 0] * 255).tolist()]


def test_training_batches_shuffle_every_epoch_and_repeat_with_the_seed():
    batches = common.Batches(indexed_split(100), 8, "cpu", (0, 0, 0), (1, 1, 1), train=True, seed=3)
    first = image_indices(batches)
    assert len(first) == 96 and len(set(first)) == 96  # the incomplete last batch is dropped
    batches.set_epoch(1)
    second = image_indices(batches)
    assert second != first
    again = common.Batches(indexed_split(100), 8, "cpu", (0, 0, 0), (1, 1, 1), train=True, seed=3)
    again.set_epoch(1)
    assert image_indices(again) == second


def test_processes_get_disjoint_shards_of_the_same_permutation():
    shards = [image_indices(common.Batches(indexed_split(100), 10, "cpu", (0, 0, 0), (1, 1, 1), train=True,
                                           rank=rank, world_size=2)) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 50
    assert not set(shards[0]) & set(shards[1])


def test_evaluation_batches_keep_order_and_every_image():
    batches = common.Batches(indexed_split(100), 32, "cpu", (0, 0, 0), (1, 1, 1))
    assert image_indices(batches) == list(range(100))


def test_batch_larger_than_the_data_is_a_clear_error():
    with pytest.raises(common.ExperimentError, match="batch size 512 is larger"):
        common.Batches(indexed_split(100), 512, "cpu", (0, 0, 0), (1, 1, 1), train=True)


def test_crops_and_flips_differ_per_image_and_stay_inside_the_padding():
    torch.manual_seed(0)
    image = torch.randn(1, 3, 40, 40)
    batch = image.expand(64, 3, 40, 40)
    crops = common.random_crop_flip(batch, 32, torch.Generator().manual_seed(0))
    assert crops.shape == (64, 3, 32, 32)
    windows = {(top, left, flipped) for top in range(9) for left in range(9) for flipped in (False, True)}
    found = set()
    for crop in crops:
        matches = [(t, l, f) for t, l, f in windows
                   if torch.equal(crop, image[0, :, t:t + 32, l:l + 32].flip(2) if f else image[0, :, t:t + 32, l:l + 32])]
        assert len(matches) == 1
        found.add(matches[0])
    assert len(found) > 40 and {flipped for _, _, flipped in found} == {False, True}


def test_augmentation_applies_to_training_batches_only():
    split = common.Split(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), torch.arange(64) % 10)
    plain = common.Batches(split, 64, "cpu", (0.5,) * 3, (0.5,) * 3)
    augmented = common.Batches(split, 64, "cpu", (0.5,) * 3, (0.5,) * 3, train=True, augment=True)
    (images, _), = list(plain)
    assert torch.allclose(images, (split.images.float() / 255 - 0.5) / 0.5, atol=1e-6)
    (crops, labels), = list(augmented)
    assert crops.shape == (64, 3, 32, 32) and labels.shape == (64,)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_warms_up_then_decays(schedule):
    factors = [common.lr_factor(step, 100, schedule, warmup_steps=10) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(factors[:10], factors[1:10]))
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] < 0.02


def test_step_schedule_halves_every_twenty_epochs():
    factor = [common.lr_factor(epoch * 10, 500, "step", steps_per_epoch=10) for epoch in (0, 19, 20, 40)]
    assert factor == [1.0, 1.0, 0.5, 0.25]


CONFIGS = [dict(num_epochs=1, lr=0.1, momentum=0.9, batch_size=4), dict(num_epochs=2, lr=0.2, momentum=0.9, batch_size=4)]


def test_unknown_config_number_is_an_error_listing_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as exit:
        common.parse_args("test", CONFIGS, ["--configs", "3"])
    assert exit.value.code == 2
    assert "invalid choice: 3 (choose from 1, 2)" in capsys.readouterr().err


def new_run(tmp_path, *argv):
    return common.Run("x.py", common.parse_args("test", CONFIGS, ["--out-dir", str(tmp_path), *argv]))


def test_overrides_apply_to_the_chosen_configs(tmp_path):
    run = new_run(tmp_path, "--configs", "2", "--epochs", "7", "--lr", "0.5")
    assert list(run.configs(CONFIGS)) == [("config_2", dict(num_epochs=7, lr=0.5, momentum=0.9, batch_size=4))]


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
    assert text.count("(default: all)") == 1 and "(default: ./data)" in text and "(default: 1)" in text


def test_unwritable_output_folder_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(common.ExperimentError, match="cannot write to output folder"):
        new_run(tmp_path / "file" / "out")


def test_each_run_gets_a_new_folder(tmp_path):
    folders = [new_run(tmp_path).run_dir for _ in range(2)]
    assert [f.name for f in folders] == ["run_001", "run_002"]


def test_data_parallel_only_for_one_process_with_several_gpus():
    assert common.gpus_driven(torch.device("cuda"), 4) == 4
    assert common.gpus_driven(torch.device("cuda"), 1) == 1
    assert common.gpus_driven(torch.device("cpu"), 4) == 1
    assert common.gpus_driven(torch.device("cuda"), 4, world_size=4) == 1  # torchrun: DDP, one GPU each


def test_model_stays_unwrapped_on_the_cpu(tmp_path):
    run = new_run(tmp_path, "--device", "cpu")
    model = torch.nn.Linear(2, 2)
    assert run.place(model) is model and run.gpu_count == 1 and run.world_size == 1
