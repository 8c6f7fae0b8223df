"""Dropout regularization of the tutorial LeNet: nn.Dropout between the fully connected layers.

DropoutNet is the tutorial's Net with nn.Dropout(dropout_rate) after each hidden fully connected
layer (fc1 and fc2). Dropout acts only in training mode: train() below switches the model to
model.train() before its steps, and main() to model.eval() before every evaluation, which then sees
the whole network. Config 1 is the control (dropout_rate 0), config 2 the report's setting (0.5)
with otherwise identical hyper-parameters, configs 3-4 sweep the rate. After every epoch the
training images are evaluated in eval mode too, so the train-test gap (eval-mode train accuracy
minus test accuracy) measures the overfitting; train_vs_test.png shows it per config. On a GPU it
trains in fp32 (on Ampere and newer, cuDNN's convolutions in TF32 by PyTorch's defaults).

    python dropout_regularization.py --configs 1 2 --subset 5000   # the effect in under 3 min
    python dropout_regularization.py     # all configs, outputs in modelset/dropout_regularization/

The report: less overfitting (a smaller train-test gap) for slightly lower test accuracy. Measured
on the full CIFAR-10 (a JPEG copy), 2-core CPU, torch 2.14.1, 50 epochs
(modelset/reference/dropout_regularization/):

    config | dropout rate | test accuracy | train-test gap
    1      | 0            | 62.17%        | 24.92 points     the control
    2      | 0.5          | 64.13%        | 7.69 points      the report's setting
    3      | 0.25         | 64.97%        | 13.91 points     the best test accuracy
    4      | 0.75         | 58.05%        | 2.13 points      no gap left, but it underfits

Dropout slows learning (0.5 is at its best in epoch 50) and narrows the control's overfitting gap.
Three seeds with a validation split (modelset/reference/seeds/; README.md, "Results"), test accuracy
at the last epoch and at the epoch of the best validation accuracy: the control 60.97 +- 1.46% and
63.31 +- 1.39%; 0.5 63.50 +- 0.59% and 63.46 +- 0.60%, higher than the control at the last epoch for
every seed, no gain beyond the seeds' spread at the picked one; 0.25 64.49 +- 1.10% and
64.43 +- 1.31%. Error bars for your own configs:

    python dropout_regularization.py --configs 1 2 3 --val-fraction 0.1 --seed 1   # then 2, 3
    python error_bars.py modelset/dropout_regularization
"""

import common  # first: a Ctrl-C while torch loads then ends in one line

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

from lenet_cpu import MEAN, STD, Net  # the tutorial LeNet and its normalization

# the report's setting: 50 epochs, lr 0.001, momentum 0.95; batch size 64 (the report did not say)
REPORT = dict(num_epochs=50, lr=0.001, momentum=0.95, batch_size=64)
CONFIGS = [
    dict(REPORT, dropout_rate=0.0),  # control
    dict(REPORT, dropout_rate=0.5),  # the report's Dropout
    dict(REPORT, dropout_rate=0.25),
    dict(REPORT, dropout_rate=0.75),
]


class DropoutNet(Net):
    """The tutorial LeNet with Dropout on the hidden fully connected layers (Srivastava et al.,
    2014)."""

    def __init__(self, dropout_rate):
        super().__init__()
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.dropout(F.relu(self.fc1(x)))
        x = self.dropout(F.relu(self.fc2(x)))
        return self.fc3(x)


def train(model, batches, criterion, optimizer, meter):
    """One epoch: the tutorial's step on every batch, Dropout active."""
    model.train()  # Dropout on
    for images, labels in batches:
        optimizer.zero_grad()
        outputs = model(images)
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()
        meter.add(loss, outputs, labels)  # running loss and accuracy


def main(argv=None):
    # LeNet's steps are too small to share between threads: one, unless --threads says otherwise
    args = common.parse_args(__doc__, CONFIGS, argv, threads=1)
    if args.evaluate:
        # in eval mode the rate does not matter
        return common.evaluate_saved(args, DropoutNet(0.0), MEAN, STD)
    short_run = "--configs 1 2 --subset 5000"
    # the with block: Ctrl-C or a kill marks the config interrupted and prints how to resume it
    with common.Run(__file__, args, MEAN, STD, short_run, data_parallel=True) as run:
        data = run.load_data()
        test_batches = run.batches(data.test, 1000)
        for name, config in run.configs(CONFIGS):
            # --val-fraction: the last training images held out, to pick an epoch without the test
            # set
            train_split, val_split = common.hold_out(data.train, config.get("val_fraction", 0.0))
            # evaluated in eval mode: overfitting
            train_eval_batches = run.batches(train_split, 1000)
            val_batches = run.batches(val_split, 1000) if val_split else None
            torch.manual_seed(args.seed)  # the initial weights
            model = DropoutNet(config["dropout_rate"]).to(run.device)  # fp32
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
            train_batches = run.batches(train_split, config["batch_size"], train=True)
            record = common.Record(run, name, config, validation=val_batches is not None)
            # what every checkpoint saves; with --resume, loaded from the last one
            start = record.resume(model, optimizer)
            for epoch in range(start, config["num_epochs"]):
                # this epoch's random draws: the same in a resumed run
                torch.manual_seed(common.epoch_seed(args.seed, epoch, "draws"))
                meter = record.meter(epoch, train_batches.steps)
                started = common.clock(run.device)
                train(model, train_batches.epoch(epoch), criterion, optimizer, meter)
                ended = common.clock(run.device)
                # the training time, a process's first 3 steps (warm-up) apart
                seconds, warmup_seconds = meter.seconds(started, ended)
                model.eval()  # Dropout off: evaluation sees the whole network
                accuracies = {
                    "train_eval_accuracy": common.evaluate(model, train_eval_batches),
                    "test_accuracy": common.evaluate(model, test_batches),
                }
                # recorded beside the test accuracy: error_bars.py picks an epoch by it
                if val_batches:
                    accuracies["val_accuracy"] = common.evaluate(model, val_batches)
                if not record.add_epoch(meter, seconds, warmup_seconds, **accuracies):
                    break  # diverged
            if record.status == "running":  # every epoch trained
                record.finish(test_batches)
            train_seconds = record.result["train_seconds"]
            print(f"{name}: Training time: {train_seconds:.2f} seconds (its epochs' steps)")
        return run.finish(compare_key="dropout_rate")


if __name__ == "__main__":
    common.run_main(main)
