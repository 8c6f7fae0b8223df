"""Helpers every CIFAR-10 script here needs alike: data, evaluation, the run folder, files, plots.

A script holds its experiment (model, CONFIGS, REPORTED, optimizer, training step, epoch loop,
timing) and calls, in its main(): parse_args; `with Run(...) as run:` (Ctrl-C inside saves what is
trained); run.load_data(); per config from run.configs(), a Record, its resume(), then per epoch
record.meter() (which seeds the epoch's draws), the steps between two clock() readings, the
evaluations up to a third, record.add_epoch(); record.finish(); run.finish().

A run writes <out-dir>/run_NNN/ at its first saved epoch: run.json, summary.json, plots and per
config config_N/ with model.pth, checkpoint.pt (--resume), results.json (README.md) and pictures.
"""

import argparse
import codecs
import contextlib
import io
import json
import math
import os
import pickle
import platform
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zlib
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

try:
    import fcntl  # locks a run folder; Windows has none, and runs there go without
except ImportError:
    fcntl = None

STARTED = time.perf_counter()  # a run's wall time counts from here
CLASSES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FOLDER = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
REPORT_DATA = Path(__file__).resolve().parent / "report"  # the report's published figures
WARMUP_STEPS = 3  # a config's first steps in a process, timed apart from its training time
BLOWN_UP_LOSS = 100.0  # a mean loss above it: the true class's probability below e**-100
RESULT_KEYS = {"name", "script", "status", "config", "history", "train_seconds", "environment"}
STOPPING_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))
Split = namedtuple("Split", "images labels")  # uint8 (N, 3, 32, 32) and int64 (N,)
Cifar10 = namedtuple("Cifar10", "train test")

# ----------------------------------------------------------------------------------------------
# Errors and exit


class ExperimentError(Exception):
    """A problem the user can fix: one `error:` line, no traceback."""


class DamagedFile(ExperimentError):
    """A saved file that cannot be used: its path and why."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


class Stopped(KeyboardInterrupt):
    """SIGTERM (kill, a job scheduler) or SIGHUP (a closed terminal), handled like Ctrl-C."""

    def __init__(self, signal_number):
        super().__init__()
        self.status = 128 + signal_number  # the exit status


def _stopping_errors():
    """What ends a script with one line (a full disk, a refused folder, torch.compile's failure)."""
    from torch._dynamo.exc import TorchDynamoException

    return ExperimentError, KeyboardInterrupt, OSError, TorchDynamoException


def _raise_stopped(signal_number, frame):
    raise Stopped(signal_number)


@contextlib.contextmanager
def _stops_ignored():
    """Ctrl-C and the stopping signals ignored inside the block: a second Ctrl-C while saving."""
    handlers = {n: signal.signal(n, signal.SIG_IGN) for n in (signal.SIGINT, *STOPPING_SIGNALS)}
    try:
        yield
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)


def exit_status(stop):
    """(exit status, first line) of the exception `stop` that ended a script."""
    if isinstance(stop, BrokenPipeError):  # stdout's reader has gone: 141, as SIGPIPE's
        return 141, "interrupted: the output was closed"
    if isinstance(stop, (ExperimentError, OSError)):
        return 1, f"error: {stop}"
    if not isinstance(stop, KeyboardInterrupt):
        return 1, f"error: --compile failed ({first_line(stop)}); run without --compile"
    return getattr(stop, "status", 130), "interrupted"


def run_main(main):
    """Runs main() and exits with its status: 1 after an `error:` line, 130 on Ctrl-C, 143 on
    SIGTERM, 129 on SIGHUP, 141 when the output's reader has gone (`| head`). The line adds what is
    saved and how to go on, as the Run the exception left says (its `saved`)."""
    before = {number: signal.getsignal(number) for number in STOPPING_SIGNALS}
    for number, handler in before.items():
        if handler == signal.SIG_DFL:  # a run told to ignore a signal (nohup) keeps ignoring it
            signal.signal(number, _raise_stopped)
    # lines as they come, also into a pipe or a file; a character the output cannot show is escaped
    sys.stdout.reconfigure(line_buffering=True, errors="backslashreplace")
    sys.stderr.reconfigure(errors="backslashreplace")
    try:
        status = main()
    except _stopping_errors() as stop:
        with _stops_ignored():
            status, cause = exit_status(stop)
            if isinstance(stop, BrokenPipeError):  # Python's last flush of stdout must not fail
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            saved = getattr(stop, "saved", None)
            if saved:
                cause += f"\n{saved}" if status == 1 else f"; {saved}"
            elif status != 1:
                cause += " before a first epoch was saved; nothing was saved"
            with contextlib.suppress(OSError):  # stderr may be closed too
                print(cause, file=sys.stderr, flush=True)
    for number, handler in before.items():
        signal.signal(number, handler)
    sys.exit(status)


