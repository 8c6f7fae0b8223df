"""The GPU path: what can be checked on a CPU with stand-ins, then tests that need CUDA (skipped without it).

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
from conftest import run_script, time_lenet_steps
from test_interruptions import interrupted_run

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
several_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two or more CUDA GPUs")


def test_resume_loads_checkpoints_onto_the_cpu_whatever_the_training_device(data_dir, tmp_path, monkeypatch):
    """On a GPU, checkpoints loaded onto the training device broke --resume (a CPU random state handed over as a
    CUDA tensor). Here a load that does not ask for the CPU puts every tensor on the meta device, as a GPU stand-in."""
    arguments, folder = interrupted_run(data_dir, tmp_path)
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda path, map_location=None, **options: load(
        path, map_location=map_location if map_location == "cpu" else "meta", **options))
    assert lenet_cpu.main(arguments) == 0
    # no random state per device either: a resume with fewer GPUs than the saving run has none to miss
    assert sorted(load(folder / "checkpoint.pt", weights_only=True)) == ["config", "epoch", "history", "model",
                                                                         "optimizer"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resnet_keeps_its_own_precision_in_a_replica_thread(dtype):
    """nn.DataParallel runs each replica in a thread that re-enters autocast with the device's default dtype
    (float16 on CUDA). A CPU thread in float16 autocast stands in for one: the model's own precision holds there
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


def test_lenet_scripts_train_in_fp32_without_autocast(data_dir, tmp_path, monkeypatch):
    entered = []

    class Autocast(torch.autocast):
        def __init__(self, *args, **kwargs):
            entered.append(kwargs.get("dtype"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch, "autocast", Autocast)
    for number, script in enumerate((lenet_multigpu, l2_regularization, dropout_regularization)):
        assert script.main(["--configs", "4", "--dry-run", "--data-dir", str(data_dir),
                            "--out-dir", str(tmp_path / str(number))]) == 0
    assert entered == []
    resnet18.ResNet18(compute_dtype=torch.bfloat16)(torch.randn(1, 3, 32, 32))
    assert entered == [torch.bfloat16]  # ResNet-18 enters autocast in the dtype it is given


def test_torchrun_is_refused_with_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(common.ExperimentError, match="start lenet_multigpu.py with python, not torchrun"):
        lenet_multigpu.main([])


def test_a_torchrun_launch_ends_with_that_line_and_no_run_folder(data_dir, tmp_path):
    completed = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "lenet_multigpu.py",
                           "--dry-run", "--data-dir", data_dir, "--out-dir", tmp_path)
    assert completed.returncode != 0
    assert "error: start lenet_multigpu.py with python, not torchrun" in completed.stderr
    assert not list(tmp_path.glob("run_*"))


def test_compile_is_refused_with_several_gpus(tmp_path, monkeypatch):
    """dynamo does not trace into nn.DataParallel's replicas; two simulated GPUs stand in for real ones."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(common.ExperimentError, match="--compile .*DataParallel"):
        common.Run("x.py", common.parse_args("", [{}], ["--out-dir", str(tmp_path), "--compile"]))


def test_the_warm_up_of_the_first_steps_is_timed_apart(data_dir, tmp_path, monkeypatch, capsys):
    """Compilation and cuDNN autotuning happen in a config's first steps: a slow first step stands in for them."""
    time_lenet_steps(monkeypatch, lambda call: 1000.0 if call == 0 else 1.0)  # the first step: 1000 s, others 1 s
    assert lenet_cpu.main(["--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--epochs", "2"]) == 0
    results = json.loads((tmp_path / "run_001" / "config_1" / "results.json").read_text())
    first, second = results["history"]
    steps, warmup = 200 // 4, common.WARMUP_STEPS  # 200 training images, batch 4
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
@pytest.mark.parametrize("script, argv", [(lenet_cpu, []), (lenet_multigpu, ["--configs", "4"]),
                                          (l2_regularization, ["--configs", "2"]),
                                          (dropout_regularization, ["--configs", "2"]),
                                          (resnet18, ["--configs", "5", "--batch-size", "32"])])
def test_every_script_dry_runs_on_cuda(script, argv, data_dir, tmp_path):
    assert script.main([*argv, "--dry-run", "--device", "cuda", "--data-dir", str(data_dir),
                        "--out-dir", str(tmp_path)]) == 0
    results = json.loads(next(tmp_path.glob("run_001/config_*/results.json")).read_text())
    assert results["status"] == "completed" and results["environment"]["device_type"] == "cuda"


@cuda
def test_resnet_computes_in_bf16_and_lenet_in_fp32_on_cuda():
    dtype = resnet18.compute_dtype(torch.device("cuda"))
    resnet = resnet18.ResNet18(compute_dtype=dtype).cuda().to(memory_format=torch.channels_last)
    lenet = lenet_cpu.Net().cuda()
    resnet_dtypes, lenet_dtypes = conv1_dtypes(resnet), conv1_dtypes(lenet)
    resnet(torch.randn(8, 3, 32, 32, device="cuda")).sum().backward()
    lenet(torch.randn(8, 3, 32, 32, device="cuda")).sum().backward()
    assert resnet_dtypes == [torch.bfloat16] and lenet_dtypes == [torch.float32]
    assert lenet.conv1.weight.is_contiguous()  # NCHW


@several_gpus
def test_data_parallel_replicas_compute_in_bf16():
    model = nn.DataParallel(resnet18.ResNet18(compute_dtype=torch.bfloat16).cuda())
    seen = conv1_dtypes(model.module)
    model(torch.randn(8 * torch.cuda.device_count(), 3, 32, 32, device="cuda"))
    assert seen == [torch.bfloat16] * torch.cuda.device_count()


@cuda
def test_resume_on_cuda_goes_on_from_the_checkpoint(data_dir, tmp_path, monkeypatch):
    arguments = ["--configs", "4", "--epochs", "4", "--device", "cuda", "--data-dir", str(data_dir),
                 "--out-dir", str(tmp_path)]
    add_epoch = common.Record.add_epoch

    def stop_after_two(record, *args, **kwargs):
        add_epoch(record, *args, **kwargs)
        if len(record.result["history"]) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(common.Record, "add_epoch", stop_after_two)
    with pytest.raises(SystemExit):
        common.run_main(lambda: lenet_multigpu.main(arguments))
    monkeypatch.undo()
    assert lenet_multigpu.main([*arguments, "--resume", "run_001"]) == 0
    results = json.loads((tmp_path / "run_001" / "config_4" / "results.json").read_text())
    assert results["status"] == "completed" and [e["epoch"] for e in results["history"]] == [1, 2, 3, 4]


@cuda
def test_compile_on_one_gpu_reports_its_warm_up_apart(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert lenet_multigpu.main(["--configs", "4", "--epochs", "2", "--compile", "--device", "cuda",
                                "--data-dir", str(data_dir), "--out-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "run_001" / "config_4" / "results.json").read_text())
    assert results["environment"]["compile"] and results["warmup_seconds"] > 0
