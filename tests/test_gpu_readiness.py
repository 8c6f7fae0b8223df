"""The GPU path: what can be checked on a CPU with stand-ins, then tests that need CUDA (skipped
without it).

On a GPU machine, run `python -m pytest tests` first: the tests marked `cuda` then run too.
"""

import json
import threading

import pytest
import torch
import torch.nn as nn

import common
import dropout_regularization
import l2_regularization
import lenet_cpu
import lenet_multigpu
import resnet18
from conftest import interrupt_after_epochs, new_run, on_cpu, run_script, time_lenet_steps
from test_interruptions import interrupted_run

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
several_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two or more CUDA GPUs"
)


@pytest.mark.slow
def test_resume_loads_checkpoints_onto_the_cpu_whatever_the_training_device(
    data_dir, tmp_path, monkeypatch
):
    """On a GPU, checkpoints loaded onto the training device broke --resume (a CPU random state
    handed over as a
    CUDA tensor). Here a load that does not ask for the CPU puts every tensor on the meta device, as
    a GPU stand-in."""
    arguments, folder = interrupted_run(data_dir, tmp_path)
    load = torch.load
    monkeypatch.setattr(
        torch,
        "load",
        lambda path, map_location=None, **options: load(
            path, map_location=map_location if map_location == "cpu" else "meta", **options
        ),
    )
    assert lenet_cpu.main(arguments) == 0
    # no random state per device either: a resume with fewer GPUs than the saving run has none to
    # miss
    assert sorted(load(folder / "checkpoint.pt", weights_only=True)) == [
        "config",
        "epoch",
        "history",
        "model",
        "optimizer",
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resnet_keeps_its_own_precision_in_a_replica_thread(dtype):
    """nn.DataParallel runs each replica in a thread that re-enters autocast with the device's
    default dtype (float16 on CUDA). A CPU thread in float16 autocast stands in for one: the model's
    own precision holds there
    (on a GPU, test_data_parallel_replicas_compute_in_bf16 checks it)."""
    model = resnet18.ResNet18(compute_dtype=dtype).eval()
    seen = []
    model.conv1.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))

    def replica():
        with torch.autocast("cpu", dtype=torch.float16), torch.no_grad():
            model(torch.randn(2, 3, 32, 32))

    thread = threading.Thread(target=replica)
    thread.start()
    thread.join()
    assert seen == [dtype]


@pytest.mark.slow
def test_lenet_scripts_train_in_fp32_without_autocast(data_dir, tmp_path, monkeypatch):
    entered = []

    class Autocast(torch.autocast):
        def __init__(self, *args, **kwargs):
            entered.append(kwargs.get("dtype"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch, "autocast", Autocast)
    for number, script in enumerate((lenet_multigpu, l2_regularization, dropout_regularization)):
        assert (
            script.main([*on_cpu(data_dir, tmp_path / str(number), "--configs", "4", "--dry-run")])
            == 0
        )
    assert entered == []
    resnet18.ResNet18(compute_dtype=torch.bfloat16)(torch.randn(1, 3, 32, 32))
    assert entered == [torch.bfloat16]  # ResNet-18 enters autocast in the dtype it is given


def test_torchrun_is_refused_with_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        common.ExperimentError, match="start lenet_multigpu.py with python, not torchrun"
    ):
        lenet_multigpu.main([])


@pytest.mark.slow
def test_a_torchrun_launch_ends_with_that_line_and_no_run_folder(data_dir, tmp_path):
    completed = run_script(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "lenet_multigpu.py",
        "--dry-run",
        "--data-dir",
        data_dir,
        "--out-dir",
        tmp_path,
    )
    assert completed.returncode != 0
    assert "error: start lenet_multigpu.py with python, not torchrun" in completed.stderr
    assert not list(tmp_path.glob("run_*"))


