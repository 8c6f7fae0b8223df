"""Shared mechanics of the CIFAR-10 experiments: data, batches, training loop, command line, outputs.

Every experiment script keeps its model, its CONFIGS list and what is special about it; everything
they have in common lives here, once:

- `load_cifar10` reads the original `cifar-10-batches-py` pickle files (downloading them with
  torchvision when absent) and checks their structure; `Batches` holds a split as one normalized
  tensor on the training device and yields shuffled, optionally augmented batches from it.
- `Experiment` parses the shared command line, picks the device (DataParallel on several GPUs,
  DistributedDataParallel under torchrun), creates the run folder and trains each config with
  `Experiment.train`: per-epoch history, timing, checkpoints, `--resume`, a NaN guard, Ctrl-C.
- `evaluate`, the plots and the results summary.
"""

import argparse
import json
import math
import os
import pickle
import platform
import random
import shlex
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

    exit_code = 1


class Interrupted(ExperimentError):
    """Ctrl-C: finished epochs are saved, the message says how to resume."""

    exit_code = 130


def run_main(main):
    """Runs `main()` and exits with its status; user errors and Ctrl-C end with one line."""
    speaks = int(os.environ.get("RANK", 0)) == 0  # under torchrun, rank 0 alone
    try:
        status = main()
    except ExperimentError as error:
        if speaks:
            print(f"error: {error}", file=sys.stderr)
        status = error.exit_code
    except KeyboardInterrupt:
        if speaks:
            print("interrupted before training started; nothing was saved", file=sys.stderr)
        status = Interrupted.exit_code
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(status)


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
        mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(std, device=device).view(1, 3, 1, 1)
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
# Models, schedules, evaluation


def use_data_parallel(device, gpu_count, world_size=1):
    """DataParallel only when one process drives several visible GPUs (DDP handles the rest)."""
    return device.type == "cuda" and gpu_count > 1 and world_size == 1


def unwrap(model):
    """The plain module inside torch.compile, DataParallel and DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


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


def autocast(device):
    """bf16 autocast on GPUs; full precision on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(model, batches, per_class=False, flip_tta=False):
    """Accuracy in percent over every batch (summed over processes); with per_class, also a dict.

    flip_tta averages the predictions for each image and its mirror image (test-time augmentation).
    """
    model.eval()
    device = batches.labels.device
    correct = torch.zeros(len(CIFAR10_CLASSES), device=device, dtype=torch.long)
    total = torch.zeros(len(CIFAR10_CLASSES), device=device, dtype=torch.long)
    for images, labels in batches:
        with autocast(device):
            logits = model(images)
            if flip_tta:
                logits = logits.softmax(1) + model(images.flip(3)).softmax(1)
            predicted = logits.argmax(1)
        total.index_add_(0, labels, torch.ones_like(labels))  # per class, without a GPU sync
        correct.index_add_(0, labels, (predicted == labels).long())
    if dist.is_initialized():
        dist.all_reduce(correct)
        dist.all_reduce(total)
    accuracy = 100.0 * correct.sum().item() / max(1, total.sum().item())
    if not per_class:
        return accuracy
    classes = {name: 100.0 * c / max(1, t) for name, c, t in zip(CIFAR10_CLASSES, correct.tolist(), total.tolist())}
    return accuracy, classes


# ----------------------------------------------------------------------------------------------
# Files: atomic writes, plots