def first_line(error):
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def duration(seconds):
    """A time span as a person reads it: 45 s, 12 min 05 s, 2 h 05 min."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{round(seconds) // 60} min {round(seconds) % 60:02} s"
    return f"{round(seconds / 60) // 60} h {round(seconds / 60) % 60:02} min"


def code_version(script):
    """{"commit": the git commit of the script's checkout, "changed": whether its tracked files
    differ from it}: a result names the code that made it. None values outside git."""
    git = ["git", "-C", str(Path(script).resolve().parent)]
    with contextlib.suppress(OSError, subprocess.SubprocessError):  # no git on this machine
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
        changed = subprocess.run([*git, "diff", "--quiet", "HEAD", "--"], capture_output=True)
        if commit.returncode == 0:
            return {"commit": commit.stdout.strip(), "changed": changed.returncode != 0}
    return {"commit": None, "changed": None}


# ----------------------------------------------------------------------------------------------
# Command line


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument error is one line, without argparse's usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def _checked(kind, test, requirement):
    """An argparse type: kind(text) when it passes `test`, else one line naming `requirement`."""
    def parse(text):
        with contextlib.suppress(ValueError):
            if test(kind(text)):
                return kind(text)
        raise argparse.ArgumentTypeError(f"must be {requirement}, not {text!r}")

    return parse


positive_int = _checked(int, lambda v: v > 0, "a positive whole number")
count_or_zero = _checked(int, lambda v: v >= 0, "0 or more")
fraction = _checked(float, lambda v: 0 < v < 1, "above 0, below 1")
momentum = _checked(float, lambda v: 0 <= v < 1, "at least 0, below 1")
positive_number = _checked(float, lambda v: 0 < v < math.inf, "a positive finite number")
seed = _checked(int, lambda v: 0 <= v < 2**32, "0 to 2**32 - 1")
nonempty = _checked(str, bool, "a path")


def parse_args(description, configs, argv=None, device="auto", log_interval=0, threads=None):
    """The command line every script shares; `configs` gives the valid --configs numbers. `threads`:
    the script's default number of CPU threads (None: one per core); OMP_NUM_THREADS, when set,
    takes its place, and --threads over both."""
    parser = OneLineErrorParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    threads = None if os.environ.get("OMP_NUM_THREADS") else threads
    numbers = range(1, len(configs) + 1)
    add("--configs", type=int, nargs="+", metavar="N", choices=numbers, help="(default: all)")
    add("--list-configs", action="store_true", help="print the numbered configs and exit")
    add("--epochs", type=positive_int, help="override num_epochs of the chosen configs")
    add("--lr", type=positive_number, help="override lr")
    add("--momentum", type=momentum, help="override momentum")
    add("--batch-size", type=positive_int, help="override batch_size (the whole batch)")
    add("--val-fraction", type=fraction, metavar="F", help="hold out the last F of the training")
    add("--data-dir", type=nonempty, default="./data", help="CIFAR-10 folder (default: ./data)")
    add("--out-dir", type=nonempty, help="output folder (default: modelset/<script name>)")
    add("--subset", type=positive_int, metavar="N", help="N training and at most N test images")
    add("--device", choices=("auto", "cpu", "cuda"), default=device, help=f"(default: {device})")
    add("--seed", type=seed, default=1, help="(default: 1)")
    log_help = f"print the running loss every B batches, 0 for never (default: {log_interval})"
    add("--log-interval", type=count_or_zero, default=log_interval, metavar="B", help=log_help)
    add("--compile", action="store_true", help="compile the model with torch.compile")
    threads_help = f"CPU threads (default: {threads or 'OMP_NUM_THREADS, else one per core'})"
    add("--threads", type=positive_int, default=threads, metavar="N", help=threads_help)
    resume_help = "continue run folder RUN (run_NNN, or a path); alone, the newest unfinished run"
    add("--resume", nargs="?", const="", metavar="RUN", help=resume_help)
    add("--dry-run", action="store_true", help="one epoch of two batches per config")
    add("--evaluate", type=nonempty, metavar="MODEL_PTH", help="test saved weights, and exit")
    args = parser.parse_args(argv)
    if args.configs and len(set(args.configs)) < len(args.configs):
        parser.error(f"argument --configs: each config once, not {args.configs}")
    if args.list_configs:
        print("\n".join(f"config_{number}: {config}" for number, config in enumerate(configs, 1)))
        raise SystemExit(0)
    return args


def pick_device(args):
    """--device: cpu, cuda (refused with one line when no GPU is visible), or auto."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ExperimentError("--device cuda: no CUDA GPU is visible; use --device cpu")
    return torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------------------------
# Data


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what CIFAR-10's files hold (numpy arrays, dicts, lists, bytes, str, numbers): a
    pickle asking for anything else, such as a function to call, is refused before it runs."""

    rebuild = np.empty(0).__reduce__()[0]  # numpy's array rebuilder, whatever its module is called
    allowed = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
        ("numpy.core.multiarray", "_reconstruct"): rebuild,
        ("numpy._core.multiarray", "_reconstruct"): rebuild,
    }

    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, not in a CIFAR-10 file")
        return self.allowed[module, name]


def load_cifar10(data_dir):
    """CIFAR-10 from the folder holding cifar-10-batches-py, or that folder; extracted from the
    archive there or downloaded first (md5 checked) when absent; read safely and checked."""
    from torchvision.datasets.utils import check_integrity, download_and_extract_archive

    try:
        data_dir = Path(data_dir).resolve()
    except (OSError, RuntimeError) as error:  # a symlink loop (RuntimeError before Python 3.13)
        raise ExperimentError(f"--data-dir {data_dir}: {first_line(error)}") from None
    if data_dir.is_file():
        raise ExperimentError(f"--data-dir {data_dir} is a file; pass the folder holding {FOLDER}")
    folder = data_dir if (data_dir / FILES[0]).exists() else data_dir / FOLDER
    archive = data_dir / ARCHIVE
    if not folder.is_dir() and archive.is_file() and not check_integrity(archive, ARCHIVE_MD5):
        raise ExperimentError(f"{archive} is damaged (not the official md5); delete it")
    if not folder.is_dir():
        url = f"https://www.cs.toronto.edu/~kriz/{ARCHIVE}"
        print(f"CIFAR-10 not found in {data_dir}: {archive if archive.is_file() else url}")
        try:
            download_and_extract_archive(url, str(data_dir), filename=ARCHIVE, md5=ARCHIVE_MD5)
        except Exception as error:  # offline, refused, cut short: all end the same way
            raise ExperimentError(
                f"could not download CIFAR-10 into {data_dir} ({first_line(error)}); put {ARCHIVE}"
                f" (https://www.cs.toronto.edu/~kriz/cifar.html) or {FOLDER} there, or pass "
                f"--data-dir") from None
    *train, test = [_read_batch(folder / name) for name in FILES]
    return Cifar10(Split(*(torch.cat(tensors) for tensors in zip(*train))), test)


def _read_batch(path):
    """One batch file as a Split; one line, saying what it holds, for a file that is missing,
    damaged or not in CIFAR-10's layout."""
    fix = f"replace {path.parent} with a fresh copy of {FOLDER}, or pass --data-dir"
    try:
        with open(path, "rb") as file:
            batch = _CifarUnpickler(file, encoding="bytes").load()
        batch = {key.decode() if isinstance(key, bytes) else key: v for key, v in batch.items()}
        data = np.asarray(batch["data"])
        labels = np.asarray(batch["labels"])
        integers = labels.dtype.kind in "iu" and labels.size > 0
        values = f" from {labels.min()} to {labels.max()}" if integers else ""
        if not (data.dtype == np.uint8 and data.shape[1:] == (3072,) and integers
                and labels.shape == (len(data),) and 0 <= labels.min() <= labels.max() <= 9):
            raise ValueError(f"{len(data)} images of {data.dtype} {data.shape[1:]}, {labels.size} "
                             f"labels of type {labels.dtype}{values}: not CIFAR-10's layout")
    except FileNotFoundError:
        raise ExperimentError(f"CIFAR-10 file {path.name} is missing in {path.parent}; {fix}")
    except Exception as error:  # cut short, foreign, refused by the unpickler, not the layout
        raise ExperimentError(f"cannot read CIFAR-10 file {path} ({first_line(error)}); {fix}")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return Split(images, torch.from_numpy(labels.astype(np.int64)))


def hold_out(split, fraction):
    """(training part, validation part) of `split`: its last `fraction` held out, so that an epoch
    or a setting can be picked without the test set; the validation part is None for 0."""
    if not fraction:
        return split, None
    keep = len(split.labels) - round(len(split.labels) * fraction)
    if keep < 1 or keep == len(split.labels):
        raise ExperimentError(f"a validation fraction of {fraction} leaves {keep} of "
                              f"{len(split.labels)} training images to train on: change it")
    train = Split(split.images[:keep], split.labels[:keep])
    return train, Split(split.images[keep:], split.labels[keep:])


