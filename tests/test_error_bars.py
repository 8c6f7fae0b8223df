"""--val-fraction (an epoch picked without the test set) and error_bars.py (mean +- sd over seeds),
on the CPU."""

import json
import statistics

import pytest

import common
import error_bars
import l2_regularization
from conftest import on_cpu, run_script


def train_seeds(data_dir, out_dir, seeds, *extra):
    """l2_regularization.py configs 1 and 5, 3 epochs, a validation split, once per seed: the run
    folders."""
    for seed in seeds:
        arguments = on_cpu(
            data_dir,
            out_dir,
            "--configs",
            "1",
            "5",
            "--epochs",
            "3",
            "--batch-size",
            "16",
            "--val-fraction",
            "0.25",
            "--seed",
            str(seed),
            *extra,
        )
        assert l2_regularization.main(arguments) == 0
    return sorted(out_dir.glob("run_*"))


@pytest.mark.slow
def test_a_validation_split_is_held_out_of_the_training_images_only(data_dir, tmp_path):
    (run,) = train_seeds(data_dir, tmp_path, [1])
    result = json.loads((run / "config_5" / "results.json").read_text())
    assert result["config"]["val_fraction"] == 0.25 and result["validation"] is True
    # loaded, then split
    assert result["data"]["train_images"] == 200 and result["data"]["test_images"] == 100
    assert all(
        {"val_accuracy", "test_accuracy", "train_eval_accuracy"} <= entry.keys()
        for entry in result["history"]
    )
    assert result["final_test_accuracy"] == result["history"][-1]["test_accuracy"]


def test_hold_out_keeps_the_first_images_for_training():
    split = common.Split(common.torch.arange(10), common.torch.arange(10))
    train, validation = common.hold_out(split, 0.3)
    assert train.labels.tolist() == list(range(7)) and validation.labels.tolist() == [7, 8, 9]
    assert common.hold_out(split, 0.0) == (split, None)
    with pytest.raises(common.ExperimentError):
        common.hold_out(split, 0.01)  # nothing left to validate on


@pytest.mark.slow
def test_error_bars_are_mean_and_sample_sd_over_seeds(data_dir, tmp_path, capsys):
    runs = train_seeds(data_dir, tmp_path, [1, 2, 3])
    assert error_bars.main([str(tmp_path), "--json", str(tmp_path / "bars.json")]) == 0
    bars = json.loads((tmp_path / "bars.json").read_text())
    assert [group["names"] for group in bars] == [["config_1"], ["config_5"]]
    for group in bars:
        assert group["seeds"] == [1, 2, 3]
        results = [
            json.loads((run / group["names"][0] / "results.json").read_text()) for run in runs
        ]
        finals = [result["final_test_accuracy"] for result in results]
        assert group["last_epoch_test_accuracy"]["mean"] == pytest.approx(statistics.mean(finals))
        assert group["last_epoch_test_accuracy"]["sd"] == pytest.approx(statistics.stdev(finals))
        # the epoch is the validation's best; the figure is the test accuracy at that epoch
        for result, epoch, figure in zip(
            results,
            group["val_picked_test_accuracy"]["epochs"],
            group["val_picked_test_accuracy"]["values"],
        ):
            best = max(entry["val_accuracy"] for entry in result["history"])
            assert result["history"][epoch - 1]["val_accuracy"] == best
            assert result["history"][epoch - 1]["test_accuracy"] == figure
        assert len(group["train_test_gap"]["values"]) == 3
    assert "config_5" in capsys.readouterr().out


@pytest.mark.slow
def test_error_bars_refuse_a_seed_twice_and_name_the_files(data_dir, tmp_path):
    train_seeds(data_dir, tmp_path, [1, 1])
    finished = run_script("error_bars.py", tmp_path)
    assert finished.returncode == 1 and "Traceback" not in finished.stderr
    assert (
        finished.stderr.count("\n") == 1
        and "run_001" in finished.stderr
        and "run_002" in finished.stderr
    )


@pytest.mark.slow
def test_error_bars_refuse_a_folder_without_runs_in_one_line(tmp_path):
    finished = run_script("error_bars.py", tmp_path)
    assert (
        finished.returncode == 1
        and finished.stderr.count("\n") == 1
        and str(tmp_path) in finished.stderr
    )
