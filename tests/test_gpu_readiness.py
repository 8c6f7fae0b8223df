"""The GPU path: what a CPU can check with stand-ins, then tests that need CUDA (skipped without).

On a GPU machine, run `python -m pytest tests` first: the tests marked `cuda` then run too.
"""

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
from conftest import interrupt_after_epochs, on_cpu, results, run_script, stopped

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
several_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two or more GPUs")
# every LeNet script, with a config of a small batch
LENET_SCRIPTS = [(lenet_multigpu, "4"), (l2_regularization, "1"), (dropout_regularization, "2"),
                 (lenet_cpu, "1")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resnet_keeps_its_own_precision_in_a_replica_thread(dtype):
    """nn.DataParallel runs each replica in a thread that re-enters autocast with the device's
    default dtype (float16 on CUDA); a CPU thread in float16 autocast stands in for one."""
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


@pytest.mark.parametrize("native_bf16, dtype", [(True, torch.bfloat16), (False, torch.float16)])
def test_resnet_computes_in_fp16_on_gpus_without_native_bf16(native_bf16, dtype, monkeypatch):
    """A T4 or V100 (compute capability 7.x) has no bf16 convolutions in cuDNN: fp16 there."""
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return native_bf16 or including_emulation  # emulation counts unless excluded

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert resnet18.compute_dtype(torch.device("cuda")) == dtype and asked == [False]


@pytest.mark.slow
def test_resnet_in_fp16_trains_with_a_grad_scaler_and_resumes_its_state(data_dir, tmp_path,
                                                                         monkeypatch, capsys):
    """The fp16 path of a GPU without native bf16, run on the CPU (which computes fp16 too)."""
    monkeypatch.setattr(resnet18, "compute_dtype", lambda device: torch.float16)
    # one step an epoch, the fewest that test the scaler and the resume: fp16 is slow on a CPU
    arguments = on_cpu(data_dir, tmp_path, "--configs", "5", "--subset", "8", "--batch-size", "8",
                       "--epochs", "2")
    interrupt_after_epochs(monkeypatch, 1)
    stopped(lambda: resnet18.main(arguments), capsys)
    monkeypatch.undo()
    monkeypatch.setattr(resnet18, "compute_dtype", lambda device: torch.float16)
    checkpoint = torch.load(tmp_path / "run_001" / "config_5" / "checkpoint.pt", weights_only=True)
    assert checkpoint["grad_scaler"]["scale"] > 0  # the loss scale goes on from where it was
    assert resnet18.main([*arguments, "--resume", "run_001"]) == 0
    result = results(tmp_path / "run_001" / "config_5")
    assert result["status"] == "completed" and result["precision"].startswith("fp16 autocast")


@pytest.mark.slow
def test_lenet_scripts_train_in_fp32_with_sgds_fused_kernel_and_compile_for_cuda_graphs(
        data_dir, tmp_path, monkeypatch):
    entered, fused, modes = [], [], []

    class Autocast(torch.autocast):
        def __init__(self, *args, **kwargs):
            entered.append(kwargs.get("dtype"))
            super().__init__(*args, **kwargs)

    class SGD(torch.optim.SGD):
        def __init__(self, *args, **kwargs):
            fused.append(kwargs.get("fused"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch, "autocast", Autocast)
    monkeypatch.setattr(torch.optim, "SGD", SGD)
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: modes.append(mode) or model)
    for number, (script, config) in enumerate(LENET_SCRIPTS):
        argv = on_cpu(data_dir, tmp_path / str(number), "--configs", config, "--dry-run",
                      "--compile")
        assert script.main(argv) == 0
    assert entered == [] and fused == [True] * 4 and modes == ["default"] * 4
    assert lenet_cpu.compile_mode(torch.device("cuda")) == "reduce-overhead"
    resnet18.ResNet18(compute_dtype=torch.bfloat16)(torch.randn(1, 3, 32, 32))
    assert entered == [torch.bfloat16]  # ResNet-18 enters autocast in the dtype it is given


@pytest.mark.slow
def test_a_torchrun_launch_ends_with_one_line_and_no_run_folder(data_dir, tmp_path):
    completed = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "lenet_multigpu.py", *on_cpu(data_dir, tmp_path, "--dry-run"))
    assert completed.returncode != 0 and not list(tmp_path.iterdir())
    assert "error: start lenet_multigpu.py with python, not torchrun" in completed.stderr


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize("script, argv", [
    (lenet_cpu, ["--epochs", "1"]),
    (resnet18, ["--configs", "5", "--batch-size", "32", "--epochs", "1", "--subset", "64"]),
])
def test_evaluate_gives_the_recorded_figure_in_the_training_precision(script, argv, device,
                                                                      data_dir, tmp_path, capsys):
    common_argv = ["--device", device, "--data-dir", str(data_dir)]
    assert script.main([*argv, *common_argv, "--out-dir", str(tmp_path)]) == 0
    model_path = next(tmp_path.glob("run_001/config_*/model.pth"))
    recorded = results(model_path.parent)["final_test_accuracy"]
    capsys.readouterr()
    subset = ["--subset", "64"] if script is resnet18 else []
    assert script.main(["--evaluate", str(model_path), *common_argv, *subset]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"test accuracy {recorded:.2f}%" in lines[0] and len(lines) == 12
    recorded_in = model_path.parent / "results.json"
    assert lines[-1].startswith(f"recorded in {recorded_in}: {recorded:.2f}%")


@pytest.mark.slow
def test_evaluate_takes_weights_saved_from_a_data_parallel_model(data_dir, tmp_path, capsys):
    """The report's own weights were saved from DistributedDataParallel: keys start "module."."""
    torch.save(nn.DataParallel(lenet_cpu.Net()).state_dict(), tmp_path / "ddp.pth")
    torch.save(resnet18.ResNet18().state_dict(), tmp_path / "resnet.pth")
    argv = ["--evaluate", str(tmp_path / "ddp.pth"), "--data-dir", str(data_dir)]
    assert lenet_cpu.main(argv) == 0
    assert "test accuracy" in capsys.readouterr().out
    with pytest.raises(common.ExperimentError, match="resnet.pth: it does not fit this model"):
        lenet_cpu.main(["--evaluate", str(tmp_path / "resnet.pth"), "--data-dir", str(data_dir)])


# ----------------------------------------------------------------------------------------------
# On a GPU


def convolution_dtypes_in(main, argv):
    """The output dtypes of every convolution main(argv) runs while training."""
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
@pytest.mark.parametrize("script, argv", [
    (lenet_cpu, []), (lenet_multigpu, ["--configs", "4"]), (l2_regularization, ["--configs", "2"]),
    (dropout_regularization, ["--configs", "2"]),
    (resnet18, ["--configs", "5", "--batch-size", "32"]),
])
def test_every_script_dry_runs_on_cuda_in_its_precision(script, argv, data_dir, tmp_path):
    argv = [*argv, "--dry-run", "--device", "cuda", "--data-dir", str(data_dir), "--out-dir",
            str(tmp_path)]
    dtypes = convolution_dtypes_in(script.main, argv)
    expected = resnet18.compute_dtype(torch.device("cuda")) if script is resnet18 else torch.float32
    assert dtypes == {expected}
    result = results(next(tmp_path.glob("run_001/config_*")))
    assert result["status"] == "completed" and result["environment"]["device_type"] == "cuda"


@several_gpus
def test_data_parallel_replicas_compute_in_the_models_dtype():
    model = nn.DataParallel(resnet18.build_model(torch.device("cuda")))
    seen = []
    model.module.conv1.register_forward_hook(lambda m, i, output: seen.append(output.dtype))
    model(torch.randn(8 * torch.cuda.device_count(), 3, 32, 32, device="cuda"))
    assert seen == [resnet18.compute_dtype(torch.device("cuda"))] * torch.cuda.device_count()


@cuda
@pytest.mark.parametrize("compiled", [False, True])
def test_resume_on_cuda_goes_on_from_the_checkpoint_and_times_each_warm_up_apart(
        compiled, data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    add_epoch = common.Record.add_epoch
    arguments = ["--configs", "4", "--epochs", "3", "--device", "cuda", "--data-dir",
                 str(data_dir), "--out-dir", str(tmp_path), *(["--compile"] if compiled else [])]
    interrupt_after_epochs(monkeypatch, 1)
    stopped(lambda: lenet_multigpu.main(arguments), capsys)
    monkeypatch.setattr(common.Record, "add_epoch", add_epoch)
    assert lenet_multigpu.main([*arguments, "--resume", "run_001"]) == 0
    history = results(tmp_path / "run_001" / "config_4")["history"]
    # the first steps of each process (compilation, CUDA graph capture): epochs 1 and 2
    assert ["warmup_seconds" in entry for entry in history] == [True, True, False]