class Batches:
    """A split as one normalized tensor, (x / 255 - mean) / std, on `device`. Iterating yields every
    image in order; epoch(n) yields epoch n's training batches (every image, the last batch short,
    as a DataLoader's), shuffled by a permutation seeded by the seed and n alone."""

    def __init__(self, split, batch_size, device, mean, std, seed=0):
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)  # kept to show the images
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        scale = 1 / (255 * self.std)
        self.images = split.images.to(device).float().mul_(scale).sub_(self.mean / self.std)
        self.labels = split.labels.to(device)
        self.batch_size = batch_size
        self.seed = seed
        self.steps = math.ceil(len(self.labels) / batch_size)  # of a training epoch

    def __iter__(self):
        return zip(self.images.split(self.batch_size), self.labels.split(self.batch_size))

    def epoch(self, epoch):
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, "order"))
        order = torch.randperm(len(self.labels), generator=generator)
        for index in order.to(self.labels.device).split(self.batch_size):
            yield self.images[index], self.labels[index]


# ----------------------------------------------------------------------------------------------
# Evaluation and timing


@torch.no_grad()
def confusion_matrix(model, batches):
    """Counts of (true class, predicted class) over every batch, (10, 10) int64; eval mode only."""
    if model.training:
        raise RuntimeError("call model.eval() before evaluating: Dropout and BatchNorm differ")
    counts = torch.zeros(100, device=batches.labels.device, dtype=torch.long)
    for images, labels in batches:  # summed on the device: no GPU sync per batch
        counts.index_add_(0, labels * 10 + model(images).argmax(1), torch.ones_like(labels))
    return counts.view(10, 10).cpu()


def evaluate(model, batches):
    """Accuracy in percent over every batch; the model in eval mode."""
    return accuracy(confusion_matrix(model, batches))


def accuracy(counts):
    return 100.0 * counts.diag().sum().item() / max(1, counts.sum().item())


def per_class_accuracy(counts):
    """{class name: accuracy in percent} from a confusion matrix (rows: true classes)."""
    pairs = zip(CLASSES, counts.diag().tolist(), counts.sum(1).tolist())
    return {name: 100.0 * right / max(1, total) for name, right, total in pairs}


def clock(device):
    """time.perf_counter() once every visible GPU has finished its queued work: nn.DataParallel
    runs replicas on all of them, and waiting for the first alone would miss the others."""
    if device.type == "cuda":
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)
    return time.perf_counter()


def epoch_seed(seed, epoch, stream):
    """The seed of one epoch's draws: stream "order" for its batches (Batches.epoch), "draws" for
    torch's generator (dropout masks, crops, flips; Record.meter seeds it). It depends on the seed
    and the epoch alone, so a resumed run draws what an uninterrupted one would."""
    return seed * 1_000_003 + epoch * 2 + ("order", "draws").index(stream)


