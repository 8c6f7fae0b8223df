"""Helpers shared by the CIFAR-10 experiment scripts: data, batches, evaluation, command line, outputs.

Each script holds its own experiment (model, CONFIGS, optimizer, the epoch loop, DataParallel and
the timing) and calls these helpers by name:

- Data: `load_cifar10` reads the original `cifar-10-batches-py` pickle files (downloading them with
  torchvision when absent) and checks their structure; `Batches` holds a split as one normalized
  tensor on the training device and yields shuffled, optionally augmented batches from it.
- Training: `train_one_epoch` (the per-batch step several scripts share), `evaluate`, `lr_factor`,
  `clock` (seconds, after waiting for the GPU), `distributed` (DDP under torchrun).
- The run: `parse_args` (the shared command line), `Run` (device, run folder, configs, summary) and
  `Record` (one config's history, checkpoints, --resume, the NaN guard), `run_main` (exit status,
  Ctrl-C and SIGTERM).
- Files and pictures: atomic JSON, checkpoint and PNG writes, the curves of a run.
"""

import argparse
import json
import math
import os
import pickle
import platform
import random
import shlex
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

CIFAR10_CLASSES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"


class ExperimentError(Exception):
    """A problem the user can fix: printed as one line, without a traceback."""


class Stopped(KeyboardInterrupt):
    """SIGTERM (kill, a job scheduler, a container stop), handled like Ctrl-C."""

    signal_number = signal.SIGTERM


def _raise_stopped(signal_number, frame):
    raise Stopped()


