"""Tiny CIFAR-10 files in the original `cifar-10-batches-py` pickle layout, and ways to run the
scripts on them."""

import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import lenet_cpu  # noqa: E402

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(folder, per_batch=40, test_count=100, seed=0):
    """data_batch_1..5, test_batch and batches.meta with the official archive's names and keys
    (Python 3 pickles; the official ones are Python 2's, read alike). Each class has its own colour
    and a bright square, so a small network learns them."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in common.FILES:
        labels = rng.integers(0, 10, size=test_count if name == "test_batch" else per_batch)
        images = rng.integers(0, 60, size=(len(labels), 3, 32, 32))
        for index, label in enumerate(labels):
            images[index, label % 3] += 120
            row, column = divmod(int(label), 4)
            images[index, :, 8 * row:8 * row + 8, 8 * column:8 * column + 8] += 70
        data = images.clip(0, 255).astype(np.uint8).reshape(len(labels), -1)
        batch = {"batch_label": name, "labels": labels.tolist(), "data": data, "filenames": []}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"num_cases_per_batch": per_batch, "label_names": NAMES, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return folder


def pytest_configure(config):
    config.addinivalue_line("markers", 'slow: seconds or more; `pytest -m "not slow"` skips them')


def _ignored_by_the_tests(signal_number, frame):
    """The tests' process on a signal its launcher told it to ignore: nothing, as before."""


@pytest.fixture(autouse=True, scope="session")
def scripts_can_be_stopped():
    """nohup starts pytest with SIGHUP ignored, a shell its background jobs with Ctrl-C ignored;
    a script started from here would inherit that and rightly keep ignoring the signal a test
    sends. A handler that does nothing stands in: this process still ignores the signal, and a
    process it starts begins with the default action (a caught signal is reset at exec)."""
    numbers = (signal.SIGINT, *common.STOPPING_SIGNALS)
    previous = {number: signal.getsignal(number) for number in numbers}
    for number, handler in previous.items():
        if handler == signal.SIG_IGN:
            signal.signal(number, _ignored_by_the_tests)
    yield
    for number, handler in previous.items():
        signal.signal(number, handler)


@contextlib.contextmanager
def torch_settings_kept():
    """lenet_cpu.main sets one thread and turns oneDNN off for its process, as a program may; the
    tests after it get the defaults back (ResNet-18 in bf16 without oneDNN is many times slower)."""
    import torch

    threads = torch.get_num_threads()
    mkldnn = torch.backends.mkldnn.enabled
    yield
    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = mkldnn


@pytest.fixture(autouse=True)
def torch_settings_restored():
    with torch_settings_kept():
        yield


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


def on_cpu(data_dir, out_dir, *more):
    """A script's command line on the CPU, with the data in `data_dir`, runs in `out_dir`."""
    return ["--device", "cpu", "--data-dir", str(data_dir), "--out-dir", str(out_dir), *more]


def results(folder):
    """A config's results.json, read."""
    return json.loads((folder / "results.json").read_text())


def epoch_figures(history):
    """A history without its times, which differ from run to run: what runs that trained alike
    share."""
    return [{k: v for k, v in entry.items() if not k.endswith("seconds")} for entry in history]


def files_in(folder):
    return {path: path.read_bytes() for path in Path(folder).rglob("*") if path.is_file()}


def run_script(*args, env=None):
    """Runs a script of the repository as a user would; returns the completed process."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=600)


def start_script(*args):
    """A script started as a user would, its output in pipes; for a test to signal it."""
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_epochs(process, folder, count):
    deadline = time.monotonic() + 120
    while not ((folder / "results.json").exists() and len(results(folder)["history"]) >= count):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)


def assert_one_error_line(completed, status=1):
    assert completed.returncode == status and "Traceback" not in completed.stderr, completed.stderr
    assert completed.stderr.count("\n") == 1, completed.stderr


def stopped(main, capsys):
    """Runs main() as run_main does; its exit status and stderr."""
    with pytest.raises(SystemExit) as exit:
        common.run_main(main)
    return exit.value.code, capsys.readouterr().err


def interrupt_after_epochs(monkeypatch, epochs):
    """Ctrl-C as soon as a config has recorded `epochs` epochs; undone by monkeypatch.undo()."""
    add_epoch = common.Record.add_epoch

    def add_epoch_then_stop(record, *args, **kwargs):
        trained_on = add_epoch(record, *args, **kwargs)
        if len(record.result["history"]) == epochs:
            raise KeyboardInterrupt
        return trained_on

    monkeypatch.setattr(common.Record, "add_epoch", add_epoch_then_stop)


@pytest.fixture(scope="session")
def interrupted_template(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("interrupted")
    with pytest.MonkeyPatch.context() as monkeypatch, torch_settings_kept():
        interrupt_after_epochs(monkeypatch, 1)
        with pytest.raises(SystemExit):
            common.run_main(lambda: lenet_cpu.main(on_cpu(data_dir, out, "--epochs", "2")))
    return out


@pytest.fixture
def interrupted(interrupted_template, data_dir, tmp_path):
    """In tmp_path, a copy of a lenet_cpu run of 2 epochs stopped by Ctrl-C after its first: its
    command line with --resume, and its config folder."""
    shutil.copytree(interrupted_template, tmp_path, dirs_exist_ok=True)
    arguments = on_cpu(data_dir, tmp_path, "--epochs", "2", "--resume")
    return arguments, tmp_path / "run_001" / "config_1"


def fail_writes(monkeypatch, name, nth, error):
    """The nth rename of a file called `name` into place raises `error` instead, as a full disk
    or Ctrl-C in the middle of writing it would; the temporary file is there at that moment."""
    replace = os.replace
    seen = []

    def failing_replace(source, target):
        seen.append(Path(target).name)
        if Path(target).name == name and seen.count(name) == nth:
            assert Path(source).exists()
            raise error
        return replace(source, target)

    monkeypatch.setattr(os, "replace", failing_replace)
