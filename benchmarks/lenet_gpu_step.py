"""Milliseconds per LeNet training step on one GPU: eager, then compiled with CUDA graphs.

A LeNet step on a batch of 32 is some 70 small kernels, each too short to keep a GPU busy, so its
time is mostly launch overhead: lenet_multigpu.py's config 4 (78,100 steps of 32 images) would take
about as long as 78,100 launches of all those kernels. `--compile` in the LeNet scripts uses
torch.compile's "reduce-overhead" mode, which captures the step's forward and backward as CUDA
graphs replayed with one launch each. This times lenet_multigpu.train (the script's own step, fused
SGD) both ways, its first steps (compilation, graph capture) apart, and prints the 50-epoch time
each implies.

    python benchmarks/lenet_gpu_step.py                    # batch 32, as configs 4, 6 and 8
    python benchmarks/lenet_gpu_step.py --batch-size 512   # as configs 1-3 and 10
    python benchmarks/lenet_gpu_step.py --device cpu       # runs anywhere (the default mode there)
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.optim as optim

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import lenet_cpu  # noqa: E402
import lenet_multigpu  # noqa: E402
from resnet18_speed import Sums  # noqa: E402

TRAINING_IMAGES = 50_000
EPOCHS = 50


def milliseconds_per_step(device, batch_size, steps, compiled):
    """(first 3 steps' seconds, steady ms per step) of lenet_multigpu.train on random images."""
    split = common.Split(
        torch.randint(0, 256, (batch_size * steps, 3, 32, 32), dtype=torch.uint8),
        torch.randint(0, 10, (batch_size * steps,)),
    )
    batches = common.Batches(split, batch_size, device, (0.5,) * 3, (0.5,) * 3)
    model = lenet_multigpu.Net().to(device)
    if compiled:
        model = torch.compile(model, mode=lenet_cpu.compile_mode(device))
    optimizer = optim.SGD(model.parameters(), lr=0.001, momentum=0.9, fused=True)
    criterion = nn.CrossEntropyLoss()
    started = common.clock(device)
    warmup = itertools.islice(batches.epoch(0), common.WARMUP_STEPS)  # compilation, graph capture
    lenet_multigpu.train(model, warmup, criterion, optimizer, Sums(device))
    warmup_seconds = common.clock(device) - started
    started = common.clock(device)
    lenet_multigpu.train(model, batches.epoch(1), criterion, optimizer, Sums(device))
    return warmup_seconds, 1000 * (common.clock(device) - started) / batches.steps


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="(default: auto)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="(default: 32)")
    parser.add_argument(
        "--steps", type=int, default=2000, help="timed steps per mode (default: 2000)"
    )
    args = parser.parse_args()
    device = common.pick_device(args)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu, threads: {torch.get_num_threads()}"
    )
    steps_per_run = EPOCHS * (TRAINING_IMAGES // args.batch_size)
    print(f"device: {name}, batch size {args.batch_size}, torch {torch.__version__}")
    results = {}
    for compiled in (False, True):
        mode = f"compile ({lenet_cpu.compile_mode(device)})" if compiled else "eager"
        warmup_seconds, milliseconds = milliseconds_per_step(
            device, args.batch_size, args.steps, compiled
        )
        results[compiled] = milliseconds
        print(
            f"{mode}: {milliseconds:.3f} ms per step "
            f"({warmup_seconds:.1f} s for the first 3 steps); "
            f"{EPOCHS} epochs of {TRAINING_IMAGES:,} images: "
            f"{milliseconds * steps_per_run / 1000:.1f} s"
        )
    print(f"eager / compiled: {results[False] / results[True]:.2f}x")


if __name__ == "__main__":
    try:
        main()
    except common.ExperimentError as error:
        sys.exit(f"error: {error}")