def unwrap(model):
    """The plain module inside torch.compile and nn.DataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.DataParallel) else model


def evaluate_saved(args, model, mean, std):
    """--evaluate PATH: saved weights (a state_dict; a DataParallel or DDP "module." prefix is
    dropped) on the test set: the accuracy, per class, and the figure results.json beside them
    records. Returns the exit status."""
    def load(state):
        model.load_state_dict({key.removeprefix("module."): v for key, v in state.items()})

    try:
        load_saved(Path(args.evaluate), load)
    except DamagedFile as error:
        raise ExperimentError(f"--evaluate {error}") from None
    device = pick_device(args)
    test = load_cifar10(args.data_dir).test
    test = Split(test.images[: args.subset], test.labels[: args.subset])
    counts = confusion_matrix(model.to(device).eval(), Batches(test, 1000, device, mean, std))
    print(f"{args.evaluate}: test accuracy {accuracy(counts):.2f}% on {len(test.labels)} images")
    for name, value in per_class_accuracy(counts).items():
        print(f"  {name:5s} {value:.1f}%")
    recorded_in = Path(args.evaluate).parent / "results.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # none beside the weights
        recorded = json.loads(recorded_in.read_text())
        print(f"recorded in {recorded_in}: {recorded['final_test_accuracy']:.2f}% on "
              f"{recorded['data']['test_images']} test images")
    return 0


def report_curve(file_name, key):
    """The report's test accuracy after every epoch of one config, from its published results in
    report/ (report/README.md names their source)."""
    return json.loads((REPORT_DATA / file_name).read_text())[key]["test_accuracies"]


# ----------------------------------------------------------------------------------------------
# The run: device, configs, folder and lock, resume, summary


class Run:
    """One run of a script: its device, the chosen configs and its run folder <out-dir>/run_NNN/
    (made at its first saved epoch, or the one --resume continues; locked while in use). In
    `with Run(...) as run:`, Ctrl-C saves what is trained. mean, std: the batches' normalization;
    short_run: options suggested when a CPU run would take long; data_parallel: the script wraps
    its model in nn.DataParallel when gpu_count > 1 (every visible GPU; else 1)."""

    def __init__(self, script, args, mean, std, short_run="", data_parallel=False):
        self.script = Path(script).name
        self.args = args
        self.mean = mean
        self.std = std
        self.short_run = short_run
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise ExperimentError(f"start {self.script} with python, not torchrun: "
                                  f"nn.DataParallel drives every GPU")
        self.device = pick_device(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.backends.cudnn.benchmark = self.device.type == "cuda"  # fixed sizes: timed once
        several = data_parallel and self.device.type == "cuda"
        self.gpu_count = torch.cuda.device_count() if several else 1
        if args.compile and self.gpu_count > 1:
            raise ExperimentError("--compile cannot reach nn.DataParallel's replicas (each runs "
                                  "in its own thread): drop it, or set CUDA_VISIBLE_DEVICES=0")
        _check_tools(self.device, args.compile)
        self.out_dir = Path(args.out_dir or Path("modelset") / Path(script).stem)
        existing = self.out_dir  # must be a folder this can write in: nothing is made yet
        while not os.path.lexists(existing) and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise ExperimentError(f"--out-dir {self.out_dir}: {existing} is not a folder this can "
                                  f"write in")
        options = ("epochs", "lr", "momentum", "batch_size", "val_fraction", "subset", "dry_run")
        self.changed = [option for option in options if getattr(args, option)]  # not the report's
        self.code = code_version(script)
        self.records = {}  # name: Record, of this process
        self.chosen = []  # (name, config) of the chosen configs
        self.data = {}  # what load_data() loaded: recorded, and checked on resume
        self.estimating = self.device.type == "cpu"  # a GPU step is not waited for
        self.run_dir = self._resumed_run_dir() if args.resume is not None else None
        self._lock = _lock(self.run_dir) if self.run_dir else None
        cuda = self.device.type == "cuda"
        self.gpus = [torch.cuda.get_device_name(i) for i in range(self.gpu_count) if cuda]
        cpu = f"cpu ({platform.machine()}, threads: {torch.get_num_threads()})"
        self.describe = ", ".join(self.gpus) or cpu
        print(f"training on {self.describe}")

    def load_data(self):
        """CIFAR-10 as uint8 tensors, cut to --subset; its fingerprint in self.data."""
        subset = slice(self.args.subset)  # all with None
        data = Cifar10(*(Split(s.images[subset], s.labels[subset])
                         for s in load_cifar10(self.args.data_dir)))
        labels = torch.cat([data.train.labels, data.test.labels])
        images_crc32 = zlib.crc32(data.train.images.numpy().tobytes())
        self.data = {
            "train_images": len(data.train.labels),
            "test_images": len(data.test.labels),
            "labels_crc32": zlib.crc32(labels.numpy().tobytes()),
            "images_crc32": zlib.crc32(data.test.images.numpy().tobytes(), images_crc32),
        }
        print(f"CIFAR-10: {self.data['train_images']} training and {self.data['test_images']} "
              f"test images")
        return data

    def configs(self, configs):
        """(name, config) of each chosen config (--configs, else all), the overrides applied."""
        args = self.args
        overrides = {"num_epochs": 1 if args.dry_run else args.epochs, "lr": args.lr,
                     "momentum": args.momentum, "batch_size": args.batch_size,
                     "val_fraction": args.val_fraction}
        given = {key: value for key, value in overrides.items() if value is not None}
        numbers = args.configs or range(1, len(configs) + 1)
        self.chosen = [(f"config_{number}", configs[number - 1] | given) for number in numbers]
        yield from self.chosen

    def batches(self, split, batch_size):
        """Batches of `split` on this run's device; with --dry-run, two batches of it."""
        if self.args.dry_run:
            split = Split(split.images[: 2 * batch_size], split.labels[: 2 * batch_size])
        return Batches(split, batch_size, self.device, self.mean, self.std, self.args.seed)

    def epochs_left(self):
        """Epochs still to train in the chosen configs: this process's records, else what the
        configs' results.json in the run folder list."""
        left = 0
        for name, config in self.chosen:
            result = self.records[name].result if name in self.records else {"history": []}
            if name not in self.records and self.run_dir:
                with contextlib.suppress(ExperimentError):
                    result = load_saved(self.run_dir / name / "results.json")
            finished = result.get("status") in ("completed", "diverged")
            left += 0 if finished else config["num_epochs"] - len(result["history"])
        return left

    def folder(self):
        """The run folder, made at a run's first saved epoch with its run.json, and locked."""
        if self.run_dir is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            numbers = [int(p.name[4:]) for p in self.out_dir.glob("run_*") if p.name[4:].isdigit()]
            number = max(numbers, default=0)
            while self.run_dir is None:  # mkdir is atomic: two runs started together get two
                number += 1
                with contextlib.suppress(FileExistsError):
                    (self.out_dir / f"run_{number:03d}").mkdir()
                    self.run_dir = self.out_dir / f"run_{number:03d}"
            self._lock = _lock(self.run_dir)
            made_by = {"script": self.script, "command": sys.argv, "code": self.code}
            write_json(self.run_dir / "run.json", made_by)
            print(f"writing to {self.run_dir}")
        return self.run_dir

    def finish(self, compare_key=None):
        """Prints the summary and writes summary.json and the comparison plots, unless no config
        changed (a finished run resumed); returns the exit status."""
        results = [record.result for record in self.records.values()]
        if any(record.changed for record in self.records.values()):
            _write_summary(self, results, time.perf_counter() - STARTED, compare_key)
        elif self.run_dir is not None:
            print(f"{self.run_dir}: every chosen config was already finished; nothing changed")
        failed = [r["name"] for r in results if r["status"] != "completed"]
        if failed:
            print(f"not completed: {', '.join(failed)}", file=sys.stderr)
        elif results and self.run_dir and not self.args.dry_run:  # latest: the last run completed
            write_file(self.out_dir / "latest", (self.run_dir.name + "\n").encode())
        if self._lock:  # the run has ended: its folder is free again
            self._lock.close()
        return 1 if failed else 0

    def __enter__(self):
        return self

    def __exit__(self, kind, stop, traceback):
        """On Ctrl-C, a signal or an error (run_main prints its line), marks the config in
        training interrupted; stop.saved says what is saved and how to go on (None: nothing)."""
        if isinstance(stop, _stopping_errors()):
            with _stops_ignored():
                stop.saved = self._save_on_stop(after_error=exit_status(stop)[0] == 1)
        return False  # the exception goes on, to run_main

    def _save_on_stop(self, after_error):
        records = list(self.records.values())
        current = records[-1] if records and records[-1].status == "running" else None
        if current is not None and not current.result["history"]:
            current = None  # nothing of it is saved
        if self.run_dir is None or (after_error and current is None):
            return None
        saved = [f"{r.name} {r.status}" for r in records if r.status != "running"]
        if current is not None:
            epochs = f"{len(current.result['history'])}/{current.config['num_epochs']}"
            try:
                current.result["status"] = "interrupted"
                current.write_results()
            except ExperimentError:  # a full disk: its files stay as its last saved epoch left them
                current.result["status"] = "running"
                epochs += " (still marked running)"
            saved.append(f"{current.name} at epoch {epochs}")
        return (f"saved in {self.run_dir}: {', '.join(saved)}; continue with: "
                f"{self.resume_command()}")

    def resume_command(self):
        """The user's command with --resume naming this run folder (by name where the command's
        --out-dir holds it, else by its path)."""
        resume = ("--resume", self.args.resume)
        argv = [a for a in sys.argv if a not in resume and not a.startswith("--resume=")]
        given_out_dir = Path(self.args.out_dir or Path("modelset") / Path(self.script).stem)
        name = self.run_dir.name
        if self.run_dir.resolve() != (given_out_dir / name).resolve():
            name = str(self.run_dir)
        return f"python {shlex.join(argv)} --resume {shlex.quote(name)}"

    def _resumed_run_dir(self):
        """The run folder --resume names (run_NNN in --out-dir, or a path), or the newest unfinished
        run of this script (no summary.json yet); anything else is refused before a write."""
        named = Path(self.args.resume)
        runs = sorted(self.out_dir.glob("run_*"), key=lambda p: (len(p.name), p.name))
        mine = [p for p in runs if p.is_dir() and _run_script(p) == self.script]
        if self.args.resume:
            run_dir = self.out_dir / named if len(named.parts) == 1 else named
            script = _run_script(run_dir)
            problem = None
            if not run_dir.is_dir():
                names = ", ".join(p.name for p in mine) or "none"
                problem = f"no run folder; the runs of {self.script} in {self.out_dir}: {names}"
            elif run_dir.is_symlink():
                problem = "a link, and nothing is written through one"
            elif not script:
                problem = "not a run folder of this version of the code (it has no run.json)"
            elif script != self.script:
                problem = f"a run of {script}, not of {self.script}"
            if problem:
                raise ExperimentError(f"--resume {named}: {run_dir}: {problem}")
            self.out_dir = run_dir.parent
            why = "named on the command line"
        else:
            unfinished = [p for p in mine if not (p / "summary.json").exists()]
            if not unfinished:
                finished = f"; its {len(mine)} finished can be named to add configs" if mine else ""
                raise ExperimentError(f"--resume: no unfinished run of {self.script} to continue "
                                      f"in {self.out_dir}{finished}")
            run_dir = unfinished[-1]
            why = f"the newest unfinished run in {self.out_dir}"
        print(f"resuming {run_dir}: {why} (--resume run_NNN picks another)")
        return run_dir


