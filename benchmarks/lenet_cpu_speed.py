"""Times lenet_cpu.py against the PyTorch tutorial's DataLoader loop on the same CIFAR-10 files.

Both train the tutorial LeNet with batch size 4, SGD lr 0.001 momentum 0.9, on the CPU, for the same
number of epochs. Each is a whole fresh process (imports, data loading, training, test, outputs),
timed from start to exit; the best of --runs is kept. Prints both wall times, the ratio and both
test accuracies.

    python benchmarks/lenet_cpu_speed.py --data-dir ./data --epochs 2
"""

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ACCURACY = re.compile(r"Accuracy of the network on the \d+ test images: ([\d.]+) %")


def timed_run(command):
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        sys.exit(f"error: {' '.join(command)} failed:\n{completed.stderr.strip()}")
    return seconds, float(ACCURACY.search(completed.stdout).group(1))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", default="./data", help="folder holding cifar-10-batches-py")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs of each run")
    parser.add_argument("--runs", type=int, default=1, help="runs of each program; the fastest counts")
    args = parser.parse_args()
    data_dir = str(Path(args.data_dir).resolve())
    with tempfile.TemporaryDirectory() as out_dir:
        programs = {
            "tutorial DataLoader loop": [sys.executable, "benchmarks/tutorial_lenet.py", "--data-dir", data_dir,
                                         "--epochs", str(args.epochs)],
            "lenet_cpu.py": [sys.executable, "lenet_cpu.py", "--data-dir", data_dir, "--epochs", str(args.epochs),
                             "--out-dir", out_dir],
        }
        results = {name: min(timed_run(command) for _ in range(args.runs)) for name, command in programs.items()}
    (slow, slow_accuracy), (fast, fast_accuracy) = results.values()
    for name, (seconds, accuracy) in results.items():
        print(f"{name:26s} {seconds:7.2f} s wall   test accuracy {accuracy:.2f}%")
    print(f"speed-up: {slow / fast:.2f}x   accuracy difference: {fast_accuracy - slow_accuracy:+.2f} points")


if __name__ == "__main__":
    main()
