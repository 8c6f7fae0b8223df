"""Training speed of resnet18.py's config 5 on the device at hand: images/s and seconds per epoch.

Times the training step resnet18.py uses (common.train_one_epoch: the data and its crop/flip
augmentation on the device, bf16 autocast and channels_last on GPUs) over random images. The first epoch includes the
warm-up (and compilation with --compile) and is reported apart from the steady epochs.

    python benchmarks/resnet18_speed.py                  # 50,000 images, as CIFAR-10
    python benchmarks/resnet18_speed.py --compile
    python benchmarks/resnet18_speed.py --device cpu --images 1024 --batch-size 128
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import resnet18  # noqa: E402

CONFIG = 5


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="training device")
    parser.add_argument("--images", type=int, default=50_000, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="epochs; the first is the warm-up")
    parser.add_argument("--batch-size", type=int, default=resnet18.CONFIGS[CONFIG - 1]["batch_size"],
                        help="batch size")
    parser.add_argument("--compile", action="store_true", help="compile the model with torch.compile")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first one is the warm-up")
    split = common.Split(torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8),
                         torch.randint(0, 10, (args.images,)))
    with tempfile.TemporaryDirectory() as out_dir:
        argv = ["--configs", str(CONFIG), "--device", args.device, "--epochs", str(args.epochs),
                "--batch-size", str(args.batch_size), "--out-dir", out_dir] + (["--compile"] if args.compile else [])
        run = common.Run("resnet18.py", common.parse_args("", resnet18.CONFIGS, argv),
                         mean=resnet18.CIFAR10_MEAN, std=resnet18.CIFAR10_STD)
        _, config = next(run.configs(resnet18.CONFIGS))
    train_batches = run.batches(split, config["batch_size"], train=True, augment=config["augment"])
    model = run.compile(run.place(resnet18.ResNet18()))
    optimizer, scheduler = resnet18.make_optimizer(config, model, len(train_batches))
    criterion = nn.CrossEntropyLoss(label_smoothing=config["label_smoothing"])
    seconds = []
    for epoch in range(args.epochs):
        train_batches.set_epoch(epoch)
        started = common.clock(run.device)
        common.train_one_epoch(model, train_batches, optimizer, criterion, scheduler)
        seconds.append(common.clock(run.device) - started)
    steady = statistics.median(seconds[1:])
    images_per_second = len(train_batches) * config["batch_size"] / steady
    print(f"\ndevice: {common.describe_devices(run)}, batch size {config['batch_size']}, compile: {args.compile}")
    print(f"first epoch (warm-up): {seconds[0]:.2f} s; steady: {images_per_second:,.0f} training images/s, "
          f"{steady:.2f} s per epoch of {args.images:,} images")
    epochs = resnet18.CONFIGS[CONFIG - 1]["num_epochs"]
    print(f"config {CONFIG} ({epochs} epochs of 50,000 images) at that speed: "
          f"{epochs * 50_000 / images_per_second:.1f} s of training")


if __name__ == "__main__":
    main()