def _run_script(folder):
    """The script that made run folder `folder`, as its run.json says; "" without one."""
    with contextlib.suppress(OSError, ValueError, TypeError):
        return str(json.loads((folder / "run.json").read_text())["script"])
    return ""


def _lock(run_dir):
    """The run folder's lock file, locked until it is closed or the process ends; another process
    is refused with one line naming the first."""
    if fcntl is None:
        return None
    lock = run_dir / ".lock"
    try:  # never through a planted link
        file = os.fdopen(os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")
    except OSError as error:
        raise ExperimentError(f"cannot lock {lock} ({error.strerror}): it must be a plain file in "
                              f"a folder you can write") from None
    try:
        fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise ExperimentError(f"{run_dir} is in use by process {file.read().strip()}; wait for it "
                              f"to end, or stop it") from None
    file.truncate(0)
    print(os.getpid(), file=file, flush=True)
    return file


def _check_tools(device, compile):
    """What hours of training will need, checked first: matplotlib (a bad MPLBACKEND stops it),
    and for --compile the C++ compiler of inductor's CPU kernels, or the C compiler of its Triton
    launcher on a GPU."""
    try:
        import matplotlib.figure  # noqa: F401
    except Exception as error:
        backend = os.environ.get("MPLBACKEND")
        hint = f"; unset MPLBACKEND (it is {backend!r}) or set it to agg" if backend else ""
        raise ExperimentError(f"matplotlib cannot draw ({first_line(error)}){hint}") from None
    variable, language = ("CXX", "C++") if device.type == "cpu" else ("CC", "C")
    names = ["g++", "c++", "clang++"] if device.type == "cpu" else ["cc", "gcc", "clang"]
    names = os.environ.get(variable, "").split()[:1] + names
    if compile and not any(shutil.which(name) for name in names):
        raise ExperimentError(f"--compile on {device.type} needs a {language} compiler "
                              f"({', '.join(names)}), and none was found; run without --compile")


def _write_summary(run, results, wall_seconds, compare_key):
    """summary.json over every config in the run folder, the comparison plots, the summary lines.
    wall_seconds: this process's (a resumed run's: the last process's)."""
    names = {r["name"] for r in results}
    for path in run.run_dir.glob("config_*/results.json"):
        if path.parent.name not in names:  # a config an earlier process of the run finished
            results.append(load_saved(path))
    results.sort(key=lambda r: int(r["name"][7:]))
    configs = [{k: v for k, v in r.items() if k not in ("history", "environment")} for r in results]
    summary = {"script": run.script, "wall_seconds": wall_seconds,
               "resumed": run.args.resume is not None, "configs": configs}
    write_json(run.run_dir / "summary.json", summary)
    trained = [r for r in results if r["history"]]
    evaluated = {r["name"]: "val_accuracy" if r["validation"] else "test_accuracy" for r in trained}
    if len(trained) > 1:
        curves = [(r["name"], curve(r, evaluated[r["name"]])) for r in trained]
        _plot(run.run_dir / "test_accuracy.png", [("every config", "accuracy (%)", curves)])
    panels = []
    for r in trained:
        if compare_key and "train_eval_accuracy" in r["history"][-1]:
            lines = [("train (eval mode)", curve(r, "train_eval_accuracy")),
                     (METRICS[evaluated[r["name"]]], curve(r, evaluated[r["name"]]))]
            panels.append((f"{r['name']}: {compare_key}={r['config'][compare_key]}",
                           "accuracy (%)", lines))
    if panels:
        _plot(run.run_dir / "train_vs_test.png", panels, same_scale=True)
    panels = []
    for r in trained:  # the report's test accuracy after every epoch beside ours
        theirs = (r["reported"] or {}).get("test_accuracy_per_epoch")
        if theirs and "test_accuracy" in r["history"][0]:
            ours = curve(r, "test_accuracy")
            lines = [("the report", list(enumerate(theirs, 1))), ("ours", ours)]
            panels.append((f"{r['name']}: test accuracy", "accuracy (%)", lines))
    if panels:
        _plot(run.run_dir / "versus_report.png", panels, same_scale=True)
    print(f"\nResults ({run.run_dir}). Final test accuracy: the last epoch's. Training time: every "
          f"epoch's steps, GPU synchronized, the first {WARMUP_STEPS} (warm-up) and evaluation "
          f"apart.")
    for result in results:
        print(summary_line(result))


def summary_line(result):
    """The report's form, `config_N: Configuration: {...} Final test accuracy: xx.xx% Training
    time: ...`, then ours beside the report's figures."""
    if result["status"] == "completed":
        outcome = f"Final test accuracy: {result['final_test_accuracy']:.2f}%"
    else:
        outcome = f"{result['status'].upper()} after {len(result['history'])} epochs"
    line = f"{result['name']}: Configuration: {result['config']} {outcome} "
    line += f"Training time: {result['train_seconds']:.2f} seconds"
    if result.get("warmup_seconds"):
        line += f" (+ {result['warmup_seconds']:.2f} s warm-up)"
    if "train_test_gap" in result:
        line += f" | train-test gap (eval mode): {result['train_test_gap']:.2f} points"
    line += "".join(f" | {key}: {value}" for key, value in (result.get("extra") or {}).items())
    reported = result.get("reported")
    versus = result.get("versus_report")
    if versus:
        decimals = reported.get("decimals", 2)  # as many as the report wrote
        points = versus["test_accuracy_points"]
        unit = "point" if abs(points) == 1 else "points"
        precision = "" if decimals == 2 else ", at the report's precision"
        line += f" | report: {reported['test_accuracy']:.{decimals}f}% ({points:+.{decimals}f} "
        line += f"{unit}{precision})"
        if "time_ratio" in versus:
            timed = " and ".join(TIMED[key] for key in reported["timed"])
            line += f", {reported['train_seconds']:.2f} s on {reported['device']} (ours "
            line += f"{result['report_loop_seconds']:.2f} s as its loop timed: steps and {timed}; "
            line += f"{versus['time_ratio']:.2f}x)"
    elif result.get("not_compared"):
        line += f" | not compared with the report: {result['not_compared']}"
    return line


# ----------------------------------------------------------------------------------------------
# The record of a config: epochs, divergence, progress, restore, finish

# what a report's seconds can include besides the steps: history keys, and how a line names them
TIMED = {"eval_seconds": "evaluations", "save_seconds": "checkpoint saves"}
# what add_epoch() takes besides the running train accuracy, and how curves.png labels it
METRICS = {
    "train_accuracy": "train (running, during the epoch)",  # counted by EpochMeter.add
    "train_eval_accuracy": "train (eval mode)",  # the training images evaluated after the epoch
    "val_accuracy": "validation",  # a validation split (val_fraction)
    "test_accuracy": "test",
}


class EpochMeter:
    """One epoch's running training loss and accuracy, summed on the device; the script's train()
    calls add() after every step. In a process's first epoch of a config, `warmup_end` is the
    clock() once its first WARMUP_STEPS steps (compilation, cuDNN's autotuning) are done."""

    def __init__(self, run, epoch, steps, warmup_steps):
        self.run = run
        self.epoch = epoch
        self.steps = steps
        self.warmup_steps = warmup_steps
        self.warmup_end = None
        self.loss_sum = torch.zeros((), device=run.device, dtype=torch.float64)
        self.correct = torch.zeros((), device=run.device, dtype=torch.long)
        self.done = 0  # steps
        self.images = 0
        self.logged_loss = 0.0  # loss_sum at the last --log-interval line

    def add(self, loss, outputs, labels):
        """After a training step: sums its loss and correct predictions; prints the running loss
        every --log-interval steps and, seconds into a long CPU run, how long it will take."""
        run = self.run
        self.loss_sum += loss.detach()
        self.correct += (outputs.argmax(1) == labels).sum()
        self.done += 1
        self.images += len(labels)
        if self.done == self.warmup_steps:
            self.warmup_end = clock(run.device)
        interval = run.args.log_interval
        if interval and self.done % interval == 0:
            total = self.loss_sum.item()
            mean_loss = (total - self.logged_loss) / interval
            print(f"[{self.epoch + 1}, {self.done:5d}] loss: {mean_loss:.3f}")
            self.logged_loss = total
        warmed_up = self.warmup_end is not None and self.done > self.warmup_steps
        if run.estimating and warmed_up and time.perf_counter() > self.warmup_end + 5:
            run.estimating = False  # once per run: the pace after the warm-up
            pace = (time.perf_counter() - self.warmup_end) / (self.done - self.warmup_steps)
            left = pace * self.steps * run.epochs_left()
            if left > 600:
                print(f"at this pace its training alone takes {duration(left)}; for a short run, "
                      f"add {run.short_run}")


class Record:
    """One config's results in <run folder>/config_N/, beside `reported` (the report's figures).
    Call resume(), then per epoch meter() and add_epoch(), then finish(). A NaN or blown-up loss
    ends the config "diverged"."""

    def __init__(self, run, name, config, reported=None, precision="fp32"):
        """reported: the report's test_accuracy (and the `decimals` it wrote), train_seconds with
        its device and what else it `timed` (TIMED), test_accuracy_per_epoch; precision: how the
        model computes, recorded and checked on resume."""
        self.run = run
        self.name = name
        self.config = config
        self.state = None  # {"model": ..., "optimizer": ..., ...}: set by resume()
        self.start_epoch = 0
        self.changed = False  # by this process
        self.last_epoch_end = time.perf_counter()  # where the next epoch's wall time starts
        args = run.args
        environment = {
            "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device": run.describe,
            "device_type": run.device.type, "gpus": run.gpus,
            "torch_cuda_build": torch.version.cuda, "cpu_threads": torch.get_num_threads(),
            "data_parallel": run.gpu_count > 1, "compile": args.compile, "seed": args.seed,
            "subset": args.subset, "dry_run": args.dry_run, "command": sys.argv, "code": run.code,
        }
        not_compared = f"other {', '.join(run.changed)}" if reported and run.changed else None
        self.result = {
            "name": name, "script": run.script, "status": "running", "config": config,
            "precision": precision, "validation": bool(config.get("val_fraction")),
            "reported": reported, "data": run.data, "history": [], "not_compared": not_compared,
            "environment": environment,
        }
        run.records[name] = self

    @property
    def status(self):
        """running (epochs left, or all trained and not yet finished), interrupted, diverged or
        completed."""
        return self.result["status"]

    @property
    def folder(self):
        """config_N in the run folder, made at its first write; never a link."""
        folder = self.run.folder() / self.name
        if folder.is_symlink():
            raise ExperimentError(f"cannot write in {folder}: it is a link")
        folder.mkdir(exist_ok=True)
        return folder

    def resume(self, model, optimizer, **more):
        """Names what every checkpoint saves: the model (unwrapped), the optimizer and `more` (a
        GradScaler: anything with state_dict() and load_state_dict()). With --resume, loads the
        saved state into them. Returns the 0-based epoch to train from (num_epochs when done)."""
        self.state = {"model": unwrap(model), "optimizer": optimizer, **more}
        if self.run.run_dir is not None:
            folder = self.run.run_dir / self.name
            try:
                self.start_epoch = self._restore(folder)
            except DamagedFile as error:  # one line; nothing in the run folder changed
                raise ExperimentError(
                    f"cannot resume {self.run.run_dir}: {error.path.relative_to(self.run.run_dir)}"
                    f": {error.reason}; start a new run (without --resume), or delete {folder} to "
                    f"train it again") from None
        return self.start_epoch

    def meter(self, epoch, steps):
        """Seeds torch's generator for epoch `epoch` (0-based) and returns its EpochMeter, for the
        script's train() to add every step to. A process's first epoch times its warm-up apart."""
        torch.manual_seed(epoch_seed(self.run.args.seed, epoch, "draws"))
        warmup_steps = min(WARMUP_STEPS, steps) if epoch == self.start_epoch else 0
        return EpochMeter(self.run, epoch, steps, warmup_steps)

    def add_epoch(self, meter, started, ended, evaluated, **accuracies):
        """Records epoch meter.epoch, timed by clock(): its steps from `started` to `ended` (the
        warm-up apart), its evaluations up to `evaluated`, `accuracies` (METRICS' keys), its save
        and wall time; saves the checkpoint, then results.json. Returns False when the loss is NaN,
        infinite or blown up: the config is then "diverged"."""
        history = self.result["history"]
        loss = meter.loss_sum.item() / max(1, meter.done)
        steps_from = meter.warmup_end or started
        entry = {"epoch": len(history) + 1, "train_loss": loss if math.isfinite(loss) else None,
                 "train_accuracy": 100.0 * meter.correct.item() / max(1, meter.images),
                 **accuracies, "seconds": ended - steps_from, "eval_seconds": evaluated - ended}
        if meter.warmup_steps:
            entry["warmup_seconds"] = steps_from - started
        history.append(entry)
        self.changed = True
        diverged = not math.isfinite(loss) or loss > BLOWN_UP_LOSS
        saving = time.perf_counter()
        if not diverged:
            checkpoint = {"config": self.config, "epoch": entry["epoch"], "history": history}
            checkpoint |= {key: value.state_dict() for key, value in self.state.items()}
            try:
                save_torch(self.folder / "checkpoint.pt", checkpoint)  # before results.json
            except BaseException:
                history.pop()  # the files hold the epoch before
                raise
        now = time.perf_counter()
        entry["save_seconds"] = now - saving
        entry["wall_seconds"] = now - self.last_epoch_end  # since the epoch before, all of it
        self.last_epoch_end = now
        if diverged:
            self.result["status"] = "diverged"
            print(f"{self.name} diverged: the training loss is {loss:.4g} in epoch {len(history)}; "
                  f"try a lower learning rate than {self.config['lr']} (--lr)", file=sys.stderr)
        self.write_results()
        walls = [e["wall_seconds"] for e in history[self.start_epoch:]]
        left = duration(sum(walls) / len(walls) * self.run.epochs_left())
        shown = "val" if "val_accuracy" in entry else "test"
        print(f"{self.name} epoch {len(history)}/{self.config['num_epochs']}: loss {loss:.3f}, "
              f"train {entry['train_accuracy']:.2f}%, {shown} {entry[shown + '_accuracy']:.2f}%, "
              f"{entry['seconds']:.1f} s; {left} left in the run")
        return not diverged

    def finish(self, test_batches, **extra):
        """Once every epoch is trained: the final figures (`extra`: the script's own), model.pth,
        the pictures and results.json with status "completed"."""
        result = self.result
        model = self.state["model"].eval()
        counts = confusion_matrix(model, test_batches)
        last = result["history"][-1]
        result["final_test_accuracy"] = last.get("test_accuracy", accuracy(counts))
        result["final_val_accuracy"] = last.get("val_accuracy")
        result["final_train_accuracy"] = last["train_accuracy"]
        result["per_class_test_accuracy"] = per_class_accuracy(counts)
        result["confusion_matrix"] = counts.tolist()
        result["extra"] = extra or None
        if "train_eval_accuracy" in last:
            result["final_train_eval_accuracy"] = last["train_eval_accuracy"]
            result["train_test_gap"] = last["train_eval_accuracy"] - result["final_test_accuracy"]
        self.changed = True
        save_torch(self.folder / "model.pth", model.state_dict())
        title = f"{self.run.script} {self.name}"
        plot_confusion(counts, self.folder / "confusion.png", title)
        plot_predictions(model, test_batches, self.folder / "predictions.png", title)
        result["status"] = "completed"
        try:  # results.json last: "completed" there means every file is written
            self.write_results()
        except ExperimentError:  # still running: the resume line is printed, --resume finishes it
            result["status"] = "running"
            raise

    def write_results(self):
        """results.json with its totals brought up to date; before it curves.png once the config
        has stopped (results.json saying so means the picture is there too)."""
        result = self.result
        history = result["history"]
        reported = result["reported"] or {}
        result["train_seconds"] = sum(entry["seconds"] for entry in history)
        result["warmup_seconds"] = sum(entry.get("warmup_seconds", 0.0) for entry in history)
        walls = [entry.get("wall_seconds") for entry in history]
        result["wall_seconds"] = None if None in walls else sum(walls)  # None: an epoch not timed
        # the time the report's loop counted: the steps and what else it `timed` (history keys)
        timed = reported.get("timed")
        result["report_loop_seconds"] = None
        if timed and history and all(key in entry for entry in history for key in timed):
            loops = [e["seconds"] + e.get("warmup_seconds", 0) + sum(e[key] for key in timed)
                     for e in history]
            result["report_loop_seconds"] = sum(loops)
        result["versus_report"] = None
        comparable = not result["not_compared"] and "test_accuracy" in reported
        if comparable and "final_test_accuracy" in result:
            # no more decimals than the report wrote: 59.25% against its "60%" is -1, not -0.75
            points = result["final_test_accuracy"] - reported["test_accuracy"]
            versus = {"test_accuracy_points": round(points, reported.get("decimals", 2))}
            if "train_seconds" in reported and result["report_loop_seconds"]:
                versus["time_ratio"] = result["report_loop_seconds"] / reported["train_seconds"]
            result["versus_report"] = versus
        if result["status"] != "running" and history:
            losses = [("train", curve(result, "train_loss"))]
            accuracies = [(label, curve(result, key)) for key, label in METRICS.items()]
            theirs = reported.get("test_accuracy_per_epoch")  # the report's curve beside ours
            accuracies += [("test, the report", list(enumerate(theirs, 1)))] if theirs else []
            panels = [(f"{self.name}: training loss", "loss", losses),
                      (f"{self.name}: accuracy", "accuracy (%)", accuracies)]
            _plot(self.folder / "curves.png", panels)
        write_json(self.folder / "results.json", result)

    def _restore(self, folder):
        """The epoch to go on from, once this config's saved state is loaded; DamagedFile for a
        file that cannot be used, or other settings."""
        results_file = folder / "results.json"
        checkpoint_file = folder / "checkpoint.pt"
        if folder.is_symlink():
            raise DamagedFile(folder, "it is a link, and nothing is written through one")
        if not results_file.exists():
            if checkpoint_file.exists():
                raise DamagedFile(checkpoint_file, "it has no results.json beside it")
            return 0
        saved = load_saved(results_file)
        now = {"script": self.run.script, "config": self.config, "seed": self.run.args.seed,
               "subset": self.run.args.subset, "dry_run": self.run.args.dry_run,
               "device_type": self.run.device.type, "data": self.run.data,
               "precision": self.result["precision"]}
        if self.run.device.type == "cpu":  # CPU kernels sum in another order with other threads
            now["cpu_threads"] = torch.get_num_threads()
        before = saved["environment"] | saved
        for key, value in now.items():
            if before.get(key) != value:
                raise DamagedFile(results_file, f"it was trained with {key} {before.get(key)}, "
                                                f"not {value} (resume with those)")
        if saved["status"] in ("completed", "diverged"):
            if saved["status"] == "completed":
                load_saved(folder / "model.pth", self.state["model"].load_state_dict)
            print(f"{self.name}: already {saved['status']} in {folder}, skipped")
            self.result.update(saved)
            return self.config["num_epochs"]
        if not checkpoint_file.exists():
            if saved["history"]:
                raise DamagedFile(checkpoint_file, f"it is missing, and results.json lists "
                                                   f"{len(saved['history'])} epochs")
            return 0
        checkpoint = load_saved(checkpoint_file, lambda state: self._load(checkpoint_file, state))
        epoch = checkpoint["epoch"]
        # results.json, written after the checkpoint, has each epoch's save and wall seconds too;
        # a stop between the two leaves the checkpoint's history, without them for its last epoch
        complete = len(saved["history"]) == epoch
        self.result["history"] = saved["history"] if complete else checkpoint["history"]
        print(f"{self.name}: resuming after epoch {epoch}")
        return epoch

    def _load(self, path, checkpoint):
        """Loads `checkpoint` into the state every checkpoint saves, once it is this config's."""
        epoch = checkpoint.get("epoch")
        history = checkpoint.get("history")
        if checkpoint.get("config") != self.config:
            raise DamagedFile(path, f"it is of config {checkpoint.get('config')}")
        epochs = self.config["num_epochs"]
        if type(epoch) is not int or not 1 <= epoch <= epochs:
            raise DamagedFile(path, f"its epoch is {epoch!r}, not one of 1-{epochs}")
        if not isinstance(history, list) or len(history) != epoch:
            raise DamagedFile(path, f"its history does not list epochs 1-{epoch}")
        for key, value in self.state.items():
            value.load_state_dict(checkpoint[key])


def curve(result, key):
    """(epoch, value) of every epoch of `result` that recorded `key`."""
    return [(e["epoch"], e[key]) for e in result["history"] if e.get(key) is not None]


# ----------------------------------------------------------------------------------------------
# Files: never half written, never through a link, never code


def load_saved(path, load=None):
    """A config's results.json (checked), or a torch file loaded safely (weights_only: tensors and
    plain data, never code) onto the CPU and handed to load(state). Failures raise DamagedFile."""
    try:
        if path.suffix != ".json":
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            state = json.loads(path.read_text())
            if not isinstance(state, dict) or not RESULT_KEYS <= state.keys():
                missing = sorted(RESULT_KEYS - state.keys()) if isinstance(state, dict) else "all"
                raise ValueError(f"not a run's results: keys {missing} missing")
            history = state["history"]
            if not all(isinstance(state[key], dict) for key in ("environment", "config")):
                raise ValueError("its environment or config is not a mapping")
            if not isinstance(history, list) or not all(isinstance(e, dict) for e in history):
                raise ValueError("its history is not a list of epochs")
            final = state.get("final_test_accuracy")
            if state["status"] == "completed" and not (history and isinstance(final, float)):
                raise ValueError("completed without epochs or a final_test_accuracy")
    except FileNotFoundError:
        raise DamagedFile(path, "it is missing") from None
    except Exception as error:  # cut short, not a torch file, or refused by weights_only
        if "GLOBAL" in str(error):  # a pickle asking for a function or a class
            raise DamagedFile(path, "it holds more than tensors and plain data (code to run), so "
                                    "it is not loaded") from None
        raise DamagedFile(path, f"it is damaged ({first_line(error)})") from None
    try:
        if load:
            load(state)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise DamagedFile(path, f"it does not fit this model ({first_line(error)})") from None
    return state


def write_file(path, data):
    """Writes the bytes `data` to a new file of a random name beside `path`, made exclusively (never
    through a planted link) with the permissions an ordinary write gives, then renames it over
    `path`: readers never see half a file, a failed write leaves the old one, and no temporary
    file stays behind. A failure is one error line."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as file:
            file.write(data)
        os.replace(temporary, path)  # replaces a link at `path` itself, never its target
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        if not isinstance(error, OSError):
            raise
        reason = error.strerror or first_line(error)
        raise ExperimentError(f"cannot write {path} ({reason})") from None


def write_json(path, data):
    """Strict JSON (no NaN or Infinity, which other readers refuse), indented."""
    write_file(path, (json.dumps(data, indent=2, allow_nan=False) + "\n").encode())


def save_torch(path, data):
    buffer = io.BytesIO()  # serialized first: a full disk is then the system's error, named so
    torch.save(data, buffer)
    write_file(path, buffer.getvalue())


# ----------------------------------------------------------------------------------------------
# Plots


def _plot(path, panels, same_scale=False):
    """Panels in rows of at most 4, each (title, y label, [(label, [(epoch, value), ...]), ...])."""
    from matplotlib.figure import Figure  # no pyplot: no display, and a faster import

    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(5.5 * columns, 4 * rows), layout="tight")
    axes = figure.subplots(rows, columns, sharey=same_scale, squeeze=False).flat
    for axis in axes[len(panels):]:
        axis.set_visible(False)
    for axis, (title, ylabel, lines) in zip(axes, panels):
        for label, points in lines:
            if points:  # a config that diverged in its first epoch has no curve
                axis.plot(*zip(*points), label=label, marker="." if len(points) < 30 else None)
        axis.set(title=title, xlabel="epoch", ylabel=ylabel)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize="small")
    _save_figure(figure, path)


def plot_confusion(counts, path, title):
    """The confusion matrix as counts, with each true class's accuracy beside its row."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.2, 6), layout="tight")
    axis = figure.add_subplot()
    image = axis.imshow(counts.numpy(), cmap="Blues")
    figure.colorbar(image, ax=axis, shrink=0.8, label="test images")
    axis.set_xticks(range(10), CLASSES, rotation=45)
    axis.set_yticks(range(10), [f"{k} {v:.0f}%" for k, v in per_class_accuracy(counts).items()])
    for (row, column), count in np.ndenumerate(counts.numpy()):
        colour = "white" if count > counts.max().item() / 2 else "black"
        axis.text(column, row, count, ha="center", va="center", fontsize=7, color=colour)
    axis.set(title=f"{title}: {accuracy(counts):.2f}% correct", xlabel="predicted",
             ylabel="true class (its accuracy)")
    _save_figure(figure, path)


@torch.no_grad()
def plot_predictions(model, batches, path, title, count=32):
    """The first `count` test images in rows of 8, each with the predicted class and the true one
    below it, as the tutorial shows them: green where right, red where wrong. Eval mode."""
    from matplotlib.figure import Figure

    images = batches.images[:count]
    predicted = model(images).argmax(1).tolist()
    pictures = (images * batches.std + batches.mean).clamp(0, 1).float().cpu()
    rows = math.ceil(len(images) / 8)
    mosaic = torch.ones(3, rows * 44, 8 * 36)  # each image on a white tile, room for its label
    for index, picture in enumerate(pictures):
        top, left = index // 8 * 44 + 2, index % 8 * 36 + 2
        mosaic[:, top:top + 32, left:left + 32] = picture
    figure = Figure(figsize=(10.4, 1.5 * rows + 0.4), layout="tight")
    axis = figure.add_subplot()
    axis.imshow(mosaic.permute(1, 2, 0).numpy(), interpolation="nearest")
    for index, (guess, truth) in enumerate(zip(predicted, batches.labels[:count].tolist())):
        colour = "green" if guess == truth else "red"
        label = f"{CLASSES[guess]} ({CLASSES[truth]})"
        axis.text(index % 8 * 36 + 18, index // 8 * 44 + 40, label, ha="center", fontsize=7,
                  color=colour)
    axis.set(title=f"{title}: predicted (true)")
    axis.axis("off")
    _save_figure(figure, path)


def _save_figure(figure, path):
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=100, format="png")
    write_file(path, buffer.getvalue())
