"""Times lenet_cpu.py against the PyTorch tutorial's DataLoader loop on the same CIFAR-10 files.

Both train the tutorial LeNet with batch size 4, SGD lr 0.001 momentum 0.9, on the CPU, for the same
number of epochs. Each is a whole fresh process (imports, data loading, training, test, outputs),
timed from start to exit; the best of --runs is kept. Prints both wall times, the ratio and both
test accuracies.

Both programs pay the same fixed costs (importing torch and torch.optim: about 4 s on a 2-core
machine), so a small dataset understates the difference in the training loop. --full-size repeats
the images of a smaller copy (such as a 5,000-image subset) up to CIFAR-10's 50,000 training and
10,000 test images, so that an epoch has the real number of steps.

    python benchmarks/lenet_cpu_speed.py --data-dir ./data --epochs 2
    python benchmarks/lenet_cpu_speed.py --data-dir ../shared/data/cifar10-subset --full-size
"""

import argparse
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

ACCURACY = re.compile(r"Accuracy of the network on the \d+ test images: ([\d.]+) %")


def timed_run(command):
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        sys.exit(f"error: {' '.join(command)} failed:\n{completed.stderr.strip()}")
    return seconds, float(ACCURACY.search(completed.stdout).group(1))


def write_full_size(source, target):
    """Copies a CIFAR-10 folder, repeating its images up to 10,000 per batch file (pickle layout
    kept)."""
    data = common.load_cifar10(source)
    target.mkdir(parents=True)
    for name, split in [(n, data.train) for n in common.FILES[:5]] + [(common.FILES[5], data.test)]:
        repeats = -(-10_000 // len(split))
        images = split.images.repeat(repeats, 1, 1, 1)[:10_000].reshape(10_000, -1).numpy()
        labels = split.labels.repeat(repeats)[:10_000].tolist()
        with open(target / name, "wb") as file:
            pickle.dump({"data": images, "labels": labels}, file)  # the keys torchvision reads
    meta = next(Path(source).rglob("batches.meta"), None)
    if meta:
        shutil.copy(meta, target / "batches.meta")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--data-dir", default="./data", help="folder holding cifar-10-batches-py")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs of each run")
    parser.add_argument(
        "--runs", type=int, default=1, help="runs of each program; the fastest counts"
    )
    parser.add_argument(
        "--full-size",
        action="store_true",
        help="repeat the images up to 50,000 training and 10,000 test images",
    )
    args = parser.parse_args()
    data_dir = str(Path(args.data_dir).resolve())
    with tempfile.TemporaryDirectory() as out_dir:
        if args.full_size:
            data_dir = str(Path(out_dir) / "full-size")
            write_full_size(args.data_dir, Path(data_dir) / common.FOLDER)
        programs = {
            "tutorial DataLoader loop": [
                sys.executable,
                "benchmarks/tutorial_lenet.py",
                "--data-dir",
                data_dir,
                "--epochs",
                str(args.epochs),
            ],
            "lenet_cpu.py": [
                sys.executable,
                "lenet_cpu.py",
                "--data-dir",
                data_dir,
                "--epochs",
                str(args.epochs),
                "--out-dir",
                str(Path(out_dir) / "out"),
            ],
        }
        results = {
            name: min(timed_run(command) for _ in range(args.runs))
            for name, command in programs.items()
        }
    (slow, slow_accuracy), (fast, fast_accuracy) = results.values()
    for name, (seconds, accuracy) in results.items():
        print(f"{name:26s} {seconds:7.2f} s wall   test accuracy {accuracy:.2f}%")
    print(
        f"speed-up: {slow / fast:.2f}x   "
        f"accuracy difference: {fast_accuracy - slow_accuracy:+.2f} points"
    )


if __name__ == "__main__":
    main()
