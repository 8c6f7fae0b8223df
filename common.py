"""Helpers every CIFAR-10 script here needs alike: data, batches, evaluation, run folders, plots.

Each script holds its experiment (model, CONFIGS, REPORTED, optimizer, training step, epoch loop,
timing) and calls these by name. A run writes <out-dir>/run_NNN/ with summary.json, comparison plots
and per config config_N/: model.pth (a plain state_dict), checkpoint.pt (for --resume),
results.json (README.md, "What the files hold", explains every key), curves.png, confusion.png and
predictions.png.
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
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import namedtuple
from pathlib import Path

STARTED = time.perf_counter()  # the script's start: every script imports common first, before torch


def _interrupted_at_start(signal_number, frame):
    """Ctrl-C while a script imports torch, before run_main: nothing to save, one line, no
    traceback."""
    with contextlib.suppress(OSError):
        print("interrupted before training started; nothing was saved", file=sys.stderr, flush=True)
    os._exit(130)


# A script of this folder run as a program imports common first of all, so that a Ctrl-C while torch
# loads (a second or more) ends in one line too; run_main hands Ctrl-C back to Python. A process
# that ignores Ctrl-C (a background job) keeps ignoring it.
_main_file = getattr(sys.modules.get("__main__"), "__file__", None) or ""
if (
    Path(_main_file).resolve().parent == Path(__file__).resolve().parent
    and signal.getsignal(signal.SIGINT) is signal.default_int_handler
):
    signal.signal(signal.SIGINT, _interrupted_at_start)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

try:
    import fcntl  # locks a run folder; Windows has none, and runs there go without
except ImportError:
    fcntl = None

CLASSES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FOLDER = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
WARMUP_STEPS = 3  # a config's first steps in a process, timed apart from its training time
NEWEST = ""  # --resume without a run folder
# a mean loss above it: the true class's probability below e**-100, the weights blown up
BLOWN_UP_LOSS = 100.0
# in every results.json
RESULT_KEYS = {"name", "script", "status", "config", "history", "train_seconds"}
Split = namedtuple("Split", "images labels")  # uint8 (N, 3, 32, 32) and int64 (N,)
Cifar10 = namedtuple("Cifar10", "train test")


class ExperimentError(Exception):
    """A problem the user can fix: one `error:` line, no traceback."""


class Stopped(KeyboardInterrupt):
    """SIGTERM (kill, a job scheduler, a container stop) or SIGHUP (a closed terminal, a dropped ssh
    connection), handled like Ctrl-C; `status` is the exit status (128 + the signal's number)."""

    def __init__(self, signal_number):
        super().__init__()
        self.status = 128 + signal_number


def _raise_stopped(signal_number, frame):
    raise Stopped(signal_number)


def _compile_error_types():
    """torch.compile's own exceptions (inductor without a compiler, a graph it cannot build)."""
    from torch._dynamo.exc import TorchDynamoException

    return (TorchDynamoException,)


STOPPING_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
)


# what ends a run with one line: Ctrl-C and the signals above, an error the user can fix, one the
# system reports (a full disk, a refused folder), or torch.compile's
STOPPING_ERRORS = (ExperimentError, KeyboardInterrupt, OSError)


@contextlib.contextmanager
def _stops_ignored():
    """Ctrl-C and the stopping signals ignored inside the block: a second Ctrl-C while saving."""
    ignored = (signal.SIGINT, *STOPPING_SIGNALS)
    handlers = [(number, signal.signal(number, signal.SIG_IGN)) for number in ignored]
    try:
        yield
    finally:
        for number, handler in handlers:
            signal.signal(number, handler)


def exit_status(stop):
    """(exit status, first line) of the exception `stop` that ended a script."""
    # stdout's reader has gone: 141, as a process ended by SIGPIPE
    if isinstance(stop, BrokenPipeError):
        return 141, "interrupted: the output was closed"
    if isinstance(stop, _compile_error_types()):
        return 1, f"error: --compile failed ({first_line(stop)}); run without --compile"
    if isinstance(stop, (ExperimentError, OSError)):  # OSError: a file or folder the system refused
        return 1, f"error: {stop}"
    return getattr(stop, "status", 130), "interrupted"


def run_main(main):
    """Runs main() and exits with its status: 1 after an `error:` line, 130 on Ctrl-C, 143 on
    SIGTERM, 129 on SIGHUP, 141 when the output's reader has gone (`| head`). The line says what
    is saved and how to go on, once anything is: a Run left by the exception (its `with` block)
    says so in the exception's `saved`."""
    before = {number: signal.getsignal(number) for number in STOPPING_SIGNALS}
    for number, handler in before.items():
        if handler == signal.SIG_DFL:  # a run told to ignore a signal keeps ignoring it
            signal.signal(number, _raise_stopped)
    # lines as they come, also into a pipe or a file; a character the output cannot show is escaped
    sys.stdout.reconfigure(line_buffering=True, errors="backslashreplace")
    sys.stderr.reconfigure(errors="backslashreplace")
    try:
        if signal.getsignal(signal.SIGINT) is _interrupted_at_start:  # set while importing, above
            signal.signal(signal.SIGINT, signal.default_int_handler)
        status = main()
    except (*STOPPING_ERRORS, *_compile_error_types()) as stop:
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


def code_version(script):
    """{"commit": the git commit of the script's checkout, "changed": whether its tracked files
    differ from it}, so that a result names the code that made it; None values outside a git
    checkout."""
    folder = Path(script).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10
        )
        changed = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--"], cwd=folder, capture_output=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):  # no git on this machine
        return {"commit": None, "changed": None}
    if commit.returncode != 0:
        return {"commit": None, "changed": None}
    return {"commit": commit.stdout.strip(), "changed": changed.returncode != 0}


