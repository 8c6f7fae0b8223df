"""Each script trains what it says: the tutorial LeNet, the report's per-GPU batch, weight decay,
one Dropout layer, the report's ResNet-18 recipe; and the files a run writes."""

import json
import re

import pytest
import torch
import torch.nn as nn
import torchvision

import common
import dropout_regularization
import l2_regularization
import lenet_cpu
import lenet_multigpu
import resnet18
from conftest import epoch_figures, on_cpu, results

LENET_SCRIPTS = [lenet_cpu, lenet_multigpu, l2_regularization, dropout_regularization]


@pytest.mark.slow
def test_a_run_writes_its_files_and_never_overwrites_another(data_dir, tmp_path, capsys):
    arguments = on_cpu(data_dir, tmp_path, "--epochs", "1")
    assert lenet_cpu.main(arguments) == 0
    output = capsys.readouterr().out
    assert re.search(r"config_1: Configuration: \{'num_epochs': 1, 'lr': 0.001, 'momentum': 0.9, "
                     r"'batch_size': 4\} Final test accuracy: \d+\.\d\d% Training time: ", output)
    assert "Accuracy for class: plane is" in output  # the tutorial's lines
    folder = tmp_path / "run_001" / "config_1"
    assert sorted(p.name for p in folder.iterdir()) == [
        "checkpoint.pt", "confusion.png", "curves.png", "model.pth", "predictions.png",
        "results.json"]
    result = results(folder)
    (entry,) = result["history"]
    assert sorted(entry) == ["epoch", "eval_seconds", "save_seconds", "seconds", "test_accuracy",
                             "train_accuracy", "train_loss", "wall_seconds", "warmup_seconds"]
    assert result["final_test_accuracy"] == entry["test_accuracy"]
    assert result["train_seconds"] == entry["seconds"]
    # the wall time holds the steps, the warm-up, the evaluation and the save beside them
    parts = ("seconds", "warmup_seconds", "eval_seconds", "save_seconds")
    assert result["wall_seconds"] == entry["wall_seconds"] > sum(entry[key] for key in parts)
    # the report's figure is kept, but a 1-epoch run is not the report's config: no comparison
    assert result["reported"]["test_accuracy"] == 60 and result["versus_report"] is None
    assert "not compared with the report: other epochs" in output
    confusion = torch.tensor(result["confusion_matrix"])  # rows: the true classes
    assert confusion.shape == (10, 10) and confusion.sum() == 100
    assert confusion.diag().sum().item() == pytest.approx(result["final_test_accuracy"])
    assert list(result["per_class_test_accuracy"]) == list(common.CLASSES)
    assert result["environment"]["seed"] == 1 and result["environment"]["code"]["commit"]
    lenet_cpu.Net().load_state_dict(torch.load(folder / "model.pth"))  # no "module." prefix
    before = files_in_folder(folder)
    assert lenet_cpu.main(arguments) == 0
    assert files_in_folder(folder) == before and (tmp_path / "latest").read_text() == "run_002\n"


def files_in_folder(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir()}


@pytest.mark.slow
def test_the_report_is_compared_only_for_its_own_config_at_its_precision(data_dir, tmp_path,
                                                                         monkeypatch, capsys):
    """The report wrote "60%": ours is compared in whole points, never with decimals it lacks."""
    monkeypatch.setattr(lenet_cpu, "CONFIGS", [dict(lenet_cpu.CONFIGS[0], num_epochs=1)])
    assert lenet_cpu.main(on_cpu(data_dir, tmp_path)) == 0
    result = results(tmp_path / "run_001" / "config_1")
    points = result["versus_report"]["test_accuracy_points"]
    assert points == round(result["final_test_accuracy"] - 60) and points == int(points)
    assert f"| report: 60% ({points:+.0f} point" in capsys.readouterr().out


