"""lenet_multigpu.py, l2_regularization.py, dropout_regularization.py: configs, outputs, regularization."""

import json

import pytest
import torch
import torch.optim as optim

import dropout_regularization
import l2_regularization
import lenet_multigpu
from lenet_cpu import Net


def test_multigpu_configs_are_the_reports_grid():
    grid = [(c["num_epochs"], c["lr"], c["momentum"], c["batch_size"]) for c in lenet_multigpu.CONFIGS]
    assert [g[:3] for g in grid[:3]] == [(50, 0.001, 0.9), (100, 0.01, 0.9), (200, 0.001, 0.95)]
    assert grid[3:] == [(50, 0.001, 0.9, 32), (50, 0.005, 0.9, 64), (50, 0.001, 0.95, 32), (50, 0.001, 0.95, 64),
                        (50, 0.01, 0.9, 32), (50, 0.01, 0.9, 64), (50, 0.01, 0.9, 512)]


@pytest.mark.parametrize("script, key, report", [(l2_regularization, "weight_decay", 1e-4),
                                                 (dropout_regularization, "dropout_rate", 0.5)])
def test_regularization_configs_control_then_report(script, key, report):
    control, reported, *sweep = script.CONFIGS
    assert control[key] == 0 and reported[key] == report and sweep
    assert {k: v for k, v in control.items() if k != key} == {k: v for k, v in reported.items() if k != key}
    assert reported["num_epochs"] == 50 and reported["lr"] == 0.001 and reported["momentum"] == 0.95
    assert reported["batch_size"] == 64


def read_results(folder, name):
    return json.loads((folder / name / "results.json").read_text())


def test_multigpu_runs_configs_and_overlays_their_curves(data_dir, tmp_path, capsys):
    arguments = ["--device", "cpu", "--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--configs", "3", "10", "--epochs", "1",
                 "--batch-size", "32"]
    assert lenet_multigpu.main(arguments) == 0
    run = tmp_path / "run_001"
    assert (run / "test_accuracy.png").exists()
    assert [read_results(run, n)["train_seconds"] > 0 for n in ("config_3", "config_10")] == [True, True]
    output = capsys.readouterr().out
    assert "training on cpu" in output  # no GPU: the plain model, no DataParallel
    assert "config_3: Training time:" in output  # every config is timed
    assert "config_10: Configuration: {'num_epochs': 1, 'lr': 0.01, 'momentum': 0.9, 'batch_size': 32}" in output


def test_the_reports_times_are_beside_its_accuracies():
    reported = lenet_multigpu.REPORTED
    assert [reported[f"config_{n}"].get("train_seconds") for n in range(1, 11)] == [
        None, None, None, 263.94, 181.47, 259.07, 180.19, 260.93, 181.00, 163.23]
    assert {reported[f"config_{n}"]["device"] for n in range(4, 11)} == {"4x A100"}


@pytest.mark.parametrize("script, key", [(l2_regularization, "weight_decay"), (dropout_regularization, "dropout_rate")])
def test_regularization_script_reports_the_gap(script, key, data_dir, tmp_path, capsys):
    arguments = ["--device", "cpu", "--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--configs", "1", "2", "--epochs", "2",
                 "--batch-size", "16"]
    assert script.main(arguments) == 0
    run = tmp_path / "run_001"
    assert (run / "train_vs_test.png").exists() and (run / "test_accuracy.png").exists()
    for name in ("config_1", "config_2"):
        results = read_results(run, name)
        last = results["history"][-1]
        assert results["final_train_eval_accuracy"] == last["train_eval_accuracy"]
        assert results["final_train_accuracy"] == last["train_accuracy"]  # the running one, during the epoch
        assert results["train_test_gap"] == pytest.approx(last["train_eval_accuracy"] - last["test_accuracy"])
    summary = json.loads((run / "summary.json").read_text())
    assert [s["config"][key] for s in summary["configs"]] == [0, script.CONFIGS[1][key]]
    assert summary["script"] == script.__name__ + ".py" and summary["resumed"] is False
    assert summary["wall_seconds"] > sum(s["train_seconds"] for s in summary["configs"])
    assert capsys.readouterr().out.count("train-test gap (eval mode):") == 2


def test_weight_decay_shrinks_weights_about_twenty_times_lr_times_wd_at_momentum_095():
    """The l2 docstring's claim: through the momentum buffer the shrink builds up to lr * wd / (1 - m) per step."""
    weight = torch.nn.Parameter(torch.tensor([2.0, -4.0], dtype=torch.float64))
    optimizer = optim.SGD([weight], lr=0.001, momentum=0.95, weight_decay=1e-4)
    shrink = []
    for _ in range(400):
        before = weight.detach().clone()
        weight.grad = torch.zeros_like(weight)  # no loss: weight decay alone
        optimizer.step()
        shrink.append((1 - weight.detach() / before).mean().item())
    assert shrink[0] == pytest.approx(0.001 * 1e-4)  # the first step: lr x wd
    assert shrink[-1] == pytest.approx(0.001 * 1e-4 / (1 - 0.95), rel=0.01)  # later: 20 times that


def test_l2_script_leaves_smaller_weights(data_dir, tmp_path):
    arguments = ["--device", "cpu", "--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--configs", "1", "5", "--epochs", "2",
                 "--batch-size", "16", "--lr", "0.05"]
    assert l2_regularization.main(arguments) == 0
    control, decayed = (read_results(tmp_path / "run_001", n)["extra"]["weight_norm"] for n in ("config_1", "config_5"))
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
