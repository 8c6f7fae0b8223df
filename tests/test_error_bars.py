"""error_bars.py: mean +- sd over seeds, paired differences from a control with their confidence
interval, and runs that are no samples refused in one line."""

import json
import shutil
import statistics

import pytest

import error_bars
import l2_regularization
import lenet_multigpu
from conftest import assert_one_error_line, on_cpu, results, run_script, torch_settings_kept


@pytest.fixture(scope="module")
def seeds(tmp_path_factory, data_dir):
    """l2_regularization.py configs 1 (weight decay 1e-4) and 5 (its control), 3 epochs, a
    validation split, seeds 1, 2 and 3: the folder of the three runs."""
    out = tmp_path_factory.mktemp("seeds")
    with torch_settings_kept():
        for seed in ("1", "2", "3"):
            argv = on_cpu(data_dir, out, "--configs", "1", "5", "--epochs", "3", "--batch-size",
                          "16", "--val-fraction", "0.25", "--seed", seed, "--lr", "0.01")
            assert l2_regularization.main(argv) == 0
    return out


def test_the_student_t_quantiles_are_the_tables():
    quantiles = [round(error_bars.t_quantile(0.975, n), 3) for n in (1, 2, 3, 5, 10, 30)]
    assert quantiles == [12.706, 4.303, 3.182, 2.571, 2.228, 2.042]


@pytest.mark.slow
def test_error_bars_are_mean_and_sample_sd_and_paired_intervals(seeds, tmp_path, capsys):
    assert error_bars.main([str(seeds), "--json", str(tmp_path / "bars.json")]) == 0
    bars = json.loads((tmp_path / "bars.json").read_text())
    assert [group["names"] for group in bars] == [["config_1"], ["config_5"]]
    runs = sorted(seeds.glob("run_*"))
    finals = {}
    for group in bars:
        name = group["names"][0]
        found = [results(run / name) for run in runs]
        assert group["seeds"] == [1, 2, 3] and found[0]["validation"]
        finals[name] = [result["final_test_accuracy"] for result in found]
        last_epoch = group["last_epoch_test_accuracy"]
        assert last_epoch["mean"] == pytest.approx(statistics.mean(finals[name]))
        assert last_epoch["sd"] == pytest.approx(statistics.stdev(finals[name]))
        # the epoch is the validation's best; the figure is the test accuracy at that epoch
        picked = group["val_picked_test_accuracy"]
        for result, epoch, figure in zip(found, picked["epochs"], picked["values"]):
            best = max(entry["val_accuracy"] for entry in result["history"])
            assert result["history"][epoch - 1]["val_accuracy"] == best
            assert result["history"][epoch - 1]["test_accuracy"] == figure
    versus = bars[0]["versus_control"]
    differences = [a - b for a, b in zip(finals["config_1"], finals["config_5"])]
    half = 4.303 * statistics.stdev(differences) / 3 ** 0.5
    assert versus["control"] == "config_5" and "versus_control" not in bars[1]
    assert versus["last_epoch_test_accuracy"]["mean"] == pytest.approx(statistics.mean(differences))
    assert versus["last_epoch_test_accuracy"]["ci95"] == pytest.approx(
        [statistics.mean(differences) - half, statistics.mean(differences) + half], abs=1e-3)
    printed = capsys.readouterr().out
    assert "minus config_5, last epoch test accuracy, paired over seeds [1, 2, 3]" in printed


@pytest.mark.slow
def test_runs_that_are_no_samples_are_refused_in_one_line(seeds, data_dir, tmp_path):
    """A --dry-run was once averaged with real runs ("seeds 1, 2: 11.00 +- 2.83%")."""
    shutil.copytree(seeds / "run_001", tmp_path / "twice" / "run_001")
    shutil.copytree(seeds / "run_001", tmp_path / "twice" / "run_002")
    dry_run = on_cpu(data_dir, tmp_path / "dry", "--configs", "1", "--dry-run")
    assert l2_regularization.main(dry_run) == 0
    (tmp_path / "empty").mkdir()
    shutil.copytree(seeds / "run_002", tmp_path / "damaged" / "run_001")
    damaged = tmp_path / "damaged" / "run_001" / "config_1" / "results.json"
    damaged.write_text(json.dumps(results(damaged.parent) | {"history": []}))
    cases = {"twice": "same seed", "dry": "dry-run", "empty": "holds no run",
             "damaged": "completed without epochs"}
    for folder, fact in cases.items():
        completed = run_script("error_bars.py", tmp_path / folder)
        assert_one_error_line(completed)
        assert fact in completed.stderr and str(tmp_path / folder) in completed.stderr


@pytest.mark.slow
def test_a_folder_named_like_a_config_is_not_one(seeds, tmp_path):
    shutil.copytree(seeds / "run_001", tmp_path / "run_001")
    shutil.copytree(tmp_path / "run_001" / "config_1", tmp_path / "run_001" / "configX")
    assert [group["names"] for group in error_bars.summaries([tmp_path])] == [["config_1"],
                                                                              ["config_5"]]


def test_the_reports_batch_order_is_paired_with_the_reshuffled_config():
    """The grid's config 11 is config 8 on the same batches every epoch: config 8 is its control."""
    found = [{"script": "lenet_multigpu.py", "data": {}, "config": lenet_multigpu.CONFIGS[number]}
             for number in (7, 10, 3)]
    assert error_bars.control_of(found[1], found) is found[0]
    assert error_bars.control_of(found[0], found) is None