def first_line(error):
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def duration(seconds):
    """A time span as a person reads it: 45 s, 12 min 05 s, 2 h 05 min."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        whole = round(seconds)
        return f"{whole // 60} min {whole % 60:02} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02} min"


# ----------------------------------------------------------------------------------------------
# Data, batches, evaluation, command line


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
            raise pickle.UnpicklingError(
                f"it asks for {module}.{name}, which no CIFAR-10 file holds"
            )
        return self.allowed[module, name]


def load_cifar10(data_dir):
    """CIFAR-10 from the folder holding cifar-10-batches-py, or that folder; extracted from the
    archive there or downloaded first (md5 checked) when absent; read safely and checked. A failure
    is an ExperimentError."""
    try:
        data_dir = Path(data_dir).resolve()
    except (OSError, RuntimeError) as error:  # a symlink loop (RuntimeError before Python 3.13)
        raise ExperimentError(f"--data-dir {data_dir}: {first_line(error)}") from None
    if data_dir.is_file():
        raise ExperimentError(f"--data-dir {data_dir} is a file; pass the folder holding {FOLDER}")
    folder = data_dir if (data_dir / FILES[0]).exists() else data_dir / FOLDER
    archive = data_dir / ARCHIVE
    if not folder.is_dir():
        from torchvision.datasets.utils import check_integrity, download_and_extract_archive

        # torchvision would download again
        if archive.is_file() and not check_integrity(str(archive), ARCHIVE_MD5):
            raise ExperimentError(
                f"{archive} is damaged (not the official md5); delete it, or put {FOLDER} there"
            )
        url = f"https://www.cs.toronto.edu/~kriz/{ARCHIVE}"
        source = f"extracting {archive}" if archive.is_file() else url
        print(f"CIFAR-10 not found in {data_dir}: {source}")
        try:
            download_and_extract_archive(url, str(data_dir), filename=ARCHIVE, md5=ARCHIVE_MD5)
        except Exception as error:  # offline, refused, cut short: all end the same way
            raise ExperimentError(
                f"could not download CIFAR-10 into {data_dir} ({first_line(error)}); put {ARCHIVE} "
                f"(from https://www.cs.toronto.edu/~kriz/cifar.html) or its extracted {FOLDER} "
                f"folder in {data_dir}, or pass --data-dir"
            ) from None
    *train, test = [_read_batch(folder, name) for name in FILES]
    return Cifar10(Split(*(torch.cat(tensors) for tensors in zip(*train))), test)


def _read_batch(folder, name):
    path = folder / name
    fix = f"replace {folder} with a fresh copy of {FOLDER}, or pass --data-dir"
    if not path.is_file():
        raise ExperimentError(f"CIFAR-10 file {name} is missing in {folder}; {fix}")
    try:
        with open(path, "rb") as file:
            batch = {
                key.decode() if isinstance(key, bytes) else key: value
                for key, value in _CifarUnpickler(file, encoding="bytes").load().items()
            }
        data = np.asarray(batch["data"])
        labels = np.asarray(batch["labels"])
    except Exception as error:  # cut short, foreign, or refused by the unpickler
        raise ExperimentError(
            f"cannot read CIFAR-10 file {path} ({first_line(error)}); {fix}"
        ) from None
    if data.dtype != np.uint8 or data.shape[1:] != (3072,):
        raise ExperimentError(
            f"{path} is not a CIFAR-10 batch: data is {data.dtype} {data.shape}; {fix}"
        )
    if labels.dtype.kind not in "iu" or labels.shape != (len(data),):
        raise ExperimentError(
            f"{path} is not a CIFAR-10 batch: {labels.size} labels of type {labels.dtype} for "
            f"{len(data)} images; {fix}"
        )
    if labels.size and not 0 <= labels.min() <= labels.max() <= 9:
        outside = labels[(labels < 0) | (labels > 9)][0]
        raise ExperimentError(
            f"{path} is not a CIFAR-10 batch: a label is {outside}, outside 0-9; {fix}"
        )
    return Split(
        torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()),
        torch.from_numpy(labels.astype(np.int64)),
    )


def hold_out(split, fraction):
    """(training part, validation part) of `split`: its last `fraction` of the images held out, so
    that an epoch or a setting can be picked without the test set. The validation part is None when
    `fraction` is 0."""
    if not fraction:
        return split, None
    keep = len(split.labels) - round(len(split.labels) * fraction)
    if keep < 1 or keep == len(split.labels):
        raise ExperimentError(
            f"a validation fraction of {fraction} of {len(split.labels)} training images "
            f"leaves {keep} to train on and {len(split.labels) - keep} to validate: change it"
        )
    return Split(split.images[:keep], split.labels[:keep]), Split(
        split.images[keep:], split.labels[keep:]
    )


class Batches:
    """A split as one normalized tensor, (x / 255 - mean) / std, on `device`. Iterating yields every
    image in order; epoch(n) yields epoch n's training batches (every image, the last batch short),
    shuffled by a permutation seeded by the seed and n alone."""

    def __init__(self, split, batch_size, device, mean, std, seed=0):
        # kept to show the images again (predictions.png)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        scale = 1 / (255 * self.std)
        self.images = split.images.to(device).float().mul_(scale).sub_(self.mean / self.std)
        self.labels = split.labels.to(device)
        self.batch_size = batch_size
        self.seed = seed
        # of a training epoch: the last one short, as a DataLoader's (the report's loaders)
        self.steps = math.ceil(len(self.labels) / batch_size)

    def __iter__(self):
        for start in range(0, len(self.labels), self.batch_size):
            yield (
                self.images[start : start + self.batch_size],
                self.labels[start : start + self.batch_size],
            )

    def epoch(self, epoch):
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, "order"))
        order = torch.randperm(len(self.labels), generator=generator)
        for index in order.to(self.labels.device).split(self.batch_size):
            yield self.images[index], self.labels[index]


def clock(device):
    """time.perf_counter() once every visible GPU has finished the work queued so far:
    nn.DataParallel's replicas run on all of them, and synchronizing the first GPU alone would not
    wait for the others."""
    if device.type == "cuda":
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)
    return time.perf_counter()


def lenet_compile_mode(device):
    """torch.compile's mode for LeNet's small steps: on a GPU "reduce-overhead", which replays each
    step as a CUDA graph (one launch instead of one per kernel); on a CPU, where launches cost
    nothing extra, the default."""
    return "reduce-overhead" if device.type == "cuda" else "default"


@torch.no_grad()
def confusion_matrix(model, batches):
    """Counts of (true class, predicted class) over every batch, (10, 10) int64; the model in eval
    mode."""
    if model.training:
        raise RuntimeError(
            "call model.eval() before evaluating: Dropout and BatchNorm act differently"
        )
    counts = torch.zeros(100, device=batches.labels.device, dtype=torch.long)
    for images, labels in batches:
        # no GPU sync
        counts.index_add_(0, labels * 10 + model(images).argmax(1), torch.ones_like(labels))
    return counts.view(10, 10).cpu()


def evaluate(model, batches):
    """Accuracy in percent over every batch; the model in eval mode."""
    return accuracy(confusion_matrix(model, batches))


def accuracy(counts):
    """Accuracy in percent from a confusion matrix: its diagonal over all its counts."""
    return 100.0 * counts.diag().sum().item() / max(1, counts.sum().item())


def per_class_accuracy(counts):
    """{class name: accuracy in percent} from a confusion matrix (rows: true classes)."""
    return {
        name: 100.0 * right / max(1, total)
        for name, right, total in zip(CLASSES, counts.diag().tolist(), counts.sum(1).tolist())
    }


def unwrap(model):
    """The plain module inside torch.compile and nn.DataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.DataParallel) else model


