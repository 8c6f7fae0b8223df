"""torchrun: two CPU processes with gloo train one epoch; rank 0 alone writes, metrics are global."""

import json

import pytest
import torch
import torch.distributed as dist

import common
from conftest import run_script
from lenet_cpu import Net


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_two_processes_write_one_result_with_world_size_two(data_dir, tmp_path):
    completed = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "lenet_multigpu.py",
                           "--configs", "1", "--epochs", "1", "--batch-size", "8",
                           "--data-dir", data_dir, "--out-dir", tmp_path)
    assert completed.returncode == 0, completed.stderr
    results = list(tmp_path.rglob("results.json"))
    assert [p.relative_to(tmp_path).as_posix() for p in results] == ["run_001/config_1/results.json"]
    result = json.loads(results[0].read_text())
    assert result["environment"]["world_size"] == 2 and result["status"] == "completed"
    assert completed.stdout.count("Final test accuracy") == 1  # only rank 0 prints
    assert "training on 2 torchrun processes" in completed.stdout
    # each process evaluated half of the test set; together they count every image once
    model = Net()
    model.load_state_dict(torch.load(results[0].parent / "model.pth"))
    test = common.load_cifar10(data_dir).test
    whole = common.evaluate(model, common.Batches(test, 1000, "cpu", (0.5,) * 3, (0.5,) * 3))
    assert result["final_test_accuracy"] == pytest.approx(whole)