@pytest.mark.slow
def test_the_tutorials_loss_line_every_2000_batches_and_its_net(data_dir, tmp_path, capsys):
    assert sum(p.numel() for p in lenet_cpu.Net().parameters()) == 62_006
    assert lenet_cpu.main(on_cpu(data_dir, tmp_path, "--epochs", "1", "--log-interval", "10")) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[1, ")]
    assert [line.split("]")[0] for line in lines] == [f"[1, {n:5d}" for n in (10, 20, 30, 40, 50)]
    assert all(re.fullmatch(r"\[1, +\d+\] loss: \d\.\d{3}", line) for line in lines)


@pytest.mark.slow
def test_lenet_learns_the_tiny_dataset(data_dir, tmp_path):
    assert lenet_cpu.main(on_cpu(data_dir, tmp_path, "--epochs", "15", "--lr", "0.01")) == 0
    assert results(tmp_path / "run_001" / "config_1")["final_test_accuracy"] > 60  # chance: 10%


@pytest.mark.slow
def test_real_cifar10_two_epochs(real_data_dir, tmp_path):
    assert lenet_cpu.main(on_cpu(real_data_dir, tmp_path, "--epochs", "2", "--subset", "5000")) == 0
    assert results(tmp_path / "run_001" / "config_1")["final_test_accuracy"] > 20  # chance: 10%


@pytest.mark.slow
def test_a_dry_run_trains_two_batches_of_one_epoch_and_is_no_result_to_lead_to(data_dir, tmp_path):
    assert lenet_cpu.main(on_cpu(data_dir, tmp_path, "--dry-run")) == 0
    result = results(tmp_path / "run_001" / "config_1")
    assert len(result["history"]) == 1 and result["environment"]["dry_run"]
    assert not (tmp_path / "latest").exists()


@pytest.mark.slow
@pytest.mark.parametrize("script", LENET_SCRIPTS)
def test_every_lenet_script_honours_a_validation_split(script, data_dir, tmp_path):
    """--val-fraction was once recorded and ignored by lenet_cpu.py and lenet_multigpu.py."""
    number = "1" if script is lenet_cpu else "4" if script is lenet_multigpu else "2"
    argv = on_cpu(data_dir, tmp_path, "--configs", number, "--epochs", "1", "--val-fraction", "0.5")
    assert script.main(argv) == 0
    result = results(next(tmp_path.glob("run_001/config_*")))
    assert result["validation"] and result["history"][0]["val_accuracy"] is not None


def test_the_grid_trains_the_reports_batch_per_gpu_on_its_four_gpus(data_dir, tmp_path, capsys):
    """The report's DistributedDataParallel "batch 32" took steps of 4 x 32 images."""
    config = lenet_multigpu.CONFIGS[3]
    assert (config["batch_per_gpu"], config["report_gpus"], config["batch_size"]) == (32, 4, 128)
    assert [c["batch_size"] for c in lenet_multigpu.CONFIGS[3:10]] == [128, 256, 128, 256, 128, 256,
                                                                      2048]
    assert lenet_multigpu.main(on_cpu(data_dir, tmp_path, "--configs", "4", "--epochs", "1")) == 0
    output = capsys.readouterr().out
    # 200 training images: one batch of 128 and a short one of 72, as the report's last batch
    assert "config_4: the report's 32 images per GPU on its 4 GPUs: batch 128, 2 steps" in output
    entry = results(tmp_path / "run_001" / "config_4")["history"][0]
    assert {"train_eval_accuracy", "test_accuracy", "eval_seconds", "save_seconds"} <= set(entry)


@pytest.mark.slow
def test_the_report_loop_time_is_compared_with_the_reports_seconds(data_dir, tmp_path, monkeypatch,
                                                                   capsys):
    """Like for like: the report's seconds counted its steps, evaluations and checkpoint saves."""
    monkeypatch.setattr(lenet_multigpu, "CONFIGS", [dict(c, num_epochs=1) for c in
                                                     lenet_multigpu.CONFIGS])
    assert lenet_multigpu.main(on_cpu(data_dir, tmp_path, "--configs", "4")) == 0
    result = results(tmp_path / "run_001" / "config_4")
    (entry,) = result["history"]
    loop = sum(entry[k] for k in ("seconds", "warmup_seconds", "eval_seconds", "save_seconds"))
    assert result["report_loop_seconds"] == pytest.approx(loop)
    assert result["versus_report"]["time_ratio"] == pytest.approx(loop / 263.94)
    printed = capsys.readouterr().out
    assert "s as its loop timed: steps and evaluations and checkpoint saves" in printed
    assert (tmp_path / "run_001" / "versus_report.png").exists()


def test_config_11_trains_config_8_on_the_same_batches_every_epoch(data_dir, tmp_path,
                                                                   monkeypatch):
    """The report's DistributedSampler, never given set_epoch, drew one order for every epoch."""
    orders = []
    train = lenet_multigpu.train

    def recording_train(model, batches, *rest):
        batches = list(batches)
        orders.append(torch.cat([labels for _, labels in batches]))
        train(model, batches, *rest)

    monkeypatch.setattr(lenet_multigpu, "train", recording_train)
    argv = on_cpu(data_dir, tmp_path, "--configs", "8", "11", "--epochs", "2")
    assert lenet_multigpu.main(argv) == 0
    config_8_first, config_8_second, config_11_first, config_11_second = orders
    assert torch.equal(config_8_first, config_11_first)
    assert torch.equal(config_11_first, config_11_second)
    assert not torch.equal(config_8_first, config_8_second)
    fixed_order = {"same_order_every_epoch": True}
    assert lenet_multigpu.CONFIGS[10] == lenet_multigpu.CONFIGS[7] | fixed_order


def test_the_reports_figures_in_the_scripts_are_its_published_results():
    published_file = common.REPORT_DATA / "lenet_multigpu_training_results.json"
    published = json.loads(published_file.read_text())
    for number in range(4, 11):
        theirs = published[f"config_{number - 3}"]
        ours = lenet_multigpu.REPORTED[f"config_{number}"]
        assert ours["test_accuracy"] == theirs["final_test_accuracy"]
        assert ours["train_seconds"] == round(theirs["training_time"], 2)
        config = lenet_multigpu.CONFIGS[number - 1]
        assert {k: config[k] for k in ("num_epochs", "lr", "momentum")} | {
            "batch_size": config["batch_per_gpu"]} == theirs["config"]
    for script, file_name in [(l2_regularization, "l2"), (dropout_regularization, "dropout")]:
        published = json.loads((common.REPORT_DATA / f"{file_name}_regularization_training_"
                                                     f"results.json").read_text())
        for name, theirs in published.items():
            ours = script.REPORTED[name]
            assert ours["test_accuracy"] == theirs["final_test_accuracy"]
            assert ours["train_eval_accuracy"] == theirs["train_accuracies"][-1]
    resnet = json.loads((common.REPORT_DATA / "resnet18_results.json").read_text())
    for name, theirs in resnet.items():
        assert resnet18.REPORTED[name]["test_accuracy"] == theirs["final_test_accuracy"]
        assert resnet18.REPORTED[name]["train_seconds"] == round(theirs["training_time"], 2)


@pytest.mark.parametrize("script, key", [(l2_regularization, "weight_decay"),
                                         (dropout_regularization, "dropout_rate")])
def test_each_reported_config_has_a_control_that_differs_in_the_regularizer_alone(script, key):
    reported = [script.CONFIGS[int(name[7:]) - 1] for name in script.REPORTED]
    controls = [config for config in script.CONFIGS if not config[key]]
    assert len(controls) == len(reported)
    for config, control in zip(reported, controls):
        assert config[key] > 0 and {**config, key: 0.0} == control


@pytest.mark.slow
def test_the_three_scripts_controls_train_alike(data_dir, tmp_path):
    """Dropout at rate 0 and weight decay 0 train exactly as the grid's config 6: one run serves."""
    arguments = ["--epochs", "2"]
    assert lenet_multigpu.main(on_cpu(data_dir, tmp_path / "a", "--configs", "6", *arguments)) == 0
    argv = on_cpu(data_dir, tmp_path / "b", "--configs", "5", *arguments)
    assert l2_regularization.main(argv) == 0
    assert dropout_regularization.main(on_cpu(data_dir, tmp_path / "c", "--configs", "4",
                                              *arguments)) == 0
    histories = [epoch_figures(results(tmp_path / run / "run_001" / name)["history"])
                 for run, name in (("a", "config_6"), ("b", "config_5"), ("c", "config_4"))]
    assert histories[0] == histories[1] == histories[2]


@pytest.mark.slow
def test_weight_decay_leaves_smaller_weights(data_dir, tmp_path):
    argv = on_cpu(data_dir, tmp_path, "--configs", "5", "11", "--epochs", "3", "--lr", "0.05")
    assert l2_regularization.main(argv) == 0
    norms = [results(tmp_path / "run_001" / name)["extra"]["weight_norm"]
             for name in ("config_5", "config_11")]
    assert norms[1] < norms[0]
    assert (tmp_path / "run_001" / "train_vs_test.png").exists()


def test_the_reports_dropout_is_one_layer_after_fc1_and_acts_in_training_only():
    torch.manual_seed(0)
    model = dropout_regularization.DropoutNet(0.5)
    dropped = []
    model.dropout.register_forward_hook(lambda module, inputs, output: dropped.append(inputs[0]))
    images = torch.randn(8, 3, 32, 32)
    model.train()
    assert not torch.equal(model(images), model(images)) and dropped[0].shape == (8, 120)
    model.eval()
    assert torch.equal(model(images), model(images))
    plain = lenet_cpu.Net()
    plain.load_state_dict(model.state_dict())  # no weights of its own
    assert torch.equal(plain.eval()(images), model(images))
    assert len(dropped) == 5  # once in each of its 5 forwards: one layer
    ours = dropout_regularization.DropoutNet(0.5, after_fc2=True)  # config 6: after fc2 too
    ours.dropout.register_forward_hook(lambda module, inputs, output: dropped.append(inputs[0]))
    ours(images)
    assert [tensor.shape[1] for tensor in dropped[5:]] == [120, 84]


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_resnet_weights_load_into_torchvision_with_the_same_outputs(stem, tmp_path):
    model = resnet18.ResNet18(stem=stem)
    reference = torchvision.models.resnet18(num_classes=10)
    if stem == "cifar":  # the CIFAR stem: README.md shows these two lines
        reference.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        reference.maxpool = nn.Identity()
    reference.load_state_dict(model.state_dict(), strict=True)
    images = torch.randn(4, 3, 32, 32)
    assert torch.allclose(model.eval()(images), reference.eval()(images), atol=1e-5)
    torch.save(model.state_dict(), tmp_path / "model.pth")
    assert resnet18.stem_of(tmp_path / "model.pth") == stem  # --evaluate builds this network
    assert sum(p.numel() for p in resnet18.ResNet18().parameters()) == 11_173_962


def normalized(pixels):
    """uint8 pictures (N, 3, H, W) as resnet18.py normalizes them."""
    split = common.Split(pixels, torch.zeros(len(pixels)))
    return common.Batches(split, 1, "cpu", resnet18.MEAN, resnet18.STD).images


@pytest.mark.parametrize("crop_padding", ["zeros", "reflect"])
def test_resnet_crops_and_flips_differ_per_image_and_stay_inside_the_padding(crop_padding):
    """"zeros" crops from the picture torchvision's RandomCrop(32, padding=4) pads, the report's."""
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    image = normalized(pixels)
    if crop_padding == "reflect":
        padded = nn.functional.pad(image, (4, 4, 4, 4), mode="reflect")[0]
    else:
        padded = normalized(torchvision.transforms.functional.pad(pixels, 4))[0]
    crops = resnet18.augment(image.expand(64, 3, 32, 32), crop_padding)
    found = set()
    for crop in crops:
        for flipped in (False, True):
            for top in range(9):
                for left in range(9):
                    window = padded[:, top:top + 32, left:left + 32]
                    if torch.equal(crop, window.flip(2) if flipped else window):
                        found.add((top, left, flipped))
    assert crops.shape == (64, 3, 32, 32) and len(found) > 30
    assert {flipped for _, _, flipped in found} == {False, True}
    assert {top for top, _, _ in found} >= {0, 8}  # the padding is in some crops


def test_the_reports_schedule_is_cosine_annealing_stepped_once_an_epoch():
    config = resnet18.CONFIGS[3]
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=config["lr"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=200)
    for epoch in range(25):
        for step in (epoch * 391, epoch * 391 + 390):
            lr = optimizer.param_groups[0]["lr"]
            assert resnet18.get_lr(step, config, 391) == pytest.approx(lr)
        optimizer.step()
        scheduler.step()
    assert config["weight_decay"] == 5e-4 and config["batch_size"] == 128
    assert config["crop_padding"] == "zeros" and resnet18.STD == (0.2023, 0.1994, 0.2010)


@pytest.mark.parametrize("number", [5, 6, 7])
def test_our_schedules_warm_up_then_decay_or_halve_every_twenty_epochs(number):
    config = resnet18.CONFIGS[number - 1]
    rates = [resnet18.get_lr(step, config, 10) for step in range(config["num_epochs"] * 10)]
    warmup = config["warmup_epochs"] * 10
    if config["schedule"] == "step":
        assert [rates[epoch * 10] for epoch in (0, 19, 20, 39)] == [0.01, 0.01, 0.005, 0.005]
        return
    assert rates[0] == pytest.approx(config["lr"] / warmup)
    assert rates[warmup - 1] == pytest.approx(config["lr"]) == max(rates)
    assert all(a < b for a, b in zip(rates[: warmup - 1], rates[1:warmup]))
    assert all(a > b for a, b in zip(rates[warmup:], rates[warmup + 1:]))
    assert rates[-1] < config["lr"] / 50


@pytest.mark.slow
def test_resnet_trains_a_config_and_writes_its_outputs(data_dir, tmp_path, capsys):
    argv = on_cpu(data_dir, tmp_path, "--configs", "4", "--epochs", "1", "--batch-size", "32",
                  "--subset", "64")
    assert resnet18.main(argv) == 0
    result = results(tmp_path / "run_001" / "config_4")
    assert result["status"] == "completed" and "flip_tta_test_accuracy" in result["extra"]
    assert result["precision"] == resnet18.PRECISIONS[resnet18.compute_dtype(torch.device("cpu"))]
    assert result["report_loop_seconds"] == pytest.approx(sum(
        result["history"][0][k] for k in ("seconds", "warmup_seconds", "eval_seconds")))
    assert "config_4: Configuration" in capsys.readouterr().out


@pytest.mark.slow
def test_a_validation_config_keeps_the_test_set_for_the_end(data_dir, tmp_path):
    argv = on_cpu(data_dir, tmp_path, "--configs", "6", "--epochs", "1", "--batch-size", "32",
                  "--subset", "64")
    assert resnet18.main(argv) == 0
    result = results(tmp_path / "run_001" / "config_6")
    assert "test_accuracy" not in result["history"][0] and "val_accuracy" in result["history"][0]
    assert result["final_test_accuracy"] is not None and result["validation"]