def parse_args(description, configs, argv=None, device="auto", log_interval=0, threads=None):
    """The command line every script shares; `configs` gives the valid --configs numbers. `threads`:
    the script's default number of CPU threads (None: PyTorch's, one per core); OMP_NUM_THREADS,
    when set, takes its place, and --threads over both."""

    # an argparse type: kind(text) when it passes test, else one line
    def _checked(kind, test, requirement):
        def parse(text):
            try:
                if test(kind(text)):
                    return kind(text)
            except ValueError:
                pass
            raise argparse.ArgumentTypeError(f"must be {requirement}, not {text!r}")

        return parse

    parser = OneLineErrorParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    count = _checked(int, lambda v: v > 0, "a positive whole number")
    add(
        "--configs",
        type=int,
        nargs="+",
        metavar="N",
        choices=range(1, len(configs) + 1),
        help=f"config numbers to run, 1 to {len(configs)} (default: all)",
    )
    add("--list-configs", action="store_true", help="print the numbered configs and exit")
    add("--epochs", type=count, help="override num_epochs of the chosen configs")
    add(
        "--lr",
        type=_checked(float, lambda v: 0 < v < math.inf, "a positive finite number"),
        help="override lr",
    )
    add(
        "--momentum",
        type=_checked(float, lambda v: 0 <= v < 1, "at least 0, below 1"),
        help="override momentum",
    )
    add("--batch-size", type=count, help="override batch_size")
    add(
        "--val-fraction",
        type=_checked(float, lambda v: 0 < v < 1, "above 0, below 1"),
        metavar="F",
        help="hold out the last F of the training images for validation (overrides val_fraction)",
    )
    add(
        "--data-dir",
        type=_checked(str, bool, "a folder"),
        default="./data",
        help="CIFAR-10 folder (default: ./data)",
    )
    add(
        "--out-dir",
        type=_checked(str, bool, "a folder"),
        help="output folder (default: modelset/<script name>)",
    )
    add("--subset", type=count, metavar="N", help="use N training and at most N test images")
    add(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default=device,
        help=f"training device (default: {device})",
    )
    add(
        "--seed",
        type=_checked(int, lambda v: 0 <= v < 2**32, "0 to 2**32 - 1"),
        default=1,
        help="(default: 1)",
    )
    add(
        "--log-interval",
        type=_checked(int, lambda v: v >= 0, "0 or more"),
        default=log_interval,
        metavar="B",
        help=f"print the running loss every B batches, 0 for never (default: {log_interval})",
    )
    add("--compile", action="store_true", help="compile the model with torch.compile")
    threads = None if os.environ.get("OMP_NUM_THREADS") else threads
    add(
        "--threads",
        type=count,
        default=threads,
        metavar="N",
        help=f"CPU threads (default: {threads or 'OMP_NUM_THREADS, else one per core'})",
    )
    add(
        "--resume",
        nargs="?",
        const=NEWEST,
        metavar="RUN",
        help="continue run folder RUN (run_NNN in --out-dir, or a path); alone, the newest "
        "unfinished run",
    )
    add("--dry-run", action="store_true", help="one epoch of two batches per config")
    add(
        "--evaluate",
        metavar="MODEL_PTH",
        help="evaluate saved weights (a model.pth) on the test set, and exit",
    )
    args = parser.parse_args(argv)
    if args.configs and len(set(args.configs)) < len(args.configs):
        parser.error(
            f"argument --configs: each config once, not {' '.join(map(str, args.configs))}"
        )
    if args.list_configs:
        print("\n".join(f"config_{number}: {config}" for number, config in enumerate(configs, 1)))
        raise SystemExit(0)
    return args


def pick_device(args):
    """--device: cpu, cuda (refused with one line when no GPU is visible), or auto (a GPU when there
    is one)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ExperimentError("--device cuda: no CUDA GPU is visible; use --device cpu")
    return torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument error is one line, without argparse's usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def _check_plotting():
    """matplotlib must start before hours of training depend on it (a bad MPLBACKEND stops its
    import)."""
    try:
        import matplotlib.figure  # noqa: F401
    except Exception as error:
        backend = os.environ.get("MPLBACKEND")
        hint = f"; unset MPLBACKEND (it is {backend!r}) or set it to agg" if backend else ""
        raise ExperimentError(
            f"matplotlib, which draws the pictures, cannot start ({first_line(error)}){hint}"
        ) from None


def _check_compiler(device):
    """--compile's inductor builds C++ kernels on a CPU and a C launcher for Triton on a GPU."""
    names = ["g++", "c++", "clang++"] if device.type == "cpu" else ["cc", "gcc", "clang"]
    variable = "CXX" if device.type == "cpu" else "CC"
    if os.environ.get(variable):
        names.insert(0, os.environ[variable].split()[0])
    if not any(shutil.which(name) for name in names):
        raise ExperimentError(
            f"--compile on {device.type} needs a {'C++' if variable == 'CXX' else 'C'} compiler "
            f"({', '.join(names)}), and none was found; run without --compile, or install one"
        )


