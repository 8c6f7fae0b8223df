"""Dropout regularization of the tutorial LeNet: one nn.Dropout after fc1, each config beside its
control.

DropoutNet is the tutorial's Net with nn.Dropout(dropout_rate) after fc1's ReLU, as the report's
code has it (one layer; dropout_after_fc2 adds a second, ours). Dropout acts only in training
mode: train() switches the model to model.train() before its steps, and main() to model.eval()
before every evaluation, which then sees the whole network. Configs 1-2 are the report's, as its
code ran them (rate 0.5, the grid's per-GPU batch on 4 GPUs: batch 256 and 128 here, as in
lenet_multigpu.py); configs 3-4 are their controls, the same configs at rate 0; configs 5-6 are
ours, config 2 at rate 0.25 and with the second layer. After every epoch, as the report's loop,
the test set and a quarter of the training images are evaluated in eval mode; the train-test gap
(eval-mode train minus test accuracy) measures the overfitting. train_vs_test.png shows it per
config, versus_report.png the report's test accuracy beside ours. In fp32.

    python dropout_regularization.py --configs 2 4 --subset 5000   # the report's and its control
    python dropout_regularization.py     # all configs, outputs in modelset/dropout_regularization/

The report (4x A100): configs 1-2 reached 63.51% and 63.67%, with gaps of 6.18 and 4.07 points.
Ours, on the full CIFAR-10 (a JPEG copy, README.md), one 2-core CPU shared with other runs
(modelset/reference/dropout_regularization/; configs 5-6 not yet trained):

    config | dropout rate | report | ours   | train-test gap
    1      | 0.5          | 63.51% | 64.08% | 5.47 points
    2      | 0.5          | 63.67% | 63.05% | 5.44 points
    3      | 0.0          | none   | 63.23% | 18.13 points
    4      | 0.0          | none   | 64.39% | 13.32 points

Error bars over seeds:

    python dropout_regularization.py --configs 1 2 3 4 --val-fraction 0.1 --seed 1   # then 2, 3
    python error_bars.py modelset/dropout_regularization
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

import common
from lenet_cpu import MEAN, STD, Net, compile_mode  # the tutorial LeNet and its normalization
from lenet_multigpu import REPORT_GPUS, TIMED, report_config  # the report's per-GPU batch

# the report's Dropout configs (its code's): epochs, lr, momentum, batch per GPU
REPORT = [report_config(50, 0.005, 0.9, 64), report_config(50, 0.001, 0.95, 32)]
CONFIGS = [
    *(config | dict(dropout_rate=0.5, dropout_after_fc2=False) for config in REPORT),  # 1-2
    *(config | dict(dropout_rate=0.0, dropout_after_fc2=False) for config in REPORT),  # 3-4
    REPORT[1] | dict(dropout_rate=0.25, dropout_after_fc2=False),  # 5: ours, a milder rate
    REPORT[1] | dict(dropout_rate=0.5, dropout_after_fc2=True),  # 6: ours, two Dropout layers
]
# The report's test accuracy, its eval-mode train accuracy (on its rank 0's quarter) and its test
# accuracy after every epoch (report/dropout_regularization_training_results.json)
CURVES = "dropout_regularization_training_results.json"
REPORTED = {
    f"config_{n}": dict(test_accuracy=accuracy, train_eval_accuracy=train_accuracy, timed=TIMED,
                        test_accuracy_per_epoch=common.report_curve(CURVES, f"config_{n}"))
    for n, accuracy, train_accuracy in [(1, 63.51, 69.688), (2, 63.67, 67.736)]
}


class DropoutNet(Net):
    """The tutorial LeNet with Dropout (Srivastava et al., 2014) after fc1, as the report's; with
    after_fc2, after fc2 too (ours). In eval mode it is the plain Net: its weights load there."""

    def __init__(self, dropout_rate, after_fc2=False):
        super().__init__()
        self.dropout = nn.Dropout(dropout_rate)  # no weights
        self.after_fc2 = after_fc2

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.dropout(F.relu(self.fc1(x)))  # the report's one Dropout layer
        x = F.relu(self.fc2(x))
        return self.fc3(self.dropout(x) if self.after_fc2 else x)


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
        return common.evaluate_saved(args, Net(), MEAN, STD)  # eval mode: Dropout does nothing
    short_run = "--configs 2 4 --subset 5000"
    # the with block: Ctrl-C or a kill marks the config interrupted and prints how to resume it
    with common.Run(__file__, args, MEAN, STD, short_run, data_parallel=True) as run:
        data = run.load_data()
        test_batches = run.batches(data.test, 1000)
        for name, config in run.configs(CONFIGS):
            # --val-fraction: the last training images held out, evaluated beside the test set
            train_split, val_split = common.hold_out(data.train, config.get("val_fraction"))
            train_batches = run.batches(train_split, config["batch_size"])
            # evaluated in eval mode after every epoch, as the report's rank 0 evaluated its quarter
            quarter = len(train_split.labels) // REPORT_GPUS
            first_quarter = common.Split(train_split.images[:quarter], train_split.labels[:quarter])
            train_eval_batches = run.batches(first_quarter, 1000)
            val_batches = run.batches(val_split, 1000) if val_split else None
            torch.manual_seed(args.seed)  # the initial weights
            model = DropoutNet(config["dropout_rate"], config["dropout_after_fc2"]).to(run.device)
            if run.gpu_count > 1:
                # one process splits every batch over all visible GPUs
                model = nn.DataParallel(model)
            if args.compile:
                model = torch.compile(model, mode=compile_mode(run.device))
            criterion = nn.CrossEntropyLoss()
            optimizer = optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"],
                                  fused=True)  # fused: the same update rule, in one kernel
            record = common.Record(run, name, config, reported=REPORTED.get(name))
            # what every checkpoint saves; with --resume, loaded from the last one
            start = record.resume(model, optimizer)
            for epoch in range(start, config["num_epochs"]):
                meter = record.meter(epoch, train_batches.steps)  # seeds the dropout masks too
                started = common.clock(run.device)
                train(model, train_batches.epoch(epoch), criterion, optimizer, meter)
                ended = common.clock(run.device)
                model.eval()  # Dropout off: evaluation sees the whole network
                accuracies = {
                    "train_eval_accuracy": common.evaluate(model, train_eval_batches),
                    "test_accuracy": common.evaluate(model, test_batches),
                }
                if val_batches:  # error_bars.py picks an epoch by it
                    accuracies["val_accuracy"] = common.evaluate(model, val_batches)
                evaluated = common.clock(run.device)
                if not record.add_epoch(meter, started, ended, evaluated, **accuracies):
                    break  # diverged
            if record.status == "running":  # every epoch trained
                record.finish(test_batches)
            print(f"{name}: Training time: {record.result['train_seconds']:.2f} seconds")
        return run.finish(compare_key="dropout_rate")


if __name__ == "__main__":
    common.run_main(main)
