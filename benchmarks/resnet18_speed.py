"""Training speed of resnet18.py's config 5 on the device at hand: images/s and seconds per epoch.

Times resnet18.train, the script's own epoch (lr schedule, crop and flip on the device, bf16 autocast and
channels_last on GPUs), over random images. The first epoch includes the warm-up (and compilation with
--compile) and is reported apart from the steady epochs.

    python benchmarks/resnet18_speed.py                  # 50,000 images, as CIFAR-10
    python benchmarks/resnet18_speed.py --compile
    python benchmarks/resnet18_speed.py --device cpu --images 1024 --batch-size 128
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.optim as optim

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import resnet18  # noqa: E402

CONFIG = resnet18.CONFIGS[5 - 1]


class Sums:
    """What resnet18.train hands every step to: here the loss, summed on the device as common.Record.add does."""

    def __init__(self, device):
        self.loss = torch.zeros((), device=device, dtype=torch.float64)

    def add(self, loss, outputs, labels):
        self.loss += loss.detach()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="training device")
    parser.add_argument("--images", type=int, default=50_000, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="epochs; the first is the warm-up")
    parser.add_argument("--batch-size", type=int, default=CONFIG["batch_size"], help="batch size")
    parser.add_argument("--compile", action="store_true", help="compile the model with torch.compile")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first one is the warm-up")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = device.type == "cuda"
    config = dict(CONFIG, batch_size=args.batch_size, num_epochs=args.epochs)
    split = common.Split(torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8),
                         torch.randint(0, 10, (args.images,)))
    batches = common.Batches(split, config["batch_size"], device, resnet18.CIFAR10_MEAN, resnet18.CIFAR10_STD)
    model = resnet18.ResNet18().to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = torch.compile(model) if args.compile else model
    optimizer = optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"],
                          nesterov=config["nesterov"], weight_decay=config["weight_decay"])
    criterion = nn.CrossEntropyLoss(label_smoothing=config["label_smoothing"])
    seconds = []
    for epoch in range(args.epochs):
        started = common.clock(device)
        resnet18.train(model, batches.epoch(epoch), criterion, optimizer, Sums(device), config,
                       epoch * batches.steps, batches.steps)
        seconds.append(common.clock(device) - started)
    steady = statistics.median(seconds[1:])
    images_per_second = batches.steps * config["batch_size"] / steady
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, threads: {torch.get_num_threads()}"
    print(f"device: {name}, batch size {config['batch_size']}, compile: {args.compile}")
    print(f"first epoch (warm-up): {seconds[0]:.2f} s; steady: {images_per_second:,.0f} training images/s, "
          f"{steady:.2f} s per epoch of {args.images:,} images")
    print(f"config 5 ({CONFIG['num_epochs']} epochs of 50,000 images) at that speed: "
          f"{CONFIG['num_epochs'] * 50_000 / images_per_second:.1f} s of training")


if __name__ == "__main__":
    main()