class Run:
    """One run of a script: its device, its run folder <out-dir>/run_NNN/ (made when training
    starts, or the one --resume continues; locked while in use), the chosen configs and their
    Records."""

    def __init__(self, script, args, mean, std, short_run, data_parallel=False):
        """script: the script's __file__; args: parse_args()'s; mean and std: the per-channel
        normalization of every batch, (x / 255 - mean) / std; short_run: the options of a short run,
        suggested when a CPU run would take long. data_parallel: the script wraps its model in
        nn.DataParallel when gpu_count > 1; gpu_count then counts every visible GPU. Otherwise it
        is 1: the script trains on one device. Use it as `with Run(...) as run:`, so that Ctrl-C
        saves what is trained (see __exit__)."""
        self.script = Path(script).name
        self.args = args
        self.mean = mean
        self.std = std
        self.short_run = short_run
        self.code = code_version(script)  # once per run: two git calls
        self.records = []
        self.epochs_left = 0  # in the chosen configs, for the time left
        self.epochs_saved = {}  # of each chosen config, in the run folder --resume continues
        self.data = {}  # what load_data() loaded, recorded and checked on resume
        self.run_dir = None
        self._lock = None
        self.made_run_dir = False  # by this process (not one --resume continues)
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise ExperimentError(
                f"start {self.script} with python, not torchrun: nn.DataParallel drives every GPU"
            )
        self.device = pick_device(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        # fixed sizes: cuDNN times its kernels once
        torch.backends.cudnn.benchmark = self.device.type == "cuda"
        self.gpu_count = 1
        if data_parallel and self.device.type == "cuda":
            # the script wraps in nn.DataParallel when > 1
            self.gpu_count = torch.cuda.device_count()
        if args.compile and self.gpu_count > 1:
            raise ExperimentError(
                "--compile cannot reach nn.DataParallel's replicas (each runs uncompiled in its "
                "own thread): drop --compile, or make one GPU visible (CUDA_VISIBLE_DEVICES=0)"
            )
        if args.compile:
            _check_compiler(self.device)
        _check_plotting()
        # CPU only: timing a GPU step would mean waiting for it
        self.estimating = self.device.type == "cpu"
        options = ("epochs", "lr", "momentum", "batch_size", "val_fraction", "subset", "dry_run")
        # settings other than the report's: no comparison with it
        self.changed = [option for option in options if getattr(args, option)]
        self.out_dir = Path(args.out_dir or Path("modelset") / Path(script).stem)
        # an unwritable folder is reported now, before the data
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if args.resume is not None:
            self.run_dir = self._locked(self._resumed_run_dir())
        self.describe = (
            f"cpu ({platform.machine()}, threads: {torch.get_num_threads()})"
            if self.device.type == "cpu"
            else ", ".join(torch.cuda.get_device_name(i) for i in range(self.gpu_count))
        )
        print(f"training on {self.describe}")

    def configs(self, configs):
        """(name, config) for each chosen config (--configs, else all), the command line's overrides
        applied."""
        overrides = {
            "num_epochs": 1 if self.args.dry_run else self.args.epochs,
            "lr": self.args.lr,
            "momentum": self.args.momentum,
            "batch_size": self.args.batch_size,
            "val_fraction": self.args.val_fraction,
        }
        given = {key: value for key, value in overrides.items() if value is not None}
        numbers = self.args.configs or range(1, len(configs) + 1)
        chosen = [(number, {**configs[number - 1], **given}) for number in numbers]
        self.epochs_saved = {
            f"config_{number}": self._saved_epochs(f"config_{number}", config)
            for number, config in chosen
        }
        self.epochs_left = sum(config["num_epochs"] for _, config in chosen)
        self.epochs_left -= sum(self.epochs_saved.values())
        for number, config in chosen:
            yield f"config_{number}", config

    def load_data(self):
        """CIFAR-10 as uint8 tensors, cut to --subset."""
        data = load_cifar10(self.args.data_dir)
        if self.args.subset:
            data = Cifar10(
                *(Split(s.images[: self.args.subset], s.labels[: self.args.subset]) for s in data)
            )
        labels = torch.cat([data.train.labels, data.test.labels])
        images_crc32 = zlib.crc32(
            data.test.images.numpy().tobytes(), zlib.crc32(data.train.images.numpy().tobytes())
        )
        self.data = {
            "train_images": len(data.train.labels),
            "test_images": len(data.test.labels),
            "labels_crc32": zlib.crc32(labels.numpy().tobytes()),
            "images_crc32": images_crc32,
        }
        print(
            f"CIFAR-10: {len(data.train.labels)} training and {len(data.test.labels)} test images"
        )
        return data

    def batches(self, split, batch_size, train=False):
        """Batches of `split` on this run's device; with --dry-run, two batches of it."""
        split = (
            Split(split.images[: 2 * batch_size], split.labels[: 2 * batch_size])
            if self.args.dry_run
            else split
        )
        if train and batch_size > len(split.labels):
            raise ExperimentError(
                f"batch size {batch_size} exceeds the {len(split.labels)} training images: lower it"
            )
        return Batches(split, batch_size, self.device, self.mean, self.std, self.args.seed)

    def _saved_epochs(self, name, config):
        """The epochs of config `name` that the run folder --resume continues holds, as its
        results.json says (all of them once completed or diverged); 0 where it cannot tell:
        Record.resume() then reads the files, and refuses damaged ones."""
        if self.run_dir is None:
            return 0
        with contextlib.suppress(ExperimentError, TypeError):  # TypeError: a history not a list
            saved = load_saved(self.run_dir / name / "results.json", refused)
            if saved["status"] in ("completed", "diverged"):
                return config["num_epochs"]
            return len(saved["history"])
        return 0

    def new_run_dir(self):
        """This run's folder, made (and locked) when training starts: a run that fails before leaves
        none."""
        number = int(self._runs()[-1].name[4:]) + 1 if self._runs() else 1
        # mkdir is atomic: two runs started together get different folders
        while self.run_dir is None:
            try:
                (self.out_dir / f"run_{number:03d}").mkdir()
                self.run_dir = self._locked(self.out_dir / f"run_{number:03d}")
                self.made_run_dir = True
                print(f"writing to {self.run_dir}")
            except FileExistsError:
                number += 1
        return self.run_dir

    def finish(self, compare_key=None):
        """Prints the summary, writes summary.json and the comparison plots; the exit status."""
        for record in self.records:
            record.wait_for_saving()
        results = [record.result for record in self.records]
        if results:
            wall_seconds = time.perf_counter() - STARTED
            _write_summary(
                self.run_dir, results, wall_seconds, self.args.resume is not None, compare_key
            )
        failed = [r["name"] for r in results if r["status"] != "completed"]
        if self._lock:  # the run has ended: its folder is free again
            self._lock.close()
        if failed:
            print(f"not completed: {', '.join(failed)}", file=sys.stderr)
        elif results and not self.args.dry_run:
            self._point_latest_here()
        return 1 if failed else 0

    def _point_latest_here(self):
        """<out-dir>/latest names the newest complete run: this one, unless it already names a newer
        one (an old run resumed to its end does not take it back)."""
        latest = self.out_dir / "latest"
        with contextlib.suppress(OSError, ValueError):
            named = latest.read_text().strip()
            if (
                int(named.removeprefix("run_")) > int(self.run_dir.name[4:])
                and (self.out_dir / named).is_dir()
            ):
                return
        write_file(latest, (self.run_dir.name + "\n").encode())

    def _discard_empty_run_dir(self):
        """Removes the run folder this process made when no epoch was saved in it (a failure before
        the first), so that bare --resume does not pick it; True when removed."""
        if not self.made_run_dir or any(self.run_dir.glob("config_*/results.json")):
            return False
        if self._lock:
            self._lock.close()
            self._lock = None
        for folder in self.run_dir.glob("config_*"):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only an empty one
        with contextlib.suppress(OSError):
            (self.run_dir / ".lock").unlink()
            self.run_dir.rmdir()
        return not self.run_dir.exists()

    def __enter__(self):
        return self

    def __exit__(self, kind, stop, traceback):
        """The end of a script's `with Run(...) as run:` block. On Ctrl-C, a signal or an error that
        ends the script (run_main prints its line), the config in training is marked interrupted,
        and stop.saved says what is saved and how to go on (None when nothing is)."""
        if isinstance(stop, (*STOPPING_ERRORS, *_compile_error_types())):
            status, _ = exit_status(stop)
            with _stops_ignored():
                stop.saved = self.save_on_stop(after_error=status == 1)
        return False  # the exception goes on, to run_main

    def save_on_stop(self, after_error):
        """Marks the config in training interrupted; what is saved and how to go on (after an error:
        only once that config has saved epochs), or None."""
        current = (
            self.records[-1]
            if self.records and self.records[-1].result["status"] == "running"
            else None
        )
        if self.run_dir is None:
            return None
        for record in self.records:
            # that epoch is taken back: its files hold the one before
            with contextlib.suppress(ExperimentError):
                record.wait_for_saving()
        if self._discard_empty_run_dir():
            return None
        if after_error and not (current and current.result["history"]):
            return None
        saved = [f"{r.name} {r.result['status']}" for r in self.records if r is not current]
        if current is not None:
            still_running = ""
            try:
                current.mark_interrupted()
            # a full disk, say: its files stay as its last saved epoch left them
            except ExperimentError:
                current.result["status"] = "running"
                still_running = " (still marked running)"
            epochs = f"{len(current.result['history'])}/{current.config['num_epochs']}"
            saved.append(f"{current.name} at epoch {epochs}{still_running}")
        return (
            f"saved in {self.run_dir}: {', '.join(saved) or 'no finished epoch'}; continue with: "
            f"{self.resume_command()}"
        )

    def short_command(self):
        """The script's suggested short run, with the data, output folder, device and seed the user
        gave, so that it runs when copied."""
        kept = []
        given = (
            ("--data-dir", self.args.data_dir, "./data"),
            ("--out-dir", self.args.out_dir, None),
            ("--device", self.args.device, "auto"),
            ("--seed", self.args.seed, 1),
        )
        for option, value, default in given:
            if value != default:
                kept += [option, str(value)]
        return f"python {self.script} {self.short_run} {shlex.join(kept)}".strip()

    def resume_command(self):
        """The command that continues this run: the user's, with --resume naming this run folder (by
        its name where the command's --out-dir holds it, else by its path)."""
        argv = [
            a
            for a in sys.argv
            if a not in ("--resume", self.args.resume) and not a.startswith("--resume=")
        ]
        given_out_dir = Path(self.args.out_dir or Path("modelset") / Path(self.script).stem)
        name = self.run_dir.name
        if self.run_dir.resolve() != (given_out_dir / name).resolve():
            name = str(self.run_dir)
        return f"python {shlex.join(argv)} --resume {shlex.quote(name)}"

    def _runs(self):
        return sorted(
            (p for p in self.out_dir.glob("run_*") if p.name[4:].isdigit() and p.is_dir()),
            key=lambda p: int(p.name[4:]),
        )

    def _resumed_run_dir(self):
        """The run folder --resume names (a bare run_NNN in --out-dir, or a path), or the newest
        unfinished one (no summary.json yet) that this script made; a folder that is not a run of
        this script, as its
        results say, is refused."""
        made_by = {folder: run_script(folder) for folder in self._runs()}
        runs = [folder for folder, script in made_by.items() if script in (self.script, "")]
        others = [
            f"{folder.name} is a run of {script}"
            for folder, script in made_by.items()
            if script and script != self.script
        ]
        named = Path(self.args.resume)
        if self.args.resume != NEWEST:
            run_dir = self.out_dir / named if len(named.parts) == 1 else named
            if not run_dir.is_dir():
                raise ExperimentError(
                    f"--resume {named}: no run folder {run_dir}; the runs of {self.script} in "
                    f"{self.out_dir}: {', '.join(p.name for p in runs) or 'none'}"
                )
            script = run_script(run_dir)
            if not run_dir.name.startswith("run_") or script is None:
                raise ExperimentError(
                    f"--resume {named}: {run_dir} is not a run folder (run_NNN holding a "
                    f"config's results.json); nothing was written there"
                )
            if script not in (self.script, ""):
                raise ExperimentError(
                    f"--resume {named}: {run_dir} is a run of {script}, not of {self.script}; "
                    f"resume it with python {script}"
                )
            self.out_dir = run_dir.parent
            why = "named on the command line"
        elif not runs:
            raise ExperimentError(
                f"--resume: no run of {self.script} to continue in {self.out_dir}"
                + (f" ({', '.join(others)})" if others else "")
            )
        else:
            unfinished = [folder for folder in runs if not (folder / "summary.json").exists()]
            run_dir = (unfinished or runs)[-1]
            newest = "unfinished run" if unfinished else "run, none being unfinished,"
            why = f"the newest {newest} in {self.out_dir}"
        print(f"resuming {run_dir}: {why} (--resume run_NNN picks another)")
        return run_dir

    def _locked(self, run_dir):
        """run_dir, locked until this process ends: another process is refused with one line."""
        if fcntl is not None:
            try:  # never through a planted link: O_NOFOLLOW
                descriptor = os.open(
                    run_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644
                )
            except OSError as error:
                raise ExperimentError(
                    f"cannot lock {run_dir / '.lock'} ({error.strerror}): it must be a "
                    f"plain file; delete it if no run is using {run_dir}"
                ) from None
            self._lock = os.fdopen(descriptor, "r+")
            try:
                # a POSIX lock: held by the process
                fcntl.lockf(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise ExperimentError(
                    f"{run_dir} is in use by process {(run_dir / '.lock').read_text().strip()}; "
                    f"wait for it to end, or stop it"
                ) from None
            self._lock.truncate(0)
            print(os.getpid(), file=self._lock, flush=True)
        return run_dir


def run_script(folder):
    """The script that made run folder `folder`, as its summary.json or a config's results.json
    says; "" for a run folder whose files do not say (damaged: --resume then names the damage); None
    for a folder that
    holds no run (nothing a config saves)."""
    for path in [folder / "summary.json", *sorted(folder.glob("config_*/results.json"))]:
        with contextlib.suppress(OSError, ValueError):
            saved = json.loads(path.read_text())
            for result in saved if isinstance(saved, list) else [saved]:
                if isinstance(result, dict) and isinstance(result.get("script"), str):
                    return result["script"]
    saved_files = ("results.json", "checkpoint.pt", "model.pth")
    return "" if any(any(folder.glob(f"config_*/{name}")) for name in saved_files) else None


def _write_summary(run_dir, results, wall_seconds, resumed, compare_key=None):
    """summary.json over every config in the run folder, the comparison plots, and the summary
    lines. wall_seconds: this process's, from the script's start to now (a resumed run's: the last
    process's)."""
    names = {r["name"] for r in results}
    for path in run_dir.glob("config_*/results.json"):
        if path.parent.name not in names:  # a config an earlier process of the run finished
            results.append(load_saved(path, refused))
    results.sort(key=lambda r: int(r["name"][7:]))
    configs = [{k: v for k, v in r.items() if k not in ("history", "environment")} for r in results]
    summary = {
        "script": results[0]["script"],
        "wall_seconds": wall_seconds,
        "resumed": resumed,
        "configs": configs,
    }
    write_json(run_dir / "summary.json", summary)
    finished = [r for r in results if r["history"]]
    if len(finished) > 1:
        curves = []
        for r in finished:
            curves.append((r["name"], r, "val_accuracy" if r["validation"] else "test_accuracy"))
        _plot(run_dir / "test_accuracy.png", [("accuracy of every config", "accuracy (%)", curves)])
    gaps_recorded = all("train_eval_accuracy" in r["history"][-1] for r in finished)
    if compare_key and finished and gaps_recorded:
        panels = []
        for r in finished:
            title = f"{r['name']}: {compare_key}={r['config'][compare_key]}"
            lines = [("train (eval mode)", r, "train_eval_accuracy"), ("test", r, "test_accuracy")]
            panels.append((title, "accuracy (%)", lines))
        _plot(run_dir / "train_vs_test.png", panels, same_scale=True)
    print(
        f"\nResults ({run_dir}). Final test accuracy: the last epoch's. Training time: the seconds "
        f"of every epoch's training steps, GPU synchronized, evaluation and the first "
        f"{WARMUP_STEPS} steps (warm-up) left out."
    )
    for result in results:
        print(summary_line(result))


def summary_line(result):
    """The report's form: config_N: Configuration: {...} Final test accuracy: xx.xx% Training time:
    ..."""
    outcome = (
        f"Final test accuracy: {result['final_test_accuracy']:.2f}%"
        if result["status"] == "completed"
        else f"{result['status'].upper()} after {len(result['history'])} epochs"
    )
    line = f"{result['name']}: Configuration: {result['config']} {outcome} "
    line += f"Training time: {result['train_seconds']:.2f}"
    line += (
        f" seconds (+ {result['warmup_seconds']:.2f} s warm-up)"
        if result.get("warmup_seconds")
        else " seconds"
    )
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
        line += (
            f" | report: {reported['test_accuracy']:.{decimals}f}% "
            f"({points:+.{decimals}f} {unit}{precision})"
        )
        if "time_ratio" in versus:
            line += f", {reported['train_seconds']:.2f} s on {reported['device']} "
            seconds = result["report_loop_seconds"]
            line += f"(ours {seconds:.2f} s as its loop timed: steps and evaluations, "
            line += f"{versus['time_ratio']:.2f}x)"
    elif result.get("not_compared"):
        line += f" | not compared with the report: {result['not_compared']}"
    return line


# what add_epoch() takes besides the running train accuracy, as the history records it and
# curves.png labels it; recording train_eval_accuracy also adds the train-test gap (the overfitting)
# to the final figures and the summary line, and train_vs_test.png to a run with compare_key
METRICS = {
    # counted by EpochMeter.add, always there
    "train_accuracy": "train (running, during the epoch)",
    "train_eval_accuracy": "train (eval mode)",  # the training images evaluated after the epoch
    "val_accuracy": "validation",  # a validation split (val_fraction)
    "test_accuracy": "test",
}


def epoch_seed(seed, epoch, stream):
    """The seed of one epoch's random draws in a run of --seed `seed`; stream "order" for the order
    of the training batches (Batches.epoch), stream "draws" for torch's global generator, which the
    scripts seed at every epoch's start for its dropout masks, crops and flips. It depends on the
    seed and the epoch alone, so that a resumed run draws what an uninterrupted one would. (The
    initial weights: each script calls torch.manual_seed(seed) right before building a config's
    model.)"""
    return seed * 1_000_003 + epoch * 2 + ("order", "draws").index(stream)


class EpochMeter:
    """One epoch's running training loss and accuracy, summed on the device (a GPU is not waited for
    inside the epoch). The script's train() calls add() after every step. In a process's first epoch
    of a config, `warmup_end` is the clock() once its first WARMUP_STEPS steps (compilation, cuDNN's
    autotuning) are done, so that seconds() can count them apart; else None."""

    def __init__(self, record, epoch, steps, warmup_steps):
        device = record.run.device
        self.record = record
        self.epoch = epoch
        self.steps = steps  # in the epoch
        self.warmup_steps = warmup_steps
        self.warmup_end = None
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.done = 0  # steps
        self.images = 0
        self.logged_loss = 0.0  # loss_sum at the last --log-interval line

    def add(self, loss, outputs, labels):
        """After a training step: sums its loss and correct predictions; prints the running loss
        every --log-interval steps and, seconds into a CPU run that will take long, how long and how
        to shorten it."""
        run = self.record.run
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
            run.estimating = False  # once per run, in its first epoch: the pace after the warm-up
            pace = (time.perf_counter() - self.warmup_end) / (self.done - self.warmup_steps)
            left = pace * self.steps * run.epochs_left
            if left > 600:
                print(
                    f"at this pace its training alone takes {duration(left)}; a short run: "
                    f"{run.short_command()}"
                )

    def seconds(self, started, ended):
        """(training seconds, warm-up seconds) of an epoch timed from `started` to `ended` by
        clock(): the warm-up steps, if this epoch had them, counted apart."""
        timed_from = started if self.warmup_end is None else self.warmup_end
        return ended - timed_from, timed_from - started

    def loss(self):
        return self.loss_sum.item() / max(1, self.done)

    def accuracy(self):
        return 100.0 * self.correct.item() / max(1, self.images)


class Record:
    """One config's results in <run folder>/config_N/, beside `reported`, the report's figures. A
    script calls, in this order: Record(...); resume(model, optimizer, ...), which names the state
    every checkpoint holds and returns the epoch to start from; then per epoch meter(), its steps
    (EpochMeter.add) and add_epoch(), which saves results.json and a complete checkpoint; and
    finish() once every epoch is trained. A NaN or blown-up loss ends the config, "diverged"."""

    def __init__(self, run, name, config, validation=False, reported=None, precision="fp32"):
        """Makes the run folder (the run's first Record: locked while this process lives) and
        config_N in it. run.load_data() must come first: --resume checks the data against the
        saved run's. validation: each epoch evaluates a validation split; precision: how the model
        computes, recorded and checked on resume."""
        if not run.data:
            raise RuntimeError("call run.load_data() before Record(): --resume checks the data")
        self.run = run
        self.name = name
        self.config = config
        self.state = None  # {"model": ..., "optimizer": ..., ...}: set by resume()
        self.start_epoch = 0
        self._saving = None  # the thread writing the last epoch's files
        self._saving_error = None
        self.folder = run.new_run_dir() / name
        self.started = time.perf_counter()  # for the time left, printed after every epoch
        self.last_epoch_end = self.started  # where the next epoch's wall time starts
        environment = {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "device": run.describe,
            "device_type": run.device.type,
            "gpus": [
                torch.cuda.get_device_name(i)
                for i in range(run.gpu_count)
                if run.device.type == "cuda"
            ],
            "torch_cuda_build": torch.version.cuda,
            "cpu_threads": torch.get_num_threads(),
            "data_parallel": run.gpu_count > 1,
            "compile": run.args.compile,
            "seed": run.args.seed,
            "subset": run.args.subset,
            "dry_run": run.args.dry_run,
            "command": sys.argv,
            "code": run.code,
        }
        not_compared = None
        if reported and run.changed:
            not_compared = f"other {', '.join(run.changed)}"
        self.result = {
            "name": name,
            "script": run.script,
            "status": "running",
            "config": config,
            "precision": precision,
            "validation": validation,
            "reported": reported,
            "data": run.data,
            "history": [],
            "not_compared": not_compared,
            "environment": environment,
        }
        run.records.append(self)
        self.folder.mkdir(exist_ok=True)

    @property
    def status(self):
        """running (epochs left to train, or all trained and not yet finished), interrupted,
        diverged or completed."""
        return self.result["status"]

    def resume(self, model, optimizer, **more):
        """Names what every checkpoint saves: the model (its plain module, unwrapped from
        torch.compile and nn.DataParallel), the optimizer and `more` (a GradScaler, a scheduler:
        anything with state_dict() and load_state_dict(), saved under its keyword). With --resume,
        loads this config's saved state into them. Returns the 0-based epoch to train from:
        0 for a new config, num_epochs for one already completed or diverged."""
        self.state = {"model": unwrap(model), "optimizer": optimizer, **more}
        self.start_epoch = self._restore() if self.run.args.resume is not None else 0
        # configs() counted the epochs results.json lists; the checkpoint has the last word
        self.run.epochs_left += self.run.epochs_saved.get(self.name, 0) - self.start_epoch
        return self.start_epoch

    def meter(self, epoch, steps):
        """The EpochMeter of epoch `epoch` (0-based) of `steps` steps, for the script's train() to
        add every step to. A process's first epoch of the config times its first steps apart
        (warm-up)."""
        if self.state is None:
            raise RuntimeError(
                "call record.resume(model, optimizer) before training: it names what "
                "the checkpoints save"
            )
        warmup_steps = min(WARMUP_STEPS, steps) if epoch == self.start_epoch else 0
        return EpochMeter(self, epoch, steps, warmup_steps)

    def add_epoch(self, meter, seconds, warmup_seconds=0.0, eval_seconds=None, **accuracies):
        """Records epoch meter.epoch: its running loss and accuracy, `seconds` of training (the
        warm-up's `warmup_seconds` apart), the `eval_seconds` of its evaluations (the report's loop
        timed them with the steps), `accuracies` (METRICS' keys) and its wall time (from the
        epoch before's add_epoch, or in a new process from Record(): all of it), and prints it.
        Returns False when the loss is NaN, infinite or blown up: the config is then "diverged" and
        its training ends. The checkpoint and results.json are written in a thread while the next
        epoch trains (a GPU epoch can take about as long as writing 90 MB); the next add_epoch,
        finish() and an interruption wait for them."""
        unknown = set(accuracies) - set(METRICS)
        if unknown:
            raise ValueError(f"add_epoch: {sorted(unknown)} are not in common.METRICS")
        history = self.result["history"]
        loss = meter.loss()
        now = time.perf_counter()
        entry = {
            "epoch": len(history) + 1,
            "train_loss": loss if math.isfinite(loss) else None,
            "train_accuracy": meter.accuracy(),
            **accuracies,
            "seconds": seconds,
            # since the epoch before ended, or this process began the config: all of it
            "wall_seconds": now - self.last_epoch_end,
        }
        self.last_epoch_end = now
        if meter.warmup_steps:
            entry["warmup_seconds"] = warmup_seconds
        if eval_seconds is not None:
            entry["eval_seconds"] = eval_seconds
        if not math.isfinite(loss) or loss > BLOWN_UP_LOSS:
            history.append(entry)
            self.result["status"] = "diverged"
            # never to be trained
            self.run.epochs_left -= self.config["num_epochs"] - len(history) + 1
            self._write_results()
            print(
                f"{self.name} diverged: the training loss is {loss:.4g} in epoch "
                f"{len(history)}; try a lower learning rate than {self.config['lr']} (--lr)",
                file=sys.stderr,
            )
            return False
        self.wait_for_saving()  # the previous epoch's files, before this one's replace them
        checkpoint = {
            "config": self.config,
            "epoch": entry["epoch"],
            "history": [*history, entry],
            **{key: value.state_dict() for key, value in self.state.items()},
        }
        checkpoint = cpu_copy(checkpoint)  # a snapshot: training goes on changing the tensors
        history.append(entry)
        self.run.epochs_left -= 1
        results_text = json_text(self._updated_result())
        self._saving = threading.Thread(target=self._save_epoch, args=(checkpoint, results_text))
        self._saving.start()
        evaluated = "val" if self.result["validation"] else "test"
        epoch_wall = (time.perf_counter() - self.started) / (len(history) - self.start_epoch)
        left = duration(epoch_wall * self.run.epochs_left)
        print(
            f"{self.name} epoch {len(history)}/{self.config['num_epochs']}: loss {loss:.3f}, train "
            f"{entry['train_accuracy']:.2f}%, {evaluated} "
            f"{accuracies[evaluated + '_accuracy']:.2f}%, "
            f"{seconds:.1f} s; {left} left in the run"
        )
        return True

    def finish(self, test_batches, **extra):
        """Once every epoch is trained (status "running"): the final figures (`extra`: the script's
        own, such as weight_norm), model.pth, results.json and the pictures; status "completed"."""
        result = self.result
        if result["status"] != "running" or len(result["history"]) != self.config["num_epochs"]:
            raise RuntimeError(
                f"finish() after the last epoch of a running config, not "
                f"{result['status']} at epoch {len(result['history'])}"
            )
        model = self.state["model"].eval()
        counts = confusion_matrix(model, test_batches)
        last = result["history"][-1]
        final_test_accuracy = last["test_accuracy"] if "test_accuracy" in last else accuracy(counts)
        result.update(
            final_test_accuracy=final_test_accuracy,
            final_val_accuracy=last.get("val_accuracy"),
            final_train_accuracy=last["train_accuracy"],
            per_class_test_accuracy=per_class_accuracy(counts),
            confusion_matrix=counts.tolist(),
            extra=extra or None,
        )
        if "train_eval_accuracy" in last:
            result["final_train_eval_accuracy"] = last["train_eval_accuracy"]
            result["train_test_gap"] = last["train_eval_accuracy"] - final_test_accuracy
        save_torch(self.folder / "model.pth", model.state_dict())
        title = f"{self.run.script} {self.name}"
        plot_confusion(counts, self.folder / "confusion.png", title)
        plot_predictions(model, test_batches, self.folder / "predictions.png", title)
        result["status"] = "completed"
        try:  # curves.png, then results.json: "completed" there means every file is written
            self._write_results()
        # unsaved: still running, so the resume line is printed and --resume finishes it
        except ExperimentError:
            result["status"] = "running"
            raise

    def mark_interrupted(self):
        """After Ctrl-C or a signal: status "interrupted" in results.json, once the epoch being
        saved is; a failure to write it (a full disk) leaves the files as the last saved epoch left
        them and raises ExperimentError."""
        self.result["status"] = "interrupted"
        self._write_results()

    def _save_epoch(self, checkpoint, results_text):
        """In a thread: the checkpoint first, so that results.json never lists an epoch it lacks."""
        try:
            save_torch(self.folder / "checkpoint.pt", checkpoint)
            write_file(self.folder / "results.json", results_text.encode())
        except Exception as error:  # raised in the training thread by wait_for_saving
            self._saving_error = error

    def wait_for_saving(self):
        """Waits for the last epoch's checkpoint and results.json. A failure to write them is raised
        here, and that epoch taken back from the history: the files hold the one before."""
        if self._saving is None:
            return
        self._saving.join()
        error = self._saving_error
        self._saving = None
        self._saving_error = None
        if error is not None:
            self.result["history"].pop()
            self.run.epochs_left += 1
            raise error

    def _updated_result(self):
        """self.result with its totals and the comparison with the report brought up to date."""
        result = self.result
        reported = result["reported"] or {}
        history = result["history"]
        # warm-up, evaluation apart
        result["train_seconds"] = sum(entry["seconds"] for entry in history)
        result["warmup_seconds"] = sum(entry.get("warmup_seconds", 0.0) for entry in history)
        walls = [entry.get("wall_seconds") for entry in history]
        # None: an epoch trained by code that did not time it yet
        result["wall_seconds"] = None if None in walls else sum(walls)
        # the time the report's loop counted: every step and every epoch's evaluation
        timed_as_report = all("eval_seconds" in entry for entry in history)
        result["report_loop_seconds"] = None
        if history and timed_as_report:
            result["report_loop_seconds"] = result["train_seconds"] + result["warmup_seconds"]
            result["report_loop_seconds"] += sum(entry["eval_seconds"] for entry in history)
        result["versus_report"] = None
        comparable = not result["not_compared"] and "test_accuracy" in reported
        if comparable and "final_test_accuracy" in result:
            difference = result["final_test_accuracy"] - reported["test_accuracy"]
            # no more decimals than the report wrote: 59.25% against its "60%" is -1, not -0.75
            difference = round(difference, reported.get("decimals", 2))
            result["versus_report"] = {"test_accuracy_points": difference}
            if "train_seconds" in reported and result["report_loop_seconds"]:
                ratio = result["report_loop_seconds"] / reported["train_seconds"]
                result["versus_report"]["time_ratio"] = ratio
        return result

    def _write_results(self):
        """results.json now, once the epoch being saved is; before it curves.png, once the config
        has stopped after at least one epoch (so results.json saying so means the picture is there
        too)."""
        self.wait_for_saving()
        result = self._updated_result()
        if result["status"] != "running" and result["history"]:
            panels = [
                (f"{self.name}: training loss", "loss", [("train", result, "train_loss")]),
                (
                    f"{self.name}: accuracy",
                    "accuracy (%)",
                    [(label, result, key) for key, label in METRICS.items()],
                ),
            ]
            _plot(self.folder / "curves.png", panels)
        write_json(self.folder / "results.json", result)

    def _restore(self):
        """With --resume: the epoch to go on from, once this config's saved state is loaded. A file
        that cannot be used, or other settings, end the script with one line; nothing in the run
        folder changes first."""
        results_file = self.folder / "results.json"
        checkpoint_file = self.folder / "checkpoint.pt"
        fix = f"start a new run (without --resume), or delete {self.folder} to train it again"

        def refuse(path, reason):
            where = path.relative_to(self.run.run_dir)
            return ExperimentError(f"cannot resume {self.run.run_dir}: {where}: {reason}; {fix}")

        if not results_file.exists():
            if checkpoint_file.exists():
                raise refuse(checkpoint_file, "it has no results.json beside it")
            return 0
        saved = load_saved(results_file, refuse)
        now = {
            "script": self.run.script,
            "config": self.config,
            "seed": self.run.args.seed,
            "subset": self.run.args.subset,
            "dry_run": self.run.args.dry_run,
            "device_type": self.run.device.type,
            "data": self.run.data,
            "precision": self.result["precision"],
        }
        before_now = {**saved.get("environment", {}), **saved}
        for key, value in now.items():
            if before_now.get(key) != value:
                raise refuse(
                    results_file,
                    f"it was trained with {key} {before_now.get(key)}, not "
                    f"{value} (resume with those)",
                )
        if saved["status"] in ("completed", "diverged"):
            if saved["status"] == "completed":
                load_saved(self.folder / "model.pth", refuse, self.state["model"].load_state_dict)
            print(f"{self.name}: already {saved['status']} in {self.folder}, skipped")
            self.result.update(saved)
            return self.config["num_epochs"]
        if not checkpoint_file.exists():
            if saved["history"]:
                epochs = len(saved["history"])
                raise refuse(
                    checkpoint_file, f"it is missing, and results.json lists {epochs} epochs"
                )
            return 0
        checkpoint = load_saved(checkpoint_file, refuse, self._load_checkpoint)
        self.result["history"] = checkpoint["history"]
        print(f"{self.name}: resuming after epoch {checkpoint['epoch']}")
        return checkpoint["epoch"]

    def _load_checkpoint(self, checkpoint):
        if checkpoint["config"] != self.config:
            raise ValueError(f"it is of config {checkpoint['config']}")
        for key, value in self.state.items():
            value.load_state_dict(checkpoint[key])


def refused(path, reason):
    """The error of a saved file that cannot be used, where no more needs saying: "path: reason"."""
    return ExperimentError(f"{path}: {reason}")


def load_saved(path, refuse, load=None):
    """results.json, or a torch file loaded safely (weights_only: tensors and plain data, never
    code) onto the CPU whatever the training device and handed to load(state). Every failure raises
    refuse(path, reason)."""
    try:
        if path.suffix == ".json":
            state = json.loads(path.read_text())
            if not isinstance(state, dict) or not RESULT_KEYS <= state.keys():
                missing = sorted(RESULT_KEYS - state.keys()) if isinstance(state, dict) else "all"
                raise ValueError(f"not a run's results: keys {missing} missing")
            if state["status"] == "completed" and not isinstance(
                state.get("final_test_accuracy"), (int, float)
            ):
                raise ValueError("completed without a final_test_accuracy")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise refuse(path, "it is missing") from None
    except pickle.UnpicklingError:  # torch's weights_only refusal
        raise refuse(
            path, "it holds more than tensors and plain data (code to run), so it is not loaded"
        ) from None
    except Exception as error:  # cut short, or not a torch file
        raise refuse(path, f"it is damaged ({first_line(error)})") from None
    try:
        if load:
            load(state)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise refuse(path, f"it does not fit this model ({first_line(error)})") from None
    return state


def evaluate_saved(args, model, mean, std):
    """--evaluate PATH: loads saved weights into `model`, evaluates them on the test set and prints
    the accuracy, per class, and the figure the results.json beside them records; the exit
    status."""
    path = Path(args.evaluate)
    load_saved(
        path,
        lambda path, reason: ExperimentError(f"--evaluate {path}: {reason}"),
        model.load_state_dict,
    )
    device = pick_device(args)
    test = load_cifar10(args.data_dir).test
    test = Split(test.images[: args.subset], test.labels[: args.subset]) if args.subset else test
    counts = confusion_matrix(model.to(device).eval(), Batches(test, 1000, device, mean, std))
    print(f"{path}: test accuracy {accuracy(counts):.2f}% on {len(test.labels)} images")
    print(
        "\n".join(f"  {name:5s} {value:.1f}%" for name, value in per_class_accuracy(counts).items())
    )
    try:
        recorded = json.loads((path.parent / "results.json").read_text())
        print(
            f"recorded in {path.parent / 'results.json'}: "
            f"{recorded['final_test_accuracy']:.2f}% on "
            f"{recorded['data']['test_images']} test images"
        )
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no results.json beside the weights, or none with a final figure
    return 0


def write_file(path, data):
    """Writes the bytes `data` to a new temporary file beside `path` (a random name, created
    exclusively: never through a planted link), then renames it over `path`: readers never see half
    a file, a failed write leaves the old one, and nothing is left behind, not even on Ctrl-C. A
    failure (a full disk,
    too long a name) is one error line that names the system's reason."""
    path = Path(path)
    temporary = None
    try:
        descriptor, temporary = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
        )
        _write_bytes(descriptor, temporary, data)
        os.replace(temporary, path)  # replaces a link at `path` itself, never its target
    except OSError as error:
        _remove_quietly(temporary)
        raise ExperimentError(
            f"cannot write {path} ({error.strerror or first_line(error)})"
        ) from None
    except BaseException:
        _remove_quietly(temporary)
        raise


def _write_bytes(descriptor, name, data):
    """`data` into the new file open as `descriptor` (at `name`), closing it."""
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def _remove_quietly(path):
    if path is not None:
        with contextlib.suppress(OSError):
            os.remove(path)


def json_text(data):
    """Strict JSON (no NaN or Infinity, which other readers refuse), indented."""
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def write_json(path, data):
    write_file(path, json_text(data).encode())


def cpu_copy(state):
    """`state` (nested dicts and lists of tensors and plain values) with every tensor copied to the
    CPU."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: cpu_copy(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(cpu_copy(value) for value in state)
    return state


def save_torch(path, data):
    buffer = io.BytesIO()  # serialized first: a full disk is then the system's error, named as such
    torch.save(data, buffer)
    write_file(path, buffer.getvalue())


def _plot(path, panels, same_scale=False):
    """Saves a row of panels, each (title, y label, [(label, result, history key), ...]): one curve
    per line."""
    from matplotlib.figure import Figure  # no pyplot: no display, and a faster import

    figure = Figure(figsize=(5.5 * len(panels), 4), layout="tight")
    axes = figure.subplots(1, len(panels), sharey=same_scale, squeeze=False)[0]
    for axis, (title, ylabel, lines) in zip(axes, panels):
        for label, result, key in lines:
            points = [
                (entry["epoch"], entry[key])
                for entry in result["history"]
                if entry.get(key) is not None
            ]
            # no points: no line
            axis.plot(*zip(*points), label=label, marker="." if len(points) < 30 else None)
        axis.set(title=title, xlabel="epoch", ylabel=ylabel)
        axis.grid(alpha=0.3)
        if axis.lines:  # a config that diverged in its first epoch has no curve
            axis.legend(fontsize="small")
    _save_figure(figure, path, dpi=110)


def plot_confusion(counts, path, title):
    """The confusion matrix as counts, with each true class's accuracy beside its row."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.2, 6), layout="tight")
    axis = figure.add_subplot()
    figure.colorbar(
        axis.imshow(counts.numpy(), cmap="Blues"), ax=axis, shrink=0.8, label="test images"
    )
    axis.set_xticks(range(10), CLASSES, rotation=45)
    axis.set_yticks(
        range(10), [f"{name} {value:.0f}%" for name, value in per_class_accuracy(counts).items()]
    )
    for (row, column), count in np.ndenumerate(counts.numpy()):
        axis.text(
            column,
            row,
            count,
            ha="center",
            va="center",
            fontsize=7,
            color="white" if count > counts.max().item() / 2 else "black",
        )
    axis.set(
        title=f"{title}: {accuracy(counts):.2f}% correct",
        xlabel="predicted",
        ylabel="true class (its accuracy)",
    )
    _save_figure(figure, path, dpi=100)


@torch.no_grad()
def plot_predictions(model, batches, path, title, count=32):
    """The first `count` test images with the model's predicted class and the true one, as the
    PyTorch tutorial shows them: green where right, red where wrong. The model in eval mode."""
    from matplotlib.figure import Figure

    images = batches.images[:count]
    labels = batches.labels[:count]
    predicted = model(images).argmax(1).cpu()
    pictures = (
        (images * batches.std + batches.mean).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    )
    columns = 8
    rows = math.ceil(len(pictures) / columns)
    figure = Figure(figsize=(1.3 * columns, 1.5 * rows + 0.4), layout="tight")
    figure.suptitle(f"{title}: predicted (true)")
    for index, (picture, guess, truth) in enumerate(
        zip(pictures, predicted.tolist(), labels.tolist())
    ):
        axis = figure.add_subplot(rows, columns, index + 1)
        axis.imshow(picture, interpolation="nearest")
        axis.set_title(
            f"{CLASSES[guess]} ({CLASSES[truth]})",
            fontsize=7,
            color="green" if guess == truth else "red",
        )
        axis.axis("off")
    _save_figure(figure, path, dpi=100)


def _save_figure(figure, path, dpi):
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=dpi, format="png")
    write_file(path, buffer.getvalue())
