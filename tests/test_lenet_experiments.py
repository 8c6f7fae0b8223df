"""lenet_multigpu.py, l2_regularization.py, dropout_regularization.py: configs, outputs,
regularization."""

import json

import pytest
import torch

import dropout_regularization
import l2_regularization
import lenet_multigpu
from lenet_cpu import Net
from conftest import on_cpu


@pytest.mark.parametrize(
    "script, key", [(l2_regularization, "weight_decay"), (dropout_regularization, "dropout_rate")]
)
def test_regularization_configs_differ_from_their_control_in_the_regularizer_alone(script, key):
    control, *others = script.CONFIGS
    assert control[key] == 0 and others
    without_key = [{k: v for k, v in config.items() if k != key} for config in script.CONFIGS]
    assert all(config == without_key[0] for config in without_key)


def read_results(folder, name):
    return json.loads((folder / name / "results.json").read_text())


@pytest.mark.slow
def test_multigpu_runs_configs_and_overlays_their_curves(data_dir, tmp_path, capsys):
    arguments = on_cpu(
        data_dir, tmp_path, "--configs", "3", "10", "--epochs", "1", "--batch-size", "32"
    )
    assert lenet_multigpu.main(arguments) == 0
    run = tmp_path / "run_001"
    assert (run / "test_accuracy.png").exists()
    assert [read_results(run, n)["train_seconds"] > 0 for n in ("config_3", "config_10")] == [
        True,
        True,
    ]
    output = capsys.readouterr().out
    assert "training on cpu" in output  # no GPU: the plain model, no DataParallel
    assert "config_3: Training time:" in output  # every config is timed
    assert (
        "config_10: Configuration: {'num_epochs': 1, 'lr': 0.01, 'momentum': 0.9, 'batch_size': 32}"
        in output
    )


@pytest.mark.parametrize(
    "script, key", [(l2_regularization, "weight_decay"), (dropout_regularization, "dropout_rate")]
)
@pytest.mark.slow
def test_regularization_script_reports_the_gap(script, key, data_dir, tmp_path, capsys):
    arguments = on_cpu(
        data_dir, tmp_path, "--configs", "1", "2", "--epochs", "2", "--batch-size", "16"
    )
    assert script.main(arguments) == 0
    run = tmp_path / "run_001"
    assert (run / "train_vs_test.png").exists() and (run / "test_accuracy.png").exists()
    for name in ("config_1", "config_2"):
        results = read_results(run, name)
        last = results["history"][-1]
        assert results["final_train_eval_accuracy"] == last["train_eval_accuracy"]
        # the running one, during the epoch
        assert results["final_train_accuracy"] == last["train_accuracy"]
        assert results["train_test_gap"] == pytest.approx(
            last["train_eval_accuracy"] - last["test_accuracy"]
        )
    summary = json.loads((run / "summary.json").read_text())
    assert [s["config"][key] for s in summary["configs"]] == [0, script.CONFIGS[1][key]]
    assert summary["script"] == script.__name__ + ".py" and summary["resumed"] is False
    assert summary["wall_seconds"] > sum(s["train_seconds"] for s in summary["configs"])
    assert capsys.readouterr().out.count("train-test gap (eval mode):") == 2


@pytest.mark.slow
def test_l2_script_leaves_smaller_weights(data_dir, tmp_path):
    arguments = on_cpu(
        data_dir,
        tmp_path,
        "--configs",
        "1",
        "5",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--lr",
        "0.05",
    )
    assert l2_regularization.main(arguments) == 0
    control, decayed = (
        read_results(tmp_path / "run_001", n)["extra"]["weight_norm"]
        for n in ("config_1", "config_5")
    )
    assert decayed < control


def test_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    model = dropout_regularization.DropoutNet(0.5)
    images = torch.randn(8, 3, 32, 32)
    model.train()
    assert not torch.equal(model(images), model(images))
    model.eval()
    plain = Net()
    plain.load_state_dict(model.state_dict())
    assert torch.equal(model(images), plain.eval()(images))
