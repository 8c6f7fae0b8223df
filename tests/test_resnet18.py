"""resnet18.py: the network (torchvision's layers), its augmentation and schedules, config 5 end to
end."""

import json

import pytest
import torch
import torch.nn as nn
import torchvision

import common
import resnet18
from conftest import on_cpu


def cifar_torchvision_resnet18():
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_saved_weights_load_into_torchvision_and_give_the_same_outputs(stem, tmp_path):
    """The CIFAR stem into torchvision's resnet18 with that stem; config 8's ImageNet stem as is."""
    torch.manual_seed(0)
    model = resnet18.ResNet18(stem=stem)
    # running statistics away from their defaults, so that they count
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    if stem == "cifar":
        reference = cifar_torchvision_resnet18()
    else:
        reference = torchvision.models.resnet18(num_classes=10)
    reference.load_state_dict(model.state_dict(), strict=True)
    images = torch.randn(4, 3, 32, 32)
    assert torch.allclose(model.eval()(images), reference.eval()(images), atol=1e-5)
    torch.save(model.state_dict(), tmp_path / "model.pth")
    assert resnet18.stem_of(tmp_path / "model.pth") == stem  # --evaluate builds this network


def test_the_cifar_stem_keeps_every_pixel_and_the_imagenet_stem_quarters_the_map():
    assert sum(p.numel() for p in resnet18.ResNet18().parameters()) == 11_173_962
    shapes = {}
    for stem in ("cifar", "imagenet"):
        model = resnet18.ResNet18(stem=stem)
        shapes[stem] = model.maxpool(model.conv1(torch.zeros(1, 3, 32, 32))).shape[-1]
    assert shapes == {"cifar": 32, "imagenet": 8}
    # config 8: config 9 (config 4 as guessed) on the 7x7 stem
    assert resnet18.CONFIGS[7] == resnet18.CONFIGS[8] | {"stem": "imagenet"}


def test_crops_and_flips_differ_per_image_and_stay_inside_the_padding():
    torch.manual_seed(0)
    image = torch.randn(1, 3, 32, 32)
    padded = nn.functional.pad(image, (4, 4, 4, 4), mode="reflect")[0]
    crops = resnet18.augment(image.expand(64, 3, 32, 32))
    assert crops.shape == (64, 3, 32, 32)
    found = set()
    for crop in crops:
        matches = [
            (top, left, flip)
            for top in range(9)
            for left in range(9)
            for flip in (False, True)
            if torch.equal(
                crop,
                padded[:, top : top + 32, left : left + 32].flip(2)
                if flip
                else padded[:, top : top + 32, left : left + 32],
            )
        ]
        assert len(matches) >= 1
        found.add(matches[0])
    assert len(found) > 40 and {flip for _, _, flip in found} == {False, True}


def learning_rates(config, steps_per_epoch):
    return [
        resnet18.get_lr(step, config, steps_per_epoch)
        for step in range(config["num_epochs"] * steps_per_epoch)
    ]


@pytest.mark.parametrize("number", [5, 6])
def test_modern_schedules_warm_up_then_decay_to_zero(number):
    config = resnet18.CONFIGS[number - 1]
    rates = learning_rates(config, 10)
    warmup = config["warmup_epochs"] * 10
    assert rates[0] == pytest.approx(config["lr"] / warmup)
    assert rates[warmup - 1] == pytest.approx(config["lr"]) == max(rates)
    assert all(a < b for a, b in zip(rates[: warmup - 1], rates[1:warmup]))
    assert all(a > b for a, b in zip(rates[warmup:], rates[warmup + 1 :]))
    assert rates[-1] < config["lr"] / 50


def test_step_schedule_halves_every_twenty_epochs():
    rates = learning_rates(resnet18.CONFIGS[6], 3)
    assert [rates[epoch * 3] for epoch in (0, 19, 20, 39)] == pytest.approx(
        [0.01, 0.01, 0.005, 0.005]
    )


@pytest.mark.slow
def test_modern_config_trains_one_epoch_and_writes_its_outputs(data_dir, tmp_path, capsys):
    arguments = on_cpu(
        data_dir,
        tmp_path,
        "--configs",
        "5",
        "--subset",
        "64",
        "--epochs",
        "1",
        "--batch-size",
        "32",
    )
    assert resnet18.main(arguments) == 0
    folder = tmp_path / "run_001" / "config_5"
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "completed" and len(results["history"]) == 1
    assert 0 <= results["extra"]["flip_tta_test_accuracy"] <= 100
    cifar_torchvision_resnet18().load_state_dict(
        torch.load(folder / "model.pth", weights_only=True)
    )
    assert (folder / "curves.png").exists()
    assert "flip_tta_test_accuracy" in capsys.readouterr().out


@pytest.mark.slow
def test_validation_config_keeps_the_test_set_for_the_end(data_dir, tmp_path):
    arguments = on_cpu(
        data_dir,
        tmp_path,
        "--configs",
        "6",
        "--subset",
        "80",
        "--epochs",
        "1",
        "--batch-size",
        "24",
    )
    assert resnet18.main(arguments) == 0
    results = json.loads((tmp_path / "run_001" / "config_6" / "results.json").read_text())
    entry = results["history"][0]
    assert "val_accuracy" in entry and "test_accuracy" not in entry
    assert results["final_val_accuracy"] == entry["val_accuracy"]
    assert 0 <= results["final_test_accuracy"] <= 100
    assert common.CLASSES[0] in results["per_class_test_accuracy"]
