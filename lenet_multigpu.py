"""The tutorial LeNet on every visible GPU with nn.DataParallel: the report's ten configs, each one
timed.

(The report timed configs 4-10; this script times all ten.)

One process drives all visible GPUs: nn.DataParallel splits every batch across them, runs a replica
of the model on each and gathers the outputs (on one GPU or the CPU the model runs unwrapped). It
trains in fp32, the report's precision (with PyTorch's defaults, cuDNN may use TF32 for convolutions
on Ampere and newer GPUs). The whole dataset sits on the device, so no DataLoader work is timed.
Every config's training time is the sum of its epochs' training steps, timed after waiting for the
GPUs (common.clock); evaluation and the first steps' warm-up are left out. test_accuracy.png
overlays the test accuracy of every config of a run.

    python lenet_multigpu.py --configs 3       # the report's best: 200 epochs, 65.75%
    python lenet_multigpu.py                   # all ten configs, in modelset/lenet_multigpu/
    python lenet_multigpu.py --list-configs

The report (4x A100): configs 1-3 reached 47.63 / 60.25 / 65.75%; configs 4-10 reached 62.00, 62.50,
64.99, 63.11, 56.45, 59.44, 58.02% in 263.94, 181.47, 259.07, 180.19, 260.93, 181.00, 163.23 s
(REPORTED below; the summary prints ours beside them). Aim on one H100: 20 s or less per 50-epoch
config, not yet measured (no GPU has been lent to this repository). Measured on the full CIFAR-10 (a
JPEG copy) on a 2-core CPU, torch 2.14.1, one thread, two runs at a time
(modelset/reference/lenet_multigpu/; README.md has the whole table and what it shows):

    config | report | ours   | training time
    1      | 47.63% | 46.61% | 462 s
    2      | 60.25% | 59.37% | 774 s
    3      | 65.75% | 63.23% | 1541 s
    4      | 62.00% | 62.10% | 561 s
    5      | 62.50% | 59.53% | 482 s
    6      | 64.99% | 59.88% | 578 s     peaks at 64.16% in epoch 19, then overfits
    7      | 63.11% | 62.17% | 490 s
    8      | 56.45% | 55.88% | 550 s
    9      | 59.44% | 58.02% | 442 s
    10     | 58.02% | 63.85% | 390 s     config 2's first 50 epochs
"""

import common  # first: a Ctrl-C while torch loads then ends in one line

import torch
import torch.nn as nn
import torch.optim as optim

from lenet_cpu import MEAN, STD, Net  # the tutorial LeNet and its normalization

# The report did not state the batch size of configs 1-3. We guess 512: the low 47.63% of config 1
# fits few, large steps at lr 0.001 (ours at batch 512: 46.61%). Config 2 (lr 0.01, 100 epochs) does
# not line up with config 10 (the same at 50 epochs): ours goes from 63.85% at epoch 50 to 59.37%.
CONFIGS = [
    # 1-3: epochs, learning rate and momentum
    dict(num_epochs=50, lr=0.001, momentum=0.9, batch_size=512),
    dict(num_epochs=100, lr=0.01, momentum=0.9, batch_size=512),
    dict(num_epochs=200, lr=0.001, momentum=0.95, batch_size=512),
    # 4-10: 50 epochs, the batch-size grid
    dict(num_epochs=50, lr=0.001, momentum=0.9, batch_size=32),
    dict(num_epochs=50, lr=0.005, momentum=0.9, batch_size=64),
    dict(num_epochs=50, lr=0.001, momentum=0.95, batch_size=32),
    dict(num_epochs=50, lr=0.001, momentum=0.95, batch_size=64),
    dict(num_epochs=50, lr=0.01, momentum=0.9, batch_size=32),
    dict(num_epochs=50, lr=0.01, momentum=0.9, batch_size=64),
    dict(num_epochs=50, lr=0.01, momentum=0.9, batch_size=512),
]
# The report's test accuracy per config and, for configs 4-10, its training seconds (4x A100,
# DataParallel).
REPORTED = {
    f"config_{number}": dict(test_accuracy=accuracy)
    for number, accuracy in enumerate(
        [47.63, 60.25, 65.75, 62.00, 62.50, 64.99, 63.11, 56.45, 59.44, 58.02], 1
    )
}
for number, seconds in zip(range(4, 11), [263.94, 181.47, 259.07, 180.19, 260.93, 181.00, 163.23]):
    REPORTED[f"config_{number}"].update(train_seconds=seconds, device="4x A100")


def train(model, batches, criterion, optimizer, meter):
    """One epoch: the tutorial's step on every batch."""
    model.train()
    for images, labels in batches:
        optimizer.zero_grad()
        outputs = model(images)  # nn.DataParallel: each GPU runs its share of the batch
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()
        meter.add(loss, outputs, labels)  # running loss and accuracy, summed on the device


def main(argv=None):
    # LeNet's steps are too small to share between threads: one, unless --threads says otherwise
    args = common.parse_args(__doc__, CONFIGS, argv, threads=1)
    if args.evaluate:
        return common.evaluate_saved(args, Net(), MEAN, STD)
    short_run = "--configs 4 --subset 5000"
    # the with block: Ctrl-C or a kill marks the config interrupted and prints how to resume it
    with common.Run(__file__, args, MEAN, STD, short_run, data_parallel=True) as run:
        data = run.load_data()
        test_batches = run.batches(data.test, 1000)
        for name, config in run.configs(CONFIGS):
            torch.manual_seed(args.seed)  # the initial weights
            model = Net().to(run.device)  # fp32, as the report
            if run.gpu_count > 1:
                # one process splits every batch over all visible GPUs
                model = nn.DataParallel(model)
            # on a GPU with CUDA graphs: a step's ~70 small kernels launched as one
            if args.compile:
                model = torch.compile(model, mode=common.lenet_compile_mode(run.device))
            criterion = nn.CrossEntropyLoss()
            # fused: the same update rule, in one kernel
            optimizer = optim.SGD(
                model.parameters(), lr=config["lr"], momentum=config["momentum"], fused=True
            )
            train_batches = run.batches(data.train, config["batch_size"], train=True)
            record = common.Record(run, name, config, reported=REPORTED.get(name))
            # what every checkpoint saves; with --resume, loaded from the last one
            start = record.resume(model, optimizer)
            for epoch in range(start, config["num_epochs"]):
                # this epoch's random draws: the same in a resumed run
                torch.manual_seed(common.epoch_seed(args.seed, epoch, "draws"))
                meter = record.meter(epoch, train_batches.steps)
                started = common.clock(run.device)  # waits for the GPUs: the time is this epoch's
                train(model, train_batches.epoch(epoch), criterion, optimizer, meter)
                ended = common.clock(run.device)
                # the training time, a process's first 3 steps (warm-up) apart
                seconds, warmup_seconds = meter.seconds(started, ended)
                model.eval()
                accuracy = common.evaluate(model, test_batches)
                if not record.add_epoch(meter, seconds, warmup_seconds, test_accuracy=accuracy):
                    break  # diverged
            if record.status == "running":  # every epoch trained
                record.finish(test_batches)
            train_seconds = record.result["train_seconds"]
            print(f"{name}: Training time: {train_seconds:.2f} seconds (its epochs' steps)")
        return run.finish()


if __name__ == "__main__":
    common.run_main(main)