def run_main(main):
    """Runs `main()` and exits with its status.

    A user error ends with one `error:` line (exit 1). Ctrl-C (exit 130) and SIGTERM (exit 143) mark
    the config in training as interrupted and say what is saved and how to continue. Under torchrun,
    rank 0 alone prints.
    """
    sigterm = signal.getsignal(signal.SIGTERM)
    if sigterm == signal.SIG_DFL:  # a run told to ignore SIGTERM keeps ignoring it
        signal.signal(signal.SIGTERM, _raise_stopped)
    speaks = int(os.environ.get("RANK", 0)) == 0
    Run.active = None
    try:
        status = main()
    except ExperimentError as error:
        if speaks:
            print(f"error: {error}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt as interruption:
        message = _interruption_message(Run.active)
        if speaks:
            print(message, file=sys.stderr)
        status = 128 + getattr(interruption, "signal_number", signal.SIGINT)
    signal.signal(signal.SIGTERM, sigterm)
    if dist.is_initialized():
        _exit_torchrun_process(status)
    sys.exit(status)


def _exit_torchrun_process(status):
    """Leaves the process group and ends the process without Python's interpreter shutdown.

    DistributedDataParallel keeps the gloo process group, and its worker threads, alive past
    destroy_process_group (a reference held in C++). A worker thread drops its reference to a
    collective's tensors just after waking the caller, and dropping a tensor that Python also held
    takes the GIL; during interpreter shutdown that kills the thread inside a noexcept destructor,
    so the process aborted ("terminate called without an active exception") whenever it reached
    shutdown within moments of its last collective. Every file is written and closed by now.
    """
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


# ----------------------------------------------------------------------------------------------
# CIFAR-10 files


@dataclass
class Split:
    """Images as uint8 (N, 3, 32, 32) and labels as int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self):
        return len(self.labels)

    def head(self, count):
        return Split(self.images[:count], self.labels[:count])


@dataclass
class Cifar10:
    train: Split
    test: Split


def load_cifar10(data_dir, download=True):
    """Loads CIFAR-10 from `data_dir` (the folder holding `cifar-10-batches-py`, or that folder).

    Files that are present are accepted when they are structurally sound, whatever their checksum;
    a missing folder is downloaded (torchvision checks the archive's md5). Every failure raises
    ExperimentError with what is wrong and how to fix it.
    """
    data_dir = Path(data_dir).resolve()
    folder = data_dir if (data_dir / TRAIN_FILES[0]).exists() else data_dir / CIFAR10_FOLDER
    if not folder.is_dir():
        if not download:
            raise ExperimentError(f"no CIFAR-10 in {data_dir}: expected {folder}")
        _download_cifar10(data_dir)
    train = _concatenate([_read_batch(folder, name) for name in TRAIN_FILES])
    return Cifar10(train=train, test=_read_batch(folder, TEST_FILE))


def _download_cifar10(data_dir):
    print(f"CIFAR-10 not found in {data_dir}: downloading {CIFAR10_URL}")
    try:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(
            CIFAR10_URL, str(data_dir), filename=CIFAR10_ARCHIVE, md5=CIFAR10_ARCHIVE_MD5
        )
    except Exception as error:  # offline, refused, corrupt archive: all end the same way
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ExperimentError(
            f"could not download CIFAR-10 into {data_dir} ({reason}); put {CIFAR10_ARCHIVE} "
            f"(from https://www.cs.toronto.edu/~kriz/cifar.html) or its extracted "
            f"{CIFAR10_FOLDER} folder in {data_dir}, or pass --data-dir"
        ) from None


def _read_batch(folder, name):
    path = folder / name
    fix = f"replace {folder} with a fresh copy of {CIFAR10_FOLDER} or pass --data-dir"
    if not path.is_file():
        raise ExperimentError(f"CIFAR-10 file {name} is missing in {folder}; {fix}")
    try:
        with open(path, "rb") as file:
            batch = pickle.load(file, encoding="bytes")
        data = np.asarray(batch.get(b"data", batch.get("data")))
        labels = np.asarray(batch.get(b"labels", batch.get("labels")))
    except Exception as error:  # truncated or foreign file: any unpickling error
        raise ExperimentError(f"cannot read CIFAR-10 file {path} ({type(error).__name__}); {fix}") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ExperimentError(f"{path} is not a CIFAR-10 batch: data is {data.dtype} {data.shape}; {fix}")
    if labels.shape != (len(data),) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise ExperimentError(f"{path} is not a CIFAR-10 batch: {labels.size} labels for {len(data)} images; {fix}")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return Split(images, torch.from_numpy(labels.astype(np.int64)))


def _concatenate(splits):
    return Split(torch.cat([s.images for s in splits]), torch.cat([s.labels for s in splits]))


def split_validation(train, fraction):
    """Holds out the last `fraction` of the training images as a validation split."""
    held_out = round(len(train) * fraction)
    if not 0 < held_out < len(train):
        raise ExperimentError(f"validation fraction {fraction} leaves no training or validation images")
    keep = len(train) - held_out
    return Split(train.images[:keep], train.labels[:keep]), Split(train.images[keep:], train.labels[keep:])


# ----------------------------------------------------------------------------------------------
# Batches held on the device


def random_crop_flip(padded, size, generator):
    """Crops each image of a padded batch at its own random offset and flips half of them."""
    count, _, height, width = padded.shape
    device = padded.device
    top = torch.randint(0, height - size + 1, (count, 1), device=device, generator=generator)
    left = torch.randint(0, width - size + 1, (count, 1), device=device, generator=generator)
    steps = torch.arange(size, device=device)
    rows, columns = (top + steps)[:, :, None], (left + steps)[:, None, :]
    # (count, size, size, channels): already the channels_last layout once permuted back
    crops = padded[torch.arange(count, device=device)[:, None, None], :, rows, columns].permute(0, 3, 1, 2)
    flip = torch.rand(count, device=device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(3), crops)


class Batches:
    """Yields (images, labels) batches of a split held as one normalized tensor on `device`.

    Training batches are shuffled with a new permutation each epoch (seeded by seed and epoch, so a
    resumed run sees the same order), sharded across distributed processes and, with `augment`,
    cropped (4-pixel reflect padding) and flipped per image. The incomplete last batch is dropped in
    training and kept in evaluation.
    """

    def __init__(self, split, batch_size, device, mean, std, train=False, augment=False, seed=0,
                 rank=0, world_size=1, max_batches=None):
        if train and batch_size > len(split) // world_size:
            raise ExperimentError(
                f"batch size {batch_size} is larger than the {len(split) // world_size} training images "
                f"per process; lower --batch-size or raise --subset"
            )
        self.mean = mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        images = split.images.to(device).float().mul_(1 / (255 * std)).sub_(mean / std)  # (x/255 - mean)/std
        self.padding = 4 if augment else 0
        self.images = F.pad(images, (self.padding,) * 4, mode="reflect") if augment else images
        self.labels = split.labels.to(device)
        self.batch_size, self.train, self.augment = batch_size, train, augment
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.max_batches = max_batches
        self.epoch = 0
        self.generator = torch.Generator(device=device)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _epoch_seed(self):
        """Depends on the seed and the epoch alone, so a resumed run draws what it would have drawn."""
        return self.seed * 1_000_003 + self.epoch * 2

    def _order(self):
        """This process's image indices for the epoch; None for evaluation in one process (all, in order)."""
        if not self.train:
            if self.world_size == 1:
                return None
            return torch.arange(self.rank, len(self.labels), self.world_size, device=self.labels.device)
        generator = torch.Generator().manual_seed(self._epoch_seed())
        order = torch.randperm(len(self.labels), generator=generator)
        per_rank = len(order) // self.world_size  # equal shards keep DDP processes in step
        return order[self.rank::self.world_size][:per_rank].to(self.labels.device)

    def __len__(self):
        if self.train:
            batches = len(self.labels) // self.world_size // self.batch_size
        else:
            batches = math.ceil(len(range(self.rank, len(self.labels), self.world_size)) / self.batch_size)
        return min(batches, self.max_batches or batches)

    def __iter__(self):
        order = self._order()
        self.generator.manual_seed(self._epoch_seed() + 1)  # augmentation: its own stream
        for number in range(len(self)):
            batch = slice(number * self.batch_size, (number + 1) * self.batch_size)
            index = batch if order is None else order[batch]
            images = self.images[index]
            if self.augment:
                images = random_crop_flip(images, images.shape[-1] - 2 * self.padding, self.generator)
            yield images, self.labels[index]


# ----------------------------------------------------------------------------------------------
# Training and evaluation


def distributed(model, device):
    """DistributedDataParallel for a process launched by torchrun (one GPU, or the CPU, per process)."""
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def gpus_driven(device, visible_gpus, world_size=1):
    """GPUs one process drives: every visible one in a single process, its own one under torchrun.

    More than one is where a script wraps its model in nn.DataParallel.
    """
    return visible_gpus if device.type == "cuda" and world_size == 1 else 1


def unwrap(model):
    """The plain module inside torch.compile, DataParallel and DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def autocast(device):
    """bf16 autocast on GPUs; full precision on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def clock(device):
    """time.perf_counter() once the GPU has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def sum_over_processes(tensor):
    """The tensor summed over every torchrun process (itself in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def train_one_epoch(model, batches, optimizer, criterion, scheduler=None, log_interval=0, epoch=0, progress=None):
    """One pass of SGD steps; returns the mean training loss and the training accuracy in percent.

    Each step: forward (bf16 autocast on GPUs), loss, zero_grad, backward, optimizer step and, when
    given, the per-batch scheduler step. Sums stay on the device, so a GPU is never waited for
    inside the epoch; with log_interval the running loss is printed as the PyTorch tutorial does,
    and `progress` (Record.progress) prints a line every half minute of a long epoch.
    """
    model.train()
    device = batches.labels.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    logged_loss = 0.0
    for number, (images, labels) in enumerate(batches, 1):
        with autocast(device):
            outputs = model(images)
            loss = criterion(outputs, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach()
        correct += (outputs.detach().argmax(1) == labels).sum()
        if log_interval and number % log_interval == 0 and is_main_process():
            total = loss_sum.item()
            print(f"[{epoch + 1}, {number:5d}] loss: {(total - logged_loss) / log_interval:.3f}", flush=True)
            logged_loss = total
        if progress is not None:
            progress.update(number)
    count = torch.tensor(float(len(batches)), device=device, dtype=torch.float64)
    loss_total, correct_total, batch_count = sum_over_processes(
        torch.stack([loss_sum.double(), correct.double(), count])).tolist()
    return loss_total / batch_count, 100.0 * correct_total / (batch_count * batches.batch_size)


@torch.no_grad()
def confusion_matrix(model, batches, flip_tta=False):
    """Counts of (true class, predicted class) over every batch, summed over processes: (10, 10) int64.

    flip_tta averages the predictions for each image and its mirror image (test-time augmentation).
    """
    model.eval()
    device = batches.labels.device
    classes = len(CIFAR10_CLASSES)
    counts = torch.zeros(classes * classes, device=device, dtype=torch.long)
    for images, labels in batches:
        with autocast(device):
            logits = model(images)
            if flip_tta:
                logits = logits.softmax(1) + model(images.flip(3)).softmax(1)
        counts.index_add_(0, labels * classes + logits.argmax(1), torch.ones_like(labels))  # no GPU sync
    return sum_over_processes(counts).view(classes, classes).cpu()


def evaluate(model, batches, per_class=False, flip_tta=False):
    """Accuracy in percent over every batch (summed over processes); with per_class, also a dict."""
    counts = confusion_matrix(model, batches, flip_tta)
    return (accuracy(counts), per_class_accuracy(counts)) if per_class else accuracy(counts)


def accuracy(counts):
    """Accuracy in percent from a confusion matrix: its diagonal over all its counts."""
    return 100.0 * counts.diag().sum().item() / max(1, counts.sum().item())


def per_class_accuracy(counts):
    """{class name: accuracy in percent} from a confusion matrix (rows: true classes)."""
    return {name: 100.0 * correct / max(1, total)
            for name, correct, total in zip(CIFAR10_CLASSES, counts.diag().tolist(), counts.sum(1).tolist())}


@torch.no_grad()
def first_predictions(model, batches, count=32):
    """The first `count` images of `batches` (unnormalized, on the CPU), their labels and predictions."""
    model.eval()
    images, labels = next(iter(batches))
    images, labels = images[:count], labels[:count]
    with autocast(images.device):
        predicted = model(images).argmax(1)
    pixels = (images.float() * batches.std + batches.mean).clamp(0, 1)
    return pixels.cpu(), labels.cpu(), predicted.cpu()


def lr_factor(step, total_steps, schedule="constant", warmup_steps=0, steps_per_epoch=1, step_epochs=20, gamma=0.5):
    """Learning-rate multiplier at optimizer step `step` (0-based) for the named schedule.

    constant; cosine (to 0 after a linear warm-up); linear (warm-up, then linear decay to 0, the
    one-cycle shape); step (x gamma every `step_epochs` epochs, like StepLR(20, 0.5)).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if schedule == "linear":
        return max(0.0, 1 - progress)
    if schedule == "step":
        return gamma ** (step // (step_epochs * steps_per_epoch))
    raise ExperimentError(f"unknown schedule {schedule!r}: use constant, cosine, linear or step")


# ----------------------------------------------------------------------------------------------
# Files: atomic writes, plots


def atomic_write(path, write):
    """Calls write(temporary_path) and then renames it over `path`: readers never see half a file."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(descriptor)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp's files are private; results are as readable as any file
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_json(path, data):
    atomic_write(path, lambda temporary: Path(temporary).write_text(json.dumps(data, indent=2) + "\n"))


def save_torch(path, data):
    atomic_write(path, lambda temporary: torch.save(data, temporary))


def _plot(path, panels, same_scale=False):
    """Saves a row of panels, each (title, y label, [(label, epochs, values), ...])."""
    from matplotlib.figure import Figure  # no pyplot: no display, and a faster import

    figure = Figure(figsize=(5.5 * len(panels), 4), layout="tight")
    axes = []
    for number, (title, ylabel, lines) in enumerate(panels, 1):
        axis = figure.add_subplot(1, len(panels), number, sharey=axes[0] if same_scale and axes else None)
        axes.append(axis)
        for label, epochs, values in lines:
            axis.plot(epochs, values, label=label, marker="." if len(epochs) < 30 else None)
        axis.set(title=title, xlabel="epoch", ylabel=ylabel)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=110, format="png"))


def _series(result, key):
    history = [entry for entry in result["history"] if entry.get(key) is not None]
    return [entry["epoch"] for entry in history], [entry[key] for entry in history]


def plot_curves(result, path):
    """Loss and train/test accuracy per epoch of one config."""
    evaluated = "val_accuracy" if result.get("validation") else "test_accuracy"
    accuracy = [(key.replace("_accuracy", "").replace("_", " "), *_series(result, key))
                for key in ("train_accuracy", "train_eval_accuracy", evaluated) if _series(result, key)[0]]
    _plot(path, [(f"{result['name']}: training loss", "loss", [("train", *_series(result, "train_loss"))]),
                 (f"{result['name']}: accuracy", "accuracy (%)", accuracy)])


def plot_test_accuracy(results, path):
    """Overlays the test (or validation) accuracy curves of several configs."""
    lines = [(r["name"], *_series(r, "val_accuracy" if r.get("validation") else "test_accuracy")) for r in results]
    _plot(path, [("accuracy of every config", "accuracy (%)", lines)])


def plot_train_vs_test(results, path, key):
    """One panel per config: train against test accuracy, the gap between them is overfitting."""
    panels = []
    for result in results:
        lines = [("train (eval mode)", *_series(result, "train_eval_accuracy")),
                 ("test", *_series(result, "test_accuracy"))]
        panels.append((f"{result['name']}: {key}={result['config'][key]}", "accuracy (%)", lines))
    _plot(path, panels, same_scale=True)


def plot_confusion(counts, path, title):
    """The confusion matrix as counts, with each true class's accuracy beside its row."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.2, 6), layout="tight")
    axis = figure.add_subplot()
    image = axis.imshow(counts.numpy(), cmap="Blues")
    figure.colorbar(image, ax=axis, shrink=0.8, label="test images")
    class_accuracy = per_class_accuracy(counts)
    ticks = range(len(CIFAR10_CLASSES))
    axis.set_xticks(ticks, CIFAR10_CLASSES, rotation=45)
    axis.set_yticks(ticks, [f"{name} {class_accuracy[name]:.0f}%" for name in CIFAR10_CLASSES])
    darkest = counts.max().item()
    for (row, column), count in np.ndenumerate(counts.numpy()):
        axis.text(column, row, count, ha="center", va="center", fontsize=7,
                  color="white" if count > darkest / 2 else "black")
    axis.set(title=f"{title}: {accuracy(counts):.2f}% correct", xlabel="predicted class",
             ylabel="true class (its accuracy)")
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=100, format="png"))


def plot_predictions(images, labels, predicted, path, title, columns=8):
    """A grid of test images (torchvision's make_grid) with true and predicted labels, wrong ones in red."""
    from matplotlib.figure import Figure
    from torchvision.utils import make_grid

    gap = 12  # pixels around each 32-pixel image: room for its label above it
    grid = make_grid(images, nrow=columns, padding=gap, pad_value=1.0)
    height, width = grid.shape[1:]
    figure = Figure(figsize=(width * 3 / 100, height * 3 / 100))
    axis = figure.add_axes((0, 0, 1, 1))
    axis.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    for index, (label, guess) in enumerate(zip(labels.tolist(), predicted.tolist())):
        row, column = divmod(index, columns)
        axis.text(gap + column * (32 + gap) + 16, gap + row * (32 + gap) - 1.5,
                  f"{CIFAR10_CLASSES[label]}: {CIFAR10_CLASSES[guess]}", ha="center", va="bottom", fontsize=8,
                  color="black" if label == guess else "red")
    axis.set_axis_off()
    axis.set_title(f"{title}  (true: predicted, wrong in red)", fontsize=10)
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=100, format="png", bbox_inches="tight"))


# ----------------------------------------------------------------------------------------------
# Command line


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows a default only where there is one to show (no "(default: None)")."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(description, configs, argv=None, device="auto", log_interval=0):
    """The command line every script shares; `configs` gives the valid --configs numbers.

    --list-configs prints the numbered configs and exits.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    parser.add_argument("--configs", type=int, nargs="+", metavar="N", choices=range(1, len(configs) + 1),
                        help=f"config numbers to run, 1 to {len(configs)} (default: all)")
    parser.add_argument("--list-configs", action="store_true", help="print the numbered configs and exit")
    parser.add_argument("--epochs", type=int, help="override num_epochs of the chosen configs")
    parser.add_argument("--lr", type=float, help="override the learning rate of the chosen configs")
    parser.add_argument("--momentum", type=float, help="override the momentum of the chosen configs")
    parser.add_argument("--batch-size", type=int, help="override the batch size of the chosen configs")
    parser.add_argument("--data-dir", default="./data", help="folder holding cifar-10-batches-py")
    parser.add_argument("--out-dir", help="output folder (default: modelset/<script name>)")
    parser.add_argument("--subset", type=int, metavar="N", help="use N training and at most N test images")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=device, help="training device")
    parser.add_argument("--seed", type=int, default=1, help="random seed")
    parser.add_argument("--log-interval", type=int, default=log_interval, metavar="B",
                        help="print the running loss every B batches (0: only once per epoch)")
    parser.add_argument("--compile", action="store_true", help="compile the model with torch.compile")
    parser.add_argument("--resume", action="store_true", help="continue the latest run in --out-dir")
    parser.add_argument("--dry-run", action="store_true", help="one epoch of two batches per config")
    args = parser.parse_args(argv)
    for name in ("epochs", "lr", "batch_size", "subset"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, not {value}")
    if args.list_configs:
        for number, config in enumerate(configs, 1):
            print(f"config_{number}: {config}")
        raise SystemExit(0)
    return args


def is_main_process():
    """True except in the torchrun processes of rank > 0, which neither print nor write files."""
    return not dist.is_initialized() or dist.get_rank() == 0


# ----------------------------------------------------------------------------------------------
# One run of a script: its device, folder, configs and results


class Run:
    """One run of a script: the device, the run folder, the chosen configs and their results.

    The folder is `<out-dir>/run_NNN/`, made when the first config starts (never an existing one,
    unless --resume continues the latest); each config writes `config_N/` there (see `Record`).
    Under torchrun each process joins the process group; only rank 0 prints and writes.
    """

    active = None  # the run in progress, for run_main's interruption message

    def __init__(self, script, args, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        self.script, self.args, self.mean, self.std = Path(script).name, args, mean, std
        self.rank, self.world_size, self.device = _setup_devices(args.device)
        self.is_main = self.rank == 0
        self.gpu_count = gpus_driven(self.device, torch.cuda.device_count(), self.world_size)
        self.records = []
        self.planned_epochs = self.epochs_done = 0  # over every chosen config, for the time left
        self.estimated = False  # whether Progress has judged the length of the run yet
        self.out_dir = Path(args.out_dir or Path("modelset") / Path(script).stem)
        try:  # an unwritable folder is reported now, not after loading the data
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise _unwritable(self.out_dir, error) from None
        self._run_dir = None  # made when the first config starts, unless --resume continues the latest
        if args.resume:
            self._run_dir = _from_rank_zero(_latest_run_dir(self.out_dir) if self.is_main else None)
        self.log(f"training on {describe_devices(self)}")
        Run.active = self

    @property
    def run_dir(self):
        """This run's folder, made when training starts: a run that fails before leaves none behind."""
        if self._run_dir is None:
            self._run_dir = _from_rank_zero(_new_run_dir(self.out_dir) if self.is_main else None)
        return self._run_dir

    def log(self, *message, error=False):
        if self.is_main:
            print(*message, file=sys.stderr if error else sys.stdout, flush=True)

    def configs(self, configs):
        """Yields (name, config) for each chosen config, command-line overrides applied, seeded."""
        overrides = {"num_epochs": self.args.epochs, "lr": self.args.lr,
                     "momentum": self.args.momentum, "batch_size": self.args.batch_size}
        if self.args.dry_run:
            overrides["num_epochs"] = 1
        overrides = {key: value for key, value in overrides.items() if value is not None}
        chosen = [(f"config_{number}", {**configs[number - 1], **overrides})
                  for number in self.args.configs or range(1, len(configs) + 1)]
        self.planned_epochs = sum(config["num_epochs"] for _, config in chosen)
        for name, config in chosen:
            seed_everything(self.args.seed)
            yield name, config

    def epochs_left(self):
        """Epochs of the chosen configs not trained yet, the one in progress included."""
        return self.planned_epochs - self.epochs_done

    def load_data(self):
        """CIFAR-10 as uint8 tensors (rank 0 downloads first), cut to --subset."""
        if not self.is_main:
            dist.barrier()
        data = load_cifar10(self.args.data_dir)
        if self.is_main and self.world_size > 1:
            dist.barrier()
        if self.args.subset:
            data = Cifar10(data.train.head(self.args.subset), data.test.head(self.args.subset))
        self.log(f"CIFAR-10: {len(data.train)} training and {len(data.test)} test images")
        return data

    def batches(self, split, batch_size, train=False, augment=False):
        """Batches of `split` on this run's device; training batches are sharded across processes."""
        if train and batch_size % self.world_size:
            raise ExperimentError(f"batch size {batch_size} does not split over {self.world_size} processes")
        per_process = batch_size // self.world_size if train else batch_size
        return Batches(split, per_process, self.device, self.mean, self.std, train=train, augment=augment,
                       seed=self.args.seed, rank=self.rank, world_size=self.world_size,
                       max_batches=2 if self.args.dry_run else None)

    def place(self, model):
        """The model on this run's device (channels_last on GPUs); DistributedDataParallel under torchrun."""
        model = model.to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        return distributed(model, self.device) if self.world_size > 1 else model

    def compile(self, model):
        """torch.compile(model) with --compile, else the model as it is."""
        return torch.compile(model) if self.args.compile else model

    def record(self, name, config, model, optimizer, scheduler=None, validation=False, reported=None):
        """The bookkeeping of one config (see Record); with --resume it continues from the checkpoint.

        reported: the report's figures for this config ({"test_accuracy": %, "train_seconds": s}), to
        be printed and saved beside ours.
        """
        record = Record(self, name, config, model, optimizer, scheduler, validation, reported)
        self.records.append(record)
        return record

    def finish(self, compare_key=None):
        """Prints the results summary, writes summary.json and the comparison plots; the exit status."""
        results = [record.result for record in self.records]
        if self.is_main and results:
            write_summary(self.run_dir, results, compare_key)
        failed = [r["name"] for r in results if r["status"] != "completed"]
        if failed:
            self.log(f"not completed: {', '.join(failed)}", error=True)
        elif self.is_main and results and not self.args.dry_run:
            point_latest(self.out_dir, self.run_dir)
        return 1 if failed else 0


def point_latest(out_dir, run_dir):
    """`<out-dir>/latest` leads to run_dir: a relative symlink, or a file holding its name where the
    file system allows no links. Replaced atomically; the run folders themselves are not touched."""
    latest = out_dir / "latest"
    temporary = out_dir / f".latest.{os.getpid()}"
    try:
        os.symlink(run_dir.name, temporary, target_is_directory=True)
    except OSError:
        atomic_write(latest, lambda path: Path(path).write_text(run_dir.name + "\n"))
        return
    os.replace(temporary, latest)


def write_summary(run_dir, results, compare_key=None):
    """summary.json, the plots comparing the configs, and the report's summary lines on stdout."""
    summary = [{key: value for key, value in r.items() if key not in ("history", "environment")} for r in results]
    write_json(run_dir / "summary.json", summary)
    finished = [r for r in results if r["history"]]
    if len(finished) > 1:
        plot_test_accuracy(finished, run_dir / "test_accuracy.png")
    if compare_key and all("train_eval_accuracy" in r["history"][-1] for r in finished):
        plot_train_vs_test(finished, run_dir / "train_vs_test.png", compare_key)
    print(f"\nResults ({run_dir}):")
    for result in results:
        print(summary_line(result))


def _interruption_message(run):
    """Marks the config in training as interrupted; says what is saved and how to go on."""
    if run is None or run._run_dir is None:
        return "interrupted before training started; nothing was saved"
    current = run.records[-1] if run.records and run.records[-1].status == "running" else None
    saved = [f"{r.name} {r.status}" for r in run.records if r is not current]
    if current is not None:
        saved.append(current.mark_interrupted())
    return (f"interrupted; saved in {run.run_dir}: {', '.join(saved) or 'no finished epoch'}; "
            f"continue with: {resume_command(run)}")


def _from_rank_zero(value):
    """Rank 0's value in every torchrun process."""
    if dist.is_initialized():
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        value = holder[0]
    return value


def resume_command(run):
    """The command that continues this run."""
    if run.world_size > 1:
        return "the same torchrun command with --resume"
    return "python " + shlex.join([*sys.argv] + ([] if run.args.resume else ["--resume"]))


def _unwritable(out_dir, error):
    return ExperimentError(f"cannot write to output folder {out_dir} ({error.strerror}); "
                           f"choose another with --out-dir")


def _runs(out_dir):
    """(number, folder) of the runs already in the output folder, oldest first."""
    return sorted((int(p.name[4:]), p) for p in out_dir.glob("run_*") if p.name[4:].isdigit())


def _latest_run_dir(out_dir):
    runs = _runs(out_dir)
    if not runs:
        raise ExperimentError(f"--resume: no run to continue in {out_dir}")
    print(f"resuming {runs[-1][1]}")
    return runs[-1][1]


def _new_run_dir(out_dir):
    runs = _runs(out_dir)
    number = runs[-1][0] + 1 if runs else 1
    while True:  # mkdir is atomic: two runs started together get different folders
        try:
            run_dir = out_dir / f"run_{number:03d}"
            run_dir.mkdir()
            print(f"writing to {run_dir}")
            return run_dir
        except FileExistsError:
            number += 1
        except OSError as error:
            raise _unwritable(out_dir, error) from None


def summary_line(result):
    """The report's form: config_N: Configuration: {...} Final test accuracy: xx.xx% Training time: ..."""
    if result["status"] != "completed":
        outcome = f"{result['status'].upper()} after {len(result['history'])} epochs"
    else:
        outcome = (f"Final test accuracy: {result['final_test_accuracy']:.2f}% "
                   f"Train-test gap: {result['train_test_gap']:.2f} points")
    extra = "".join(f" {key}: {value}" for key, value in result.get("extra", {}).items())
    versus = result.get("versus_report")
    if versus:
        reported = result["reported"]
        extra += f" | report: {reported['test_accuracy']:.2f}% ({versus['test_accuracy_points']:+.2f} points)"
        if "time_ratio" in versus:
            extra += f", {reported['train_seconds']:.0f} s (ours {versus['time_ratio']:.2f}x)"
    return (f"{result['name']}: Configuration: {result['config']} {outcome} "
            f"Training time: {result['train_seconds']:.2f} seconds{extra}")


class Progress:
    """Plain progress lines inside long epochs, and early word of how long a run will take.

    Every `interval` seconds of an epoch: batches done, images/s and the time left in the epoch and
    in the run at this epoch's pace. Seconds into a CPU run that would take more than `long_run`
    seconds at that pace, one line says so and how to make a short run.
    """

    interval = 30.0
    first_look = 5.0  # seconds into a run before judging its length
    long_run = 600.0

    def __init__(self, record, epoch, batches):
        self.record, self.epoch, self.batches = record, epoch, batches
        self.started = time.perf_counter()
        # early in a CPU run: is it a long one? (a GPU's first seconds are warm-up and compilation)
        self.judging = not record.run.estimated and record.run.device.type == "cpu"
        self.next_report = self.started + (self.first_look if self.judging else self.interval)

    def update(self, done):
        """Called after each batch with the number done; prints when a line is due."""
        now = time.perf_counter()
        if now < self.next_report:
            return
        self.next_report = now + self.interval
        run, total = self.record.run, len(self.batches)
        per_batch = (now - self.started) / done
        epoch_left = per_batch * (total - done)
        run_left = epoch_left + per_batch * total * (run.epochs_left() - 1)
        if self.judging:
            self.judging, run.estimated = False, True
            if run_left > self.long_run:
                run.log(f"at this pace the run takes about {duration(run_left)}; for a short run, "
                        f"add --subset 5000 --epochs 2 (or fewer --configs)")
            return
        images_per_second = done * self.batches.batch_size * run.world_size / (now - self.started)
        run.log(f"{self.record.name} epoch {self.epoch + 1}/{self.record.config['num_epochs']}: {done}/{total} "
                f"batches, {images_per_second:,.0f} images/s, {duration(epoch_left)} left in the epoch, "
                f"{duration(run_left)} in the run")


def duration(seconds):
    """A time span as a person reads it: 45 s, 12 min, 2 h 05 min."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 120 else f"{minutes // 60} h {minutes % 60:02d} min"


class Record:
    """The results of one config in `<run folder>/config_N/`: history, checkpoint, results.json, curves.

    The script's epoch loop trains the epochs that `epochs()` yields and hands each one's figures to
    `add_epoch`, which writes results.json and a complete checkpoint (model, optimizer, scheduler,
    random states, history): an interruption loses at most the epoch in progress. `finish` adds the
    final figures and model.pth. With --resume the config goes on from its checkpoint, or is skipped
    when it ended. A NaN or infinite loss ends the config with status "diverged".
    """

    def __init__(self, run, name, config, model, optimizer, scheduler=None, validation=False, reported=None):
        self.run, self.name, self.config = run, name, config
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.folder = run.run_dir / name
        self.result = {"name": name, "script": run.script, "status": "running", "config": config,
                       "validation": validation, "reported": reported, "history": [],
                       "environment": _environment(run)}
        self.start_epoch = _restore(self) if run.args.resume else 0
        run.epochs_done += self.start_epoch
        self.started = time.perf_counter()
        if run.is_main:
            self.folder.mkdir(exist_ok=True)

    @property
    def status(self):
        return self.result["status"]

    @property
    def train_seconds(self):
        """Seconds spent in training epochs so far (evaluation and checkpoints not counted)."""
        return sum(entry["seconds"] for entry in self.result["history"])

    def epochs(self):
        """The 0-based epochs still to train; it stops early when the config diverges."""
        for epoch in range(self.start_epoch, self.config["num_epochs"]):
            if self.status != "running":
                return
            yield epoch

    def progress(self, epoch, batches):
        """The progress lines of this epoch (see Progress): the training loop calls update(batches done)."""
        return Progress(self, epoch, batches)

    def add_epoch(self, train_loss, train_accuracy, seconds, **accuracies):
        """Records an epoch's figures, prints them and saves the checkpoint and results.json."""
        history = self.result["history"]
        history.append({"epoch": len(history) + 1, "train_loss": train_loss, "train_accuracy": train_accuracy,
                        **accuracies, "seconds": seconds})
        self.run.epochs_done += 1
        if not math.isfinite(train_loss):
            self.result["status"] = "diverged"
            self.run.epochs_done += self.config["num_epochs"] - len(history)  # never to be trained
            self.run.log(f"{self.name} diverged: the training loss is {train_loss} in epoch {len(history)}; "
                         f"try a lower learning rate than {self.config['lr']} (--lr)", error=True)
            self._write_results(plot=True)
            return
        evaluated = "val" if self.result["validation"] else "test"
        epoch_wall_time = (time.perf_counter() - self.started) / (len(history) - self.start_epoch)
        self.run.log(f"{self.name} epoch {len(history)}/{self.config['num_epochs']}: loss {train_loss:.3f}, "
                     f"train {train_accuracy:.2f}%, {evaluated} {accuracies[evaluated + '_accuracy']:.2f}%, "
                     f"{seconds:.1f} s; {duration(epoch_wall_time * self.run.epochs_left())} left in the run")
        if self.run.is_main:
            save_torch(self.folder / "checkpoint.pt", _checkpoint(self))
        self._write_results()

    def finish(self, test_batches, **extra):
        """After the last epoch: final figures (and `extra` ones), model.pth, results.json and pictures.

        The final test accuracy is the last epoch's; after validation epochs the test set is evaluated
        here, once. The test set's confusion matrix goes into results.json and confusion.png, the
        first test images with their predictions into predictions.png. A config that ended before
        --resume is left as it is.
        """
        if self.status != "running" or not self.result["history"]:
            return
        counts = confusion_matrix(self.model, test_batches)
        self.result.update(_final_figures(self.result, counts, self.train_seconds))
        if extra:
            self.result["extra"] = extra
        self.result["status"] = "completed"
        if self.run.is_main:
            save_torch(self.folder / "model.pth", unwrap(self.model).state_dict())
            title = f"{self.run.script} {self.name}"
            plot_confusion(counts, self.folder / "confusion.png", title)
            plot_predictions(*first_predictions(unwrap(self.model), test_batches), self.folder / "predictions.png",
                             title)
        self._write_results(plot=True)

    def mark_interrupted(self):
        """Saves the interrupted status; returns what is saved, for the interruption message."""
        self.result["status"] = "interrupted"
        self._write_results(plot=True)
        return f"{self.name} after {len(self.result['history'])} of {self.config['num_epochs']} epochs"

    def _write_results(self, plot=False):
        self.result["train_seconds"] = self.train_seconds
        if self.run.is_main:
            write_json(self.folder / "results.json", self.result)
            if plot and self.result["history"]:
                plot_curves(self.result, self.folder / "curves.png")


def _final_figures(result, counts, train_seconds):
    """The final accuracies, the train-test gap, the test confusion matrix and the comparison with the report."""
    last = result["history"][-1]
    figures = {"final_val_accuracy": last["val_accuracy"]} if result["validation"] else {}
    figures["final_test_accuracy"] = accuracy(counts) if result["validation"] else last["test_accuracy"]
    # eval-mode accuracy on the training images where it was measured, else the running one
    figures["final_train_accuracy"] = last.get("train_eval_accuracy", last["train_accuracy"])
    figures["train_test_gap"] = figures["final_train_accuracy"] - figures["final_test_accuracy"]
    figures["per_class_test_accuracy"] = per_class_accuracy(counts)
    figures["confusion_matrix"] = counts.tolist()  # rows: true classes, columns: predicted
    reported = result.get("reported") or {}
    if "test_accuracy" in reported:
        figures["versus_report"] = {"test_accuracy_points": figures["final_test_accuracy"] - reported["test_accuracy"]}
        if "train_seconds" in reported:
            figures["versus_report"]["time_ratio"] = train_seconds / reported["train_seconds"]
    return figures


def _checkpoint(record):
    """Everything --resume needs to go on as if never stopped."""
    return {"config": record.config, "epoch": len(record.result["history"]), "history": record.result["history"],
            "model": unwrap(record.model).state_dict(), "optimizer": record.optimizer.state_dict(),
            "scheduler": record.scheduler.state_dict() if record.scheduler is not None else None,
            "rng": _rng_state()}


def _restore(record):
    """With --resume: the epoch to continue from, after loading the config's saved state.

    Every file that cannot be used ends the script with one line naming it and what to do; nothing
    in the run folder is changed before that.
    """
    folder, name, config = record.folder, record.name, record.config
    results_file, checkpoint_file = folder / "results.json", folder / "checkpoint.pt"
    fix = f"start a new run (without --resume), or delete {folder} to train {name} again"
    if not results_file.exists():
        if checkpoint_file.exists():
            raise ExperimentError(f"--resume: {checkpoint_file} has no results.json beside it; {fix}")
        return 0
    try:
        saved = json.loads(results_file.read_text())
        status, history, saved_config = saved["status"], saved["history"], saved["config"]
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as error:
        raise ExperimentError(f"--resume: {results_file} is damaged ({type(error).__name__}); {fix}") from None
    if saved.get("script", record.run.script) != record.run.script:
        raise ExperimentError(f"--resume: {results_file} was written by {saved['script']}, "
                              f"not {record.run.script}; {fix}")
    if saved_config != config:
        raise ExperimentError(f"--resume: {folder} was run with {saved_config}, not {config}; {fix}")
    if status in ("completed", "diverged"):
        record.run.log(f"{name}: already {status} in {folder}, skipped")
        if status == "completed":
            _load_state(record, folder / "model.pth", fix, lambda state: unwrap(record.model).load_state_dict(state))
        record.result.update(saved)
        return config["num_epochs"]
    if not checkpoint_file.exists():
        if history:
            raise ExperimentError(f"--resume: {results_file} lists {len(history)} epochs but {checkpoint_file} "
                                  f"is missing; {fix}")
        return 0
    state = _load_state(record, checkpoint_file, fix, lambda state: _load_checkpoint(record, state, fix))
    record.result["history"] = state["history"]
    record.run.log(f"{name}: resuming after epoch {state['epoch']}")
    return state["epoch"]


def _load_state(record, path, fix, load):
    """torch.load(path), then load(state); an unreadable file or a state of another model is an error."""
    if not path.is_file():
        raise ExperimentError(f"--resume: {path} is missing; {fix}")
    try:
        state = torch.load(path, map_location=record.run.device, weights_only=False)
    except Exception as error:  # truncated, not a torch file, unpickling error
        raise ExperimentError(f"--resume: {path} is damaged ({type(error).__name__}); {fix}") from None
    try:
        load(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExperimentError(f"--resume: {path} does not fit {record.name} of {record.run.script} "
                              f"({reason}); {fix}") from None
    return state


def _load_checkpoint(record, state, fix):
    if state["config"] != record.config:
        raise ExperimentError(f"--resume: {record.folder / 'checkpoint.pt'} is of config {state['config']}, "
                              f"not {record.config}; {fix}")
    unwrap(record.model).load_state_dict(state["model"])
    record.optimizer.load_state_dict(state["optimizer"])
    if record.scheduler is not None:
        record.scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])


