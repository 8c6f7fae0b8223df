"""Tiny CIFAR-10 files in the original `cifar-10-batches-py` pickle layout, and script helpers."""

import itertools
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def class_images(labels, rng):
    """Images a small network can learn: each class has its own colour and a bright square."""
    images = rng.integers(0, 60, size=(len(labels), 3, 32, 32))
    for index, label in enumerate(labels):
        images[index, label % 3] += 120
        row, column = divmod(int(label), 4)
        images[index, :, 8 * row : 8 * row + 8, 8 * column : 8 * column + 8] += 70
    return images.clip(0, 255).astype(np.uint8)


def write_cifar10(folder, per_batch=40, test_count=100, seed=0):
    """Writes data_batch_1..5, test_batch and batches.meta with the official archive's names and
    keys.

    (The official files are Python 2 pickles; these are Python 3 ones, read the same way by
    common.load_cifar10 and by torchvision.)
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = [
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
    ]
    for name in names:
        count = test_count if name == "test_batch" else per_batch
        labels = rng.integers(0, 10, size=count)
        batch = {
            "batch_label": name,
            "labels": labels.tolist(),
            "data": class_images(labels, rng).reshape(count, -1),
            "filenames": [f"image_{i}.png" for i in range(count)],
        }
        with open(folder / name, "wb") as file:
            pickle.dump(batch, file)
    labels = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump(
            {"num_cases_per_batch": per_batch, "label_names": labels, "num_vis": 3072}, file
        )
    return folder


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        'slow: over a second or two on a 2-core CPU; `pytest -m "not slow"` leaves them out',
    )


def _ignored_by_the_tests(signal_number, frame):
    """The tests' process on a signal its launcher told it to ignore: nothing, as before."""


@pytest.fixture(autouse=True, scope="session")
def scripts_can_be_stopped():
    """nohup starts pytest with SIGHUP ignored, and a shell its background jobs (`pytest ... &` in
    a script) with Ctrl-C ignored. The scripts the tests start would inherit that and keep ignoring
    the signal, as a run should (common.run_main), and a test that sends it would see the run go on
    to its end. A stopping signal ignored here is caught instead, by a handler that does nothing:
    this process still ignores it, and a process it starts begins with the signal's default action
    (a caught signal is reset at exec, an ignored one is not)."""
    import common

    numbers = (signal.SIGINT, *common.STOPPING_SIGNALS)
    previous = {number: signal.getsignal(number) for number in numbers}
    for number, handler in previous.items():
        if handler == signal.SIG_IGN:
            signal.signal(number, _ignored_by_the_tests)
    yield
    for number, handler in previous.items():
        signal.signal(number, handler)


@pytest.fixture(autouse=True)
def torch_settings_restored():
    """lenet_cpu.main sets one thread and turns oneDNN off for its whole process, as a program may;
    the tests after it get the defaults back (ResNet-18 in bf16 without oneDNN is many times
    slower)."""
    import torch

    threads = torch.get_num_threads()
    mkldnn = torch.backends.mkldnn.enabled
    yield
    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = mkldnn


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A folder holding a tiny cifar-10-batches-py: 200 training and 100 test images."""
    root = tmp_path_factory.mktemp("data")
    write_cifar10(root / "cifar-10-batches-py")
    return root


@pytest.fixture(scope="session")
def real_data_dir():
    """Real CIFAR-10 files from $CIFAR10_DIR; the test is skipped without them."""
    folder = os.environ.get("CIFAR10_DIR")
    if not folder or not Path(folder).is_dir():
        pytest.skip("CIFAR10_DIR does not point at real CIFAR-10 files")
    return Path(folder)


def time_lenet_steps(monkeypatch, seconds_of_call):
    """A clock for timing tests: time.perf_counter stands still except in lenet_cpu.Net's forward,
    whose n-th call (0-based, evaluation's too) moves it by seconds_of_call(n) seconds."""
    import lenet_cpu

    now = [0.0]
    calls = itertools.count()
    forward = lenet_cpu.Net.forward

    def timed_forward(model, images):
        now[0] += seconds_of_call(next(calls))
        return forward(model, images)

    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(lenet_cpu.Net, "forward", timed_forward)


def epoch_figures(history):
    """A results.json history without its times (seconds, warm-up, wall), which differ from run to
    run: what two runs that trained alike share."""
    timings = ("seconds", "warmup_seconds", "wall_seconds")
    return [{k: v for k, v in entry.items() if k not in timings} for entry in history]


def on_cpu(data_dir, out_dir, *more):
    """A script's command line on the CPU, with the data in `data_dir`, the runs in `out_dir`, then
    `more`."""
    return ["--device", "cpu", "--data-dir", str(data_dir), "--out-dir", str(out_dir), *more]


def new_run(script, arguments, data_parallel=False):
    """common.Run of a script named `script` with parsed `arguments`, LeNet's normalization, no
    short run."""
    import common

    return common.Run(
        script, arguments, (0.5,) * 3, (0.5,) * 3, short_run="", data_parallel=data_parallel
    )


def run_script(*args, env=None):
    """Runs a script of the repository as a user would; returns the completed process."""
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def interrupt_after_epochs(monkeypatch, epochs):
    """Ctrl-C as soon as a config has recorded `epochs` epochs; undone by monkeypatch.undo()."""
    import common

    add_epoch = common.Record.add_epoch

    def add_epoch_then_stop(record, *args, **kwargs):
        trained_on = add_epoch(record, *args, **kwargs)
        if len(record.result["history"]) == epochs:
            raise KeyboardInterrupt
        return trained_on

    monkeypatch.setattr(common.Record, "add_epoch", add_epoch_then_stop)
