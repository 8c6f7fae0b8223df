"""resnet18.py: the network, its schedules, and config 5 end to end on a tiny subset."""

import json

import pytest
import torch
import torch.nn as nn
import torchvision

import common
import resnet18


def test_parameter_count_matches_torchvision_with_a_cifar_stem():
    model = resnet18.ResNet18()
    reference = torchvision.models.resnet18(num_classes=10)
    reference.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    reference.maxpool = nn.Identity()
    assert common.count_parameters(model) == common.count_parameters(reference) == 11_173_962
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_configs_hold_the_reports_four_then_the_modern_recipe():
    report = [(c["num_epochs"], c["lr"], c["momentum"]) for c in resnet18.CONFIGS[:4]]
    assert report == [(15, 0.01, 0.95), (25, 0.01, 0.95), (25, 0.005, 0.9), (25, 0.005, 0.95)]
    modern = resnet18.CONFIGS[4]
    assert modern["num_epochs"] <= 25 and modern["augment"] and modern["nesterov"]
    assert modern["weight_decay"] > 0 and modern["label_smoothing"] > 0 and modern["warmup_epochs"] > 0


def learning_rates(config, steps_per_epoch):
    optimizer, scheduler = resnet18.make_optimizer(config, nn.Linear(2, 2), steps_per_epoch)
    rates = []
    for _ in range(config["num_epochs"] * steps_per_epoch):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_modern_schedule_warms_up_then_decays_to_zero():
    config = resnet18.CONFIGS[4]
    rates = learning_rates(config, 10)
    warmup = config["warmup_epochs"] * 10
    assert rates[0] == pytest.approx(config["lr"] / warmup)
    assert rates[warmup - 1] == pytest.approx(config["lr"]) == max(rates)
    assert all(a < b for a, b in zip(rates[:warmup - 1], rates[1:warmup]))
    assert all(a > b for a, b in zip(rates[warmup:], rates[warmup + 1:]))
    assert rates[-1] < config["lr"] / 100


def test_step_schedule_halves_every_twenty_epochs():
    config = resnet18.CONFIGS[6]
    rates = learning_rates(config, 3)
    assert [rates[epoch * 3] for epoch in (0, 19, 20, 39)] == pytest.approx([0.01, 0.01, 0.005, 0.005])


def test_modern_config_trains_one_epoch_and_writes_its_outputs(data_dir, tmp_path, capsys):
    arguments = ["--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--configs", "5", "--subset", "64",
                 "--epochs", "1", "--batch-size", "32"]
    assert resnet18.main(arguments) == 0
    folder = tmp_path / "run_001" / "config_5"
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "completed" and len(results["history"]) == 1
    assert 0 <= results["extra"]["flip_tta_test_accuracy"] <= 100
    resnet18.ResNet18().load_state_dict(torch.load(folder / "model.pth"))
    assert (folder / "curves.png").exists()
    assert "flip_tta_test_accuracy" in capsys.readouterr().out


def test_validation_config_keeps_the_test_set_for_the_end(data_dir, tmp_path):
    arguments = ["--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--configs", "6", "--subset", "80",
                 "--epochs", "1", "--batch-size", "24"]
    assert resnet18.main(arguments) == 0
    results = json.loads((tmp_path / "run_001" / "config_6" / "results.json").read_text())
    entry = results["history"][0]
    assert "val_accuracy" in entry and "test_accuracy" not in entry
    assert results["final_val_accuracy"] == entry["val_accuracy"]
    assert 0 <= results["final_test_accuracy"] <= 100