def atomic_write(path, write):
    """Calls write(temporary_path) and then renames it over `path`: readers never see half a file."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(descriptor)
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


# ----------------------------------------------------------------------------------------------
# Command line


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser(description, configs, device="auto", log_interval=0):
    """The command line every script shares; `configs` gives the valid --configs numbers."""
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
    return parser


def _positive(parser, args, names):
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, not {value}")


# ----------------------------------------------------------------------------------------------
# One run of a script: its configs, device, folder and results


class Experiment:
    """Parses the command line and trains the chosen configs into a new run folder.

    The folder is `<out-dir>/run_NNN/` (never an existing one, unless --resume continues the latest);
    each config writes `config_N/results.json`, `model.pth`, `checkpoint.pt` and `curves.png` there.
    Under torchrun only rank 0 prints and writes.
    """

    def __init__(self, script, configs, description, argv=None, device="auto", log_interval=0,
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        self.script = Path(script).name
        self.all_configs = configs
        parser = build_parser(description, configs, device, log_interval)
        self.args = args = parser.parse_args(argv)
        _positive(parser, args, ("epochs", "lr", "batch_size", "subset"))
        if args.list_configs:
            for number, config in enumerate(configs, 1):
                print(f"config_{number}: {config}")
            raise SystemExit(0)
        self.mean, self.std = mean, std
        self.rank, self.world_size, self.device = _setup_devices(args.device)
        self.is_main = self.rank == 0
        self.data_parallel = use_data_parallel(self.device, torch.cuda.device_count(), self.world_size)
        self.results = []
        self.out_dir = Path(args.out_dir or Path("modelset") / Path(script).stem)
        try:  # an unwritable folder is reported now, not after loading the data
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise self._unwritable(error) from None
        self._run_dir = self._broadcast(self._latest_run() if self.is_main else None) if args.resume else None

    # -- set-up --------------------------------------------------------------------------------

    def _unwritable(self, error):
        return ExperimentError(f"cannot write to output folder {self.out_dir} ({error.strerror}); "
                               f"choose another with --out-dir")

    def _runs(self):
        """(number, folder) of the runs already in the output folder, oldest first."""
        return sorted((int(p.name[4:]), p) for p in self.out_dir.glob("run_*") if p.name[4:].isdigit())

    def _latest_run(self):
        runs = self._runs()
        if not runs:
            raise ExperimentError(f"--resume: no run to continue in {self.out_dir}")
        print(f"resuming {runs[-1][1]}")
        return runs[-1][1]

    @property
    def run_dir(self):
        """This run's folder, made when training starts: a run that fails before leaves none behind."""
        if self._run_dir is None:
            self._run_dir = self._broadcast(self._new_run_dir() if self.is_main else None)
        return self._run_dir

    def _new_run_dir(self):
        runs = self._runs()
        number = runs[-1][0] + 1 if runs else 1
        while True:  # mkdir is atomic: two runs started together get different folders
            try:
                run_dir = self.out_dir / f"run_{number:03d}"
                run_dir.mkdir()
                print(f"writing to {run_dir}")
                return run_dir
            except FileExistsError:
                number += 1
            except OSError as error:
                raise self._unwritable(error) from None

    def _broadcast(self, value):
        if self.world_size > 1:
            holder = [value]
            dist.broadcast_object_list(holder, src=0)
            value = holder[0]
        return value

    def log(self, *message, error=False):
        if self.is_main:
            print(*message, file=sys.stderr if error else sys.stdout, flush=True)

    def configs(self):
        """Yields (name, config) for each chosen config, command-line overrides applied, seeded."""
        overrides = {"num_epochs": self.args.epochs, "lr": self.args.lr,
                     "momentum": self.args.momentum, "batch_size": self.args.batch_size}
        if self.args.dry_run:
            overrides["num_epochs"] = 1
        for number in self.args.configs or range(1, len(self.all_configs) + 1):
            config = dict(self.all_configs[number - 1])
            config.update({key: value for key, value in overrides.items() if value is not None})
            seed_everything(self.args.seed)
            yield f"config_{number}", config

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

    def prepare(self, model):
        """Moves the model to the device (channels_last on GPUs) and wraps it for several GPUs."""
        model = model.to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
            self.log(f"DistributedDataParallel over {self.world_size} processes ({self.device.type})")
        elif self.data_parallel:
            model = nn.DataParallel(model)
            self.log(f"DataParallel over {torch.cuda.device_count()} GPUs: "
                     + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
        else:
            self.log(f"training on {_device_name(self.device)}")
        return torch.compile(model) if self.args.compile else model

    def environment(self):
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
                "device": _device_name(self.device), "gpus": gpus, "cuda": torch.version.cuda,
                "cpu_threads": torch.get_num_threads(), "data_parallel": self.data_parallel,
                "world_size": self.world_size, "compile": self.args.compile, "seed": self.args.seed,
                "subset": self.args.subset, "dry_run": self.args.dry_run, "command": sys.argv}

    # -- training ------------------------------------------------------------------------------

    def train(self, name, config, model, optimizer, train_batches, test_batches, scheduler=None,
              criterion=None, val_batches=None, train_eval_batches=None):
        """Trains `model` for config["num_epochs"] epochs and returns its results dict.

        After every epoch: the test accuracy (the validation accuracy instead when val_batches is
        given; the test set is then evaluated once, at the end), with train_eval_batches the
        eval-mode training accuracy, a checkpoint and the results JSON. The scheduler is stepped
        after every batch. A NaN or infinite loss ends this config with status "diverged".
        """
        criterion = criterion or nn.CrossEntropyLoss()
        folder = self.run_dir / name
        result = {"name": name, "script": self.script, "status": "running", "config": config,
                  "validation": val_batches is not None, "history": [], "environment": self.environment()}
        start = self._restore(folder, config, model, optimizer, scheduler, result)
        if result["status"] != "running":  # it ended in the run being resumed
            self.results.append(result)
            return result
        if self.is_main:
            folder.mkdir(exist_ok=True)
        evaluated = val_batches or test_batches
        try:
            for epoch in range(start, config["num_epochs"]):
                train_batches.set_epoch(epoch)
                loss, accuracy, seconds = self._train_epoch(model, optimizer, scheduler, criterion,
                                                            train_batches, epoch)
                entry = {"epoch": epoch + 1, "train_loss": loss, "train_accuracy": accuracy}
                if train_eval_batches is not None:
                    entry["train_eval_accuracy"] = evaluate(model, train_eval_batches)
                entry["val_accuracy" if val_batches else "test_accuracy"] = evaluate(model, evaluated)
                entry["seconds"] = seconds
                result["history"].append(entry)
                if not math.isfinite(loss):
                    result["status"] = "diverged"
                    self.log(f"{name} diverged: the training loss is {loss} in epoch {epoch + 1}; "
                             f"try a lower learning rate than {config['lr']} (--lr)", error=True)
                    break
                self.log(f"{name} epoch {epoch + 1}/{config['num_epochs']}: loss {loss:.3f}, "
                         f"train {accuracy:.2f}%, {'val' if val_batches else 'test'} "
                         f"{entry.get('val_accuracy', entry.get('test_accuracy')):.2f}%, {seconds:.1f} s")
                self._checkpoint(folder, config, model, optimizer, scheduler, result)
        except KeyboardInterrupt:
            result["status"] = "interrupted"
            self._write_results(folder, result, plot=True)
            command = ("the same torchrun command with --resume" if self.world_size > 1 else
                       "python " + shlex.join([*sys.argv] + ([] if self.args.resume else ["--resume"])))
            raise Interrupted(f"interrupted in {name}; its {len(result['history'])} finished epochs are saved "
                              f"in {folder}; continue with: {command}") from None
        if result["status"] == "running":
            result["status"] = "completed"
            self._finish_config(folder, model, test_batches, result)
        self._write_results(folder, result, plot=True)
        self.results.append(result)
        return result

    def _train_epoch(self, model, optimizer, scheduler, criterion, batches, epoch):
        model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        logged_loss = 0.0
        interval = self.args.log_interval
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for number, (images, labels) in enumerate(batches, 1):
            with autocast(self.device):
                outputs = model(images)
                loss = criterion(outputs, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            loss_sum += loss.detach()
            correct += (outputs.detach().argmax(1) == labels).sum()
            if interval and number % interval == 0:  # the tutorial's running loss
                total = loss_sum.item()
                self.log(f"[{epoch + 1}, {number:5d}] loss: {(total - logged_loss) / interval:.3f}")
                logged_loss = total
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        totals = torch.stack([loss_sum.double(), correct.double(),
                              torch.tensor(float(len(batches)), device=self.device, dtype=torch.float64)])
        if dist.is_initialized():
            dist.all_reduce(totals)
        loss_total, correct_total, batch_count = totals.tolist()
        images = batch_count * batches.batch_size
        return loss_total / batch_count, 100.0 * correct_total / images, seconds

    def _finish_config(self, folder, model, test_batches, result):
        last = result["history"][-1]
        if result["validation"]:
            result["final_val_accuracy"] = last["val_accuracy"]
            result["final_test_accuracy"] = evaluate(model, test_batches)
        else:
            result["final_test_accuracy"] = last["test_accuracy"]
        # eval-mode accuracy on the training images where it was measured, else the running one
        result["final_train_accuracy"] = last.get("train_eval_accuracy", last["train_accuracy"])
        result["train_test_gap"] = result["final_train_accuracy"] - result["final_test_accuracy"]
        if self.is_main:
            save_torch(folder / "model.pth", unwrap(model).state_dict())

    def _write_results(self, folder, result, plot=False):
        result["train_seconds"] = sum(entry["seconds"] for entry in result["history"])
        if self.is_main:
            write_json(folder / "results.json", result)
            if plot and result["history"]:
                plot_curves(result, folder / "curves.png")

    def _checkpoint(self, folder, config, model, optimizer, scheduler, result):
        if not self.is_main:
            return
        state = {"config": config, "epoch": len(result["history"]), "history": result["history"],
                 "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict() if scheduler is not None else None,
                 "rng": _rng_state()}
        save_torch(folder / "checkpoint.pt", state)
        self._write_results(folder, result)

    def _restore(self, folder, config, model, optimizer, scheduler, result):
        """With --resume: continues from the config's checkpoint, or skips a config that ended."""
        if not self.args.resume or not (folder / "results.json").exists():
            return 0
        saved = json.loads((folder / "results.json").read_text())
        if saved["config"] != config:
            raise ExperimentError(f"--resume: {folder} was run with {saved['config']}, not {config}; "
                                  f"start a new run instead")
        if saved["status"] in ("completed", "diverged"):
            self.log(f"{result['name']}: already {saved['status']} in {folder}, skipped")
            if saved["status"] == "completed":
                unwrap(model).load_state_dict(torch.load(folder / "model.pth", map_location=self.device))
            result.update(saved)
            return 0
        if not (folder / "checkpoint.pt").exists():
            return 0
        state = torch.load(folder / "checkpoint.pt", map_location=self.device, weights_only=False)
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        result["history"] = state["history"]
        self.log(f"{result['name']}: resuming after epoch {state['epoch']}")
        return state["epoch"]

    def annotate(self, result, **figures):
        """Adds figures measured after training (e.g. a weight norm) to a completed config's results."""
        if result["status"] != "completed":
            return
        result.setdefault("extra", {}).update(figures)
        self._write_results(self.run_dir / result["name"], result)

    # -- end of the run --------------------------------------------------------------------------

    def finish(self, compare_key=None):
        """Prints the results summary, writes summary.json and the comparison plots; exit status."""
        if self.is_main and self.results:
            summary = [{key: value for key, value in r.items() if key not in ("history", "environment")}
                       for r in self.results]
            write_json(self.run_dir / "summary.json", summary)
            finished = [r for r in self.results if r["history"]]
            if len(finished) > 1:
                plot_test_accuracy(finished, self.run_dir / "test_accuracy.png")
            if compare_key and all("train_eval_accuracy" in r["history"][-1] for r in finished):
                plot_train_vs_test(finished, self.run_dir / "train_vs_test.png", compare_key)
            print(f"\nResults ({self.run_dir}):")
            for result in self.results:
                print(summary_line(result))
        failed = [r["name"] for r in self.results if r["status"] != "completed"]
        if failed:
            self.log(f"not completed: {', '.join(failed)}", error=True)
        return 1 if failed else 0


def summary_line(result):
    """The report's form: config_N: Configuration: {...} Final test accuracy: xx.xx% Training time: ..."""
    if result["status"] != "completed":
        outcome = f"{result['status'].upper()} after {len(result['history'])} epochs"
    else:
        outcome = (f"Final test accuracy: {result['final_test_accuracy']:.2f}% "
                   f"Train-test gap: {result['train_test_gap']:.2f} points")
    extra = "".join(f" {key}: {value}" for key, value in result.get("extra", {}).items())
    return (f"{result['name']}: Configuration: {result['config']} {outcome} "
            f"Training time: {result['train_seconds']:.2f} seconds{extra}")


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
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


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
