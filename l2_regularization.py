"""L2 regularization of the tutorial LeNet: SGD's weight_decay, each config beside its control.

SGD's weight_decay adds wd * w to every gradient, so the penalty's pull on the weights passes
through the momentum buffer like the loss's: with momentum m it builds up to about 1 / (1 - m)
times a single step's lr * wd * w. Configs 1-4 are the report's, as its code ran them: weight decay
1e-4 on every parameter, the grid's per-GPU batch of 32 on 4 GPUs (batch 128 here, as in
lenet_multigpu.py). Configs 5-8 are their controls, each the same config without weight decay;
configs 9-11 are ours, config 1 with stronger weight decay. After every epoch, as the report's
loop, the test set and a quarter of the training images are evaluated in eval mode; the train-test
gap (eval-mode train minus test accuracy) measures the overfitting. train_vs_test.png shows it per
config, versus_report.png the report's test accuracy beside ours, and the summary adds each
model's weight norm. In fp32 (on Ampere and newer GPUs, cuDNN's convolutions in TF32).

    python l2_regularization.py --configs 1 5 --subset 5000   # the report's L2 and its control
    python l2_regularization.py      # all configs, outputs in modelset/l2_regularization/

The report (4x A100): configs 1-4 reached 61.43, 59.93, 62.99, 63.08%; its config 1 left a gap of
12.03 points against 11.23 for the same run without weight decay (its grid's config 6).
Ours, on the full CIFAR-10 (a JPEG copy, README.md), one 2-core CPU shared with other runs
(modelset/reference/l2_regularization/; configs 9-11 not yet trained):

    config | weight decay | report | ours   | train-test gap | weight norm
    1      | 0.0001       | 61.43% | 64.42% | 13.52 points   | 15.98
    2      | 0.0001       | 59.93% | 62.11% | 25.04 points   | 22.24
    3      | 0.0001       | 62.99% | 63.55% | 10.67 points   | 14.93
    4      | 0.0001       | 63.08% | 64.17% | 9.67 points    | 14.68
    5      | 0.0          | none   | 64.39% | 13.32 points   | 16.24
    6      | 0.0          | none   | 62.24% | 24.61 points   | 22.79
    7      | 0.0          | none   | 64.08% | 11.06 points   | 15.15
    8      | 0.0          | none   | 63.87% | 9.83 points    | 14.87

Error bars over seeds:

    python l2_regularization.py --configs 1 5 --val-fraction 0.1 --seed 1   # then 2, 3
    python error_bars.py modelset/l2_regularization
"""

import torch
import torch.nn as nn
import torch.optim as optim

import common
from lenet_cpu import MEAN, STD, Net, compile_mode  # the tutorial LeNet and its normalization
from lenet_multigpu import REPORT_GPUS, TIMED, report_config  # the report's per-GPU batch

# the report's L2 configs (its code's): epochs, lr, momentum, batch per GPU
REPORT = [
    report_config(50, 0.001, 0.95, 32),
    report_config(50, 0.002, 0.95, 32),
    report_config(50, 0.001, 0.94, 32),
    report_config(40, 0.001, 0.95, 32),
]
CONFIGS = [
    *(config | dict(weight_decay=1e-4) for config in REPORT),  # 1-4: the report's L2
    *(config | dict(weight_decay=0.0) for config in REPORT),  # 5-8: their controls
    *(REPORT[0] | dict(weight_decay=decay) for decay in (1e-3, 5e-3, 1e-2)),  # 9-11: ours
]
# The report's test accuracy, its eval-mode train accuracy (on its rank 0's quarter) and its test
# accuracy after every epoch (report/l2_regularization_training_results.json)
CURVES = "l2_regularization_training_results.json"
REPORTED = {
    f"config_{n}": dict(test_accuracy=accuracy, train_eval_accuracy=train_accuracy, timed=TIMED,
                        test_accuracy_per_epoch=common.report_curve(CURVES, f"config_{n}"))
    for n, accuracy, train_accuracy in [
        (1, 61.43, 73.464), (2, 59.93, 78.672), (3, 62.99, 72.312), (4, 63.08, 72.216)
    ]
}


def weight_norm(model):
    """L2 norm of all weights and biases: what weight decay pulls towards zero."""
    return torch.sqrt(sum(p.detach().float().pow(2).sum() for p in model.parameters())).item()


def train(model, batches, criterion, optimizer, meter):
    """One epoch: the tutorial's step on every batch."""
    model.train()
    for images, labels in batches:
        optimizer.zero_grad()
        outputs = model(images)
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()  # weight decay acts here, inside SGD
        meter.add(loss, outputs, labels)  # running loss and accuracy


def main(argv=None):
    # LeNet's steps are too small to share between threads: one, unless --threads says otherwise
    args = common.parse_args(__doc__, CONFIGS, argv, threads=1)
    if args.evaluate:
        return common.evaluate_saved(args, Net(), MEAN, STD)
    short_run = "--configs 1 5 --subset 5000"
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
            model = Net().to(run.device)  # fp32
            if run.gpu_count > 1:
                # one process splits every batch over all visible GPUs
                model = nn.DataParallel(model)
            if args.compile:
                model = torch.compile(model, mode=compile_mode(run.device))
            criterion = nn.CrossEntropyLoss()
            # weight_decay: the L2 penalty, wd * w added to every gradient; fused: one kernel
            optimizer = optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"],
                                  weight_decay=config["weight_decay"], fused=True)
            record = common.Record(run, name, config, reported=REPORTED.get(name))
            # what every checkpoint saves; with --resume, loaded from the last one
            start = record.resume(model, optimizer)
            for epoch in range(start, config["num_epochs"]):
                meter = record.meter(epoch, train_batches.steps)  # seeds the epoch's draws
                started = common.clock(run.device)
                train(model, train_batches.epoch(epoch), criterion, optimizer, meter)
                ended = common.clock(run.device)
                model.eval()
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
                record.finish(test_batches, weight_norm=round(weight_norm(model), 3))
            print(f"{name}: Training time: {record.result['train_seconds']:.2f} seconds")
        return run.finish(compare_key="weight_decay")


if __name__ == "__main__":
    common.run_main(main)
