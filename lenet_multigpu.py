"""The tutorial LeNet on every visible GPU with nn.DataParallel: the report's timed config grid.

One process drives all GPUs: DataParallel splits each batch across them (on one GPU or the CPU the
model runs unwrapped; under torchrun each process gets DistributedDataParallel instead). The whole
dataset sits on the GPU, so a 50-epoch config should take seconds, not minutes. Every config is timed;
the run also plots the test accuracy of all its configs in one PNG (test_accuracy.png).

    python lenet_multigpu.py                   # all ten configs, outputs in modelset/lenet_multigpu/
    python lenet_multigpu.py --configs 3       # the report's best: 200 epochs, 65.75%
    python lenet_multigpu.py --list-configs

The report (4x A100): 47.63 / 60.25 / 65.75% for configs 1-3; 62.00, 62.50, 64.99, 63.11, 56.45,
59.44, 58.02% for configs 4-10 in 163-264 s each (REPORTED below; the summary prints ours beside
it). Measured here on the full CIFAR-10 (a JPEG copy: a few tenths below the original archive is
expected) on a 2-core CPU, one thread, torch 2.14.1, since no GPU has been lent to this repository
yet. Config by config, ours against the report's (README.md has the table):

    config     1      2      3      4      5      6      7      8      9      10
    report   47.63  60.25  65.75  62.00  62.50  64.99  63.11  56.45  59.44  58.02
    ours     46.71  58.75  63.21  61.64  59.63  57.86  62.73  55.94  58.37  63.36

Each took 176-383 s of training (config 3: 725 s) on the CPU. The GPU timings are still to be
measured.
"""

import torch.nn as nn
import torch.optim as optim

import common
from lenet_cpu import Net  # the tutorial LeNet: conv 3->6->16 (5x5), max-pool, fc 400-120-84-10

# The report did not state the batch size of configs 1-3. We use 512: config 10 (lr 0.01,
# momentum 0.9, batch 512, 50 epochs: 58.02%) then lines up with config 2 (same lr and momentum,
# 100 epochs: 60.25%), and the low 47.63% of config 1 fits few, large steps at lr 0.001.
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
# The report's test accuracy per config (4x A100), printed and saved beside ours. Its times for
# configs 4-10 were 163-264 s each, not given per config.
REPORTED = {f"config_{number}": dict(test_accuracy=accuracy) for number, accuracy in enumerate(
    [47.63, 60.25, 65.75, 62.00, 62.50, 64.99, 63.11, 56.45, 59.44, 58.02], 1)}


def main(argv=None):
    args = common.parse_args(__doc__, CONFIGS, argv)
    run = common.Run(__file__, args)  # the device; under torchrun, this process's rank
    data = run.load_data()
    test_batches = run.batches(data.test, 1000)
    for name, config in run.configs(CONFIGS):
        model = run.place(Net())  # on the device; DistributedDataParallel under torchrun
        if run.gpu_count > 1:
            model = nn.DataParallel(model)  # one process splits every batch over all visible GPUs
        model = run.compile(model)
        criterion = nn.CrossEntropyLoss()
        optimizer = optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"])
        train_batches = run.batches(data.train, config["batch_size"], train=True)
        # the config's history and checkpoints; with --resume it goes on from the last checkpoint
        record = run.record(name, config, model, optimizer, reported=REPORTED[name])
        for epoch in record.epochs():
            train_batches.set_epoch(epoch)
            started = common.clock(run.device)  # waits for the GPUs before reading the time
            loss, accuracy = common.train_one_epoch(model, train_batches, optimizer, criterion,
                                                    log_interval=args.log_interval, epoch=epoch,
                                                    progress=record.progress(epoch, train_batches))
            seconds = common.clock(run.device) - started
            record.add_epoch(loss, accuracy, seconds, test_accuracy=common.evaluate(model, test_batches))
        record.finish(test_batches)
        run.log(f"{name}: Training time: {record.train_seconds:.2f} seconds")
    return run.finish()


if __name__ == "__main__":
    common.run_main(main)