def simulate_gpus(monkeypatch, count):
    """`count` CUDA GPUs as far as device counting and naming go (cpu stands in for them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: f"simulated GPU {index}")


def test_compile_is_refused_with_several_gpus_for_a_data_parallel_script(tmp_path, monkeypatch):
    """dynamo does not trace into nn.DataParallel's replicas; two simulated GPUs stand in for real
    ones."""
    simulate_gpus(monkeypatch, 2)
    arguments = common.parse_args("", [{}], ["--out-dir", str(tmp_path), "--compile"])
    with pytest.raises(common.ExperimentError, match="--compile .*DataParallel"):
        new_run("x.py", arguments, data_parallel=True)


def test_only_a_data_parallel_script_counts_every_gpu(tmp_path, monkeypatch):
    """lenet_cpu.py trains on one GPU of four (simulated): --compile is allowed, one GPU
    recorded."""
    simulate_gpus(monkeypatch, 4)
    arguments = common.parse_args("", [{}], ["--out-dir", str(tmp_path), "--compile"])
    one_device = new_run("lenet_cpu.py", arguments)
    assert one_device.gpu_count == 1 and one_device.describe == "simulated GPU 0"
    arguments = common.parse_args("", [{}], ["--out-dir", str(tmp_path)])
    assert new_run("lenet_multigpu.py", arguments, data_parallel=True).gpu_count == 4


def test_the_clock_waits_for_every_gpu(monkeypatch):
    """nn.DataParallel queues work on every GPU: the epoch's time must include the slowest (three
    simulated)."""
    simulate_gpus(monkeypatch, 3)
    synchronized = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synchronized.append(device))
    common.clock(torch.device("cuda"))
    assert sorted(synchronized) == [0, 1, 2]


@pytest.mark.parametrize("native_bf16, dtype", [(True, torch.bfloat16), (False, torch.float16)])
def test_resnet_computes_in_fp16_on_gpus_without_native_bf16(native_bf16, dtype, monkeypatch):
    """A T4 or V100 (compute capability 7.x) has no bf16 convolutions in cuDNN: fp16 there."""
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return native_bf16 or including_emulation  # emulation counts as support unless excluded

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert resnet18.compute_dtype(torch.device("cuda")) == dtype and asked == [False]


@pytest.mark.slow
def test_resnet_in_fp16_trains_with_a_grad_scaler_and_resumes_its_state(
    data_dir, tmp_path, monkeypatch
):
    """The fp16 path of a GPU without native bf16, run on the CPU (which computes fp16 autocast
    too)."""
    monkeypatch.setattr(resnet18, "compute_dtype", lambda device: torch.float16)
    arguments = on_cpu(
        data_dir,
        tmp_path,
        "--configs",
        "5",
        "--subset",
        "32",
        "--batch-size",
        "16",
        "--epochs",
        "2",
    )
    interrupt_after_epochs(monkeypatch, 1)
    with pytest.raises(SystemExit):
        common.run_main(lambda: resnet18.main(arguments))
    monkeypatch.undo()
    monkeypatch.setattr(resnet18, "compute_dtype", lambda device: torch.float16)
    checkpoint = torch.load(tmp_path / "run_001" / "config_5" / "checkpoint.pt", weights_only=True)
    assert checkpoint["grad_scaler"]["scale"] > 0  # the loss scale goes on from where it was
    assert resnet18.main([*arguments, "--resume", "run_001"]) == 0
    results = json.loads((tmp_path / "run_001" / "config_5" / "results.json").read_text())
    assert results["status"] == "completed" and results["precision"].startswith(
        "fp16 autocast with a GradScaler"
    )


# every LeNet script, with a config of a small batch
LENET_SCRIPTS = [
    (lenet_multigpu, "4"),
    (l2_regularization, "1"),
    (dropout_regularization, "1"),
    (lenet_cpu, "1"),
]


@pytest.mark.slow
def test_lenet_scripts_compile_with_cuda_graphs_on_a_gpu_only(data_dir, tmp_path, monkeypatch):
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: modes.append(mode) or model)
    for number, (script, config) in enumerate(LENET_SCRIPTS):
        assert (
            script.main(
                [
                    *on_cpu(
                        data_dir,
                        tmp_path / str(number),
                        "--configs",
                        config,
                        "--dry-run",
                        "--compile",
                    )
                ]
            )
            == 0
        )
    assert modes == ["default"] * 4
    assert common.lenet_compile_mode(torch.device("cuda")) == "reduce-overhead"


@pytest.mark.slow
def test_lenet_scripts_step_with_sgds_fused_kernel(data_dir, tmp_path, monkeypatch):
    fused = []
    sgd = torch.optim.SGD

    class SGD(sgd):
        def __init__(self, *args, **kwargs):
            fused.append(kwargs.get("fused"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "SGD", SGD)
    for number, (script, config) in enumerate(LENET_SCRIPTS):
        assert (
            script.main(
                [*on_cpu(data_dir, tmp_path / str(number), "--configs", config, "--dry-run")]
            )
            == 0
        )
    assert fused == [True] * 4


def test_checkpoints_are_written_off_the_training_thread(data_dir, tmp_path, monkeypatch):
    """An epoch's checkpoint is written while the next epoch trains; every one is complete by the
    end."""
    writers = []
    save_torch = common.save_torch

    def recording_save_torch(path, data):
        writers.append((path.name, threading.current_thread() is threading.main_thread()))
        save_torch(path, data)

    monkeypatch.setattr(common, "save_torch", recording_save_torch)
    arguments = on_cpu(data_dir, tmp_path, "--epochs", "3")
    assert lenet_cpu.main(arguments) == 0
    assert writers == [("checkpoint.pt", False)] * 3 + [("model.pth", True)]
    folder = tmp_path / "run_001" / "config_1"
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["epoch"] == 3
    assert len(json.loads((folder / "results.json").read_text())["history"]) == 3


def test_a_checkpoint_that_cannot_be_written_ends_the_run_with_the_epoch_before_saved(
    data_dir, tmp_path, monkeypatch
):
    save_torch = common.save_torch
    calls = []

    def full_disk_on_the_second(path, data):
        calls.append(path.name)
        if len(calls) == 2:
            raise common.ExperimentError(f"cannot write {path} (No space left on device)")
        save_torch(path, data)

    monkeypatch.setattr(common, "save_torch", full_disk_on_the_second)
    arguments = on_cpu(data_dir, tmp_path, "--epochs", "3")
    with pytest.raises(common.ExperimentError, match="No space left"):
        lenet_cpu.main(arguments)
    folder = tmp_path / "run_001" / "config_1"
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert len(json.loads((folder / "results.json").read_text())["history"]) == 1


def test_the_warm_up_of_the_first_steps_is_timed_apart(data_dir, tmp_path, monkeypatch, capsys):
    """Compilation and cuDNN autotuning happen in a config's first steps: a slow first step stands
    in for them."""
    # the first step: 1000 s, others 1 s
    time_lenet_steps(monkeypatch, lambda call: 1000.0 if call == 0 else 1.0)
    assert lenet_cpu.main(on_cpu(data_dir, tmp_path, "--epochs", "2")) == 0
    results = json.loads((tmp_path / "run_001" / "config_1" / "results.json").read_text())
    first, second = results["history"]
    steps = 200 // 4  # 200 training images, batch 4
    warmup = common.WARMUP_STEPS
    assert first["warmup_seconds"] == 1000 + warmup - 1 and "warmup_seconds" not in second
    assert first["seconds"] == steps - warmup and second["seconds"] == steps
    assert results["train_seconds"] == first["seconds"] + second["seconds"]
    assert results["warmup_seconds"] == first["warmup_seconds"]
    assert f"(+ {results['warmup_seconds']:.2f} s warm-up)" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# On a GPU


def conv1_dtypes(model):
    seen = []
    model.conv1.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    return seen


@cuda
@pytest.mark.parametrize(
    "script, argv",
    [
        (lenet_cpu, []),
        (lenet_multigpu, ["--configs", "4"]),
        (l2_regularization, ["--configs", "2"]),
        (dropout_regularization, ["--configs", "2"]),
        (resnet18, ["--configs", "5", "--batch-size", "32"]),
    ],
)
def test_every_script_dry_runs_on_cuda(script, argv, data_dir, tmp_path):
    assert (
        script.main(
            [
                *argv,
                "--dry-run",
                "--device",
                "cuda",
                "--data-dir",
                str(data_dir),
                "--out-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    results = json.loads(next(tmp_path.glob("run_001/config_*/results.json")).read_text())
    assert results["status"] == "completed" and results["environment"]["device_type"] == "cuda"


def convolution_dtypes_in(main, argv):
    """The output dtypes of every convolution that main(argv) runs while training
    (model.train())."""
    seen = set()

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d) and module.training:
            seen.add(output.dtype)

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        assert main(argv) == 0
    finally:
        handle.remove()
    return seen


@cuda
def test_the_scripts_train_resnet_in_its_compute_dtype_and_lenet_in_fp32_on_cuda(
    data_dir, tmp_path
):
    common_argv = ["--dry-run", "--device", "cuda", "--data-dir", str(data_dir)]
    resnet = convolution_dtypes_in(
        resnet18.main,
        [
            *common_argv,
            "--configs",
            "5",
            "--batch-size",
            "32",
            "--out-dir",
            str(tmp_path / "resnet"),
        ],
    )
    lenet = convolution_dtypes_in(
        lenet_multigpu.main, [*common_argv, "--configs", "4", "--out-dir", str(tmp_path / "lenet")]
    )
    assert resnet == {resnet18.compute_dtype(torch.device("cuda"))} and lenet == {torch.float32}


@several_gpus
def test_data_parallel_replicas_compute_in_the_models_dtype():
    model = nn.DataParallel(resnet18.build_model(torch.device("cuda")))
    seen = conv1_dtypes(model.module)
    model(torch.randn(8 * torch.cuda.device_count(), 3, 32, 32, device="cuda"))
    assert seen == [resnet18.compute_dtype(torch.device("cuda"))] * torch.cuda.device_count()


@cuda
def test_resume_on_cuda_goes_on_from_the_checkpoint(data_dir, tmp_path, monkeypatch):
    arguments = [
        "--configs",
        "4",
        "--epochs",
        "4",
        "--device",
        "cuda",
        "--data-dir",
        str(data_dir),
        "--out-dir",
        str(tmp_path),
    ]
    interrupt_after_epochs(monkeypatch, 2)
    with pytest.raises(SystemExit):
        common.run_main(lambda: lenet_multigpu.main(arguments))
    monkeypatch.undo()
    assert lenet_multigpu.main([*arguments, "--resume", "run_001"]) == 0
    results = json.loads((tmp_path / "run_001" / "config_4" / "results.json").read_text())
    assert results["status"] == "completed" and [e["epoch"] for e in results["history"]] == [
        1,
        2,
        3,
        4,
    ]


@cuda
def test_compile_with_cuda_graphs_resumes_and_times_each_processs_warm_up_apart(
    data_dir, tmp_path, monkeypatch
):
    modes = []
    compile_model = torch.compile
    monkeypatch.setattr(
        torch,
        "compile",
        lambda model, mode=None: modes.append(mode) or compile_model(model, mode=mode),
    )
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    arguments = [
        "--configs",
        "4",
        "--epochs",
        "3",
        "--compile",
        "--device",
        "cuda",
        "--data-dir",
        str(data_dir),
        "--out-dir",
        str(tmp_path),
    ]
    add_epoch = common.Record.add_epoch
    interrupt_after_epochs(monkeypatch, 1)
    with pytest.raises(SystemExit):
        common.run_main(lambda: lenet_multigpu.main(arguments))
    monkeypatch.setattr(common.Record, "add_epoch", add_epoch)
    assert lenet_multigpu.main([*arguments, "--resume", "run_001"]) == 0
    results = json.loads((tmp_path / "run_001" / "config_4" / "results.json").read_text())
    assert modes == ["reduce-overhead"] * 2 and results["status"] == "completed"
    # the first steps of each process (compilation, CUDA graph capture) are timed apart: epochs 1
    # and 2
    assert ["warmup_seconds" in entry for entry in results["history"]] == [True, True, False]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize(
    "script, argv",
    [
        (lenet_cpu, ["--epochs", "1"]),
        (resnet18, ["--configs", "5", "--batch-size", "32", "--epochs", "1"]),
    ],
)
@pytest.mark.slow
def test_evaluate_gives_the_recorded_figure_in_the_training_precision(
    script, argv, device, data_dir, tmp_path, capsys
):
    assert (
        script.main(
            [*argv, "--device", device, "--data-dir", str(data_dir), "--out-dir", str(tmp_path)]
        )
        == 0
    )
    model_path = next(tmp_path.glob("run_001/config_*/model.pth"))
    recorded = json.loads((model_path.parent / "results.json").read_text())["final_test_accuracy"]
    capsys.readouterr()
    assert (
        script.main(
            ["--evaluate", str(model_path), "--device", device, "--data-dir", str(data_dir)]
        )
        == 0
    )
    assert f"test accuracy {recorded:.2f}%" in capsys.readouterr().out
