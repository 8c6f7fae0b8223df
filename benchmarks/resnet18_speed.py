"""Speed of resnet18.py on the device at hand: training and evaluation images/s, and a 25-epoch
config's time.

Times resnet18.train, the script's own epoch (lr schedule, crop and flip on the device, the model in
the precision resnet18.build_model picks), over random images, then common.evaluate over as many.
The first epoch includes the warm-up (and compilation with --compile) and is reported apart from the
steady epochs. --precision fp32 trains the plain fp32 model (NCHW) instead, for comparison.

    python benchmarks/resnet18_speed.py                  # 50,000 images, as CIFAR-10
    python benchmarks/resnet18_speed.py --compile
    python benchmarks/resnet18_speed.py --device cpu --images 2048 --batch-size 128 --precision fp32
    python benchmarks/resnet18_speed.py ... --json FILE   # the figures, also as JSON
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
TRAINING_IMAGES, TEST_IMAGES = 50_000, 10_000


class Sums:
    """What a script's train() hands every step to (common.EpochMeter in the scripts): the loss,
    summed on the device."""

    def __init__(self, device):
        self.loss = torch.zeros((), device=device, dtype=torch.float64)

    def add(self, loss, outputs, labels):
        self.loss += loss.detach()


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="training device"
    )
    parser.add_argument(
        "--images", type=int, default=TRAINING_IMAGES, help="training images per epoch"
    )
    parser.add_argument("--epochs", type=int, default=3, help="epochs; the first is the warm-up")
    parser.add_argument("--batch-size", type=int, default=CONFIG["batch_size"], help="batch size")
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32"),
        default="auto",
        help="auto: resnet18.build_model's choice for the device; fp32: plain fp32, NCHW",
    )
    parser.add_argument(
        "--compile", action="store_true", help="compile the model with torch.compile"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first one is the warm-up")
    device = common.pick_device(args)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    config = dict(CONFIG, batch_size=args.batch_size, num_epochs=args.epochs)
    split = common.Split(
        torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8),
        torch.randint(0, 10, (args.images,)),
    )
    batches = common.Batches(
        split, config["batch_size"], device, resnet18.MEAN, resnet18.STD
    )
    test_batches = common.Batches(split, 1000, device, resnet18.MEAN, resnet18.STD)
    if args.precision == "fp32":
        model = resnet18.ResNet18().to(device)
    else:
        model = resnet18.build_model(device)
    precision = resnet18.PRECISIONS[model.compute_dtype]
    model = torch.compile(model) if args.compile else model
    optimizer = optim.SGD(
        model.parameters(),
        lr=config["lr"],
        momentum=config["momentum"],
        nesterov=config["nesterov"],
        weight_decay=config["weight_decay"],
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision.startswith("fp16"))
    criterion = nn.CrossEntropyLoss(label_smoothing=config["label_smoothing"])
    seconds = []
    evaluation_seconds = []
    for epoch in range(args.epochs):
        started = common.clock(device)
        resnet18.train(
            model,
            batches.epoch(epoch),
            criterion,
            optimizer,
            scaler,
            Sums(device),
            config,
            epoch * batches.steps,
            batches.steps,
        )
        seconds.append(common.clock(device) - started)
        model.eval()
        started = common.clock(device)
        common.evaluate(model, test_batches)
        evaluation_seconds.append(common.clock(device) - started)
    train_rate = len(batches.labels) / statistics.median(seconds[1:])
    evaluation_rate = args.images / statistics.median(evaluation_seconds[1:])
    epochs = CONFIG["num_epochs"]
    run_seconds = epochs * (TRAINING_IMAGES / train_rate + TEST_IMAGES / evaluation_rate)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu, threads: {torch.get_num_threads()}"
    )
    print(
        f"device: {name}, torch {torch.__version__}, batch size {config['batch_size']}, precision: "
        f"{precision}, compile: {args.compile}"
    )
    print(
        f"first epoch (warm-up): {seconds[0]:.2f} s; steady: {train_rate:,.1f} training images/s, "
        f"{evaluation_rate:,.1f} evaluated images/s"
    )
    print(
        f"{epochs} epochs of {TRAINING_IMAGES:,} training images, each followed by evaluating "
        f"{TEST_IMAGES:,}, at that speed: {run_seconds:,.0f} s ({common.duration(run_seconds)})"
    )
    if args.json:
        figures = {
            "device": name,
            "torch": torch.__version__,
            "batch_size": config["batch_size"],
            "precision": precision,
            "compile": args.compile,
            "images": args.images,
            "train_images_per_second": train_rate,
            "evaluated_images_per_second": evaluation_rate,
            "seconds_for_25_epochs": run_seconds,
            "code": common.code_version(__file__),
        }
        common.write_json(args.json, figures)


if __name__ == "__main__":
    try:
        main()
    except common.ExperimentError as error:
        sys.exit(f"error: {error}")