def _environment(run):
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "device": _device_name(run.device), "gpus": gpus, "cuda": torch.version.cuda,
            "cpu_threads": torch.get_num_threads(), "data_parallel": run.gpu_count > 1,
            "world_size": run.world_size, "compile": run.args.compile, "seed": run.args.seed,
            "subset": run.args.subset, "dry_run": run.args.dry_run, "command": sys.argv}


# ----------------------------------------------------------------------------------------------
# Devices, seeds, random states


def _setup_devices(choice):
    """(rank, world_size, device); joins the torchrun process group when launched by torchrun."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ExperimentError("--device cuda: no CUDA GPU is visible; use --device cpu")
    use_cuda = choice == "cuda" or (choice == "auto" and torch.cuda.is_available())
    torch.backends.cudnn.benchmark = use_cuda  # fixed image sizes: let cuDNN time and keep its fastest kernels
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1, torch.device("cuda" if use_cuda else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def describe_devices(run):
    """What trains: torchrun processes, several GPUs of one process, one GPU or the CPU."""
    if run.world_size > 1:
        return f"{run.world_size} torchrun processes ({_device_name(run.device)} in rank {run.rank})"
    if run.gpu_count > 1:
        return f"{run.gpu_count} GPUs: " + ", ".join(torch.cuda.get_device_name(i) for i in range(run.gpu_count))
    return _device_name(run.device)


def _device_name(device):
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every GPU


def _rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
