"""L2 regularization of the tutorial LeNet: SGD's weight_decay against an unregularized control.

SGD's weight_decay adds wd * w to every gradient, so the penalty's pull on the weights passes
through the momentum buffer like the loss's: with momentum m it builds up to about 1 / (1 - m) times
a single step's lr * wd * w (20 times at the report's m = 0.95). Config 1 is the control
(weight_decay 0), config 2 the report's setting (1e-4) with otherwise identical hyper-parameters,
configs 3-6 sweep the strength. After every epoch the training images are evaluated in eval mode
too, so the train-test gap (eval-mode train accuracy minus test accuracy) measures the overfitting;
train_vs_test.png shows it per config, and the summary adds each model's weight norm. On a GPU it
trains in fp32 (on Ampere and newer, cuDNN's convolutions in TF32 by PyTorch's defaults).

    python l2_regularization.py --configs 1 5 --subset 5000   # the effect in under 3 min on a CPU
    python l2_regularization.py             # all configs, outputs in modelset/l2_regularization/

The report: less overfitting (a smaller train-test gap) for slightly lower test accuracy. Measured
on the full CIFAR-10 (a JPEG copy), 2-core CPU, torch 2.14.1, 50 epochs
(modelset/reference/l2_regularization/):

    config | weight decay | test accuracy | train-test gap | weight norm
    1      | 0            | 62.17%        | 24.92 points   | 22.78    the control
    2      | 0.0001       | 62.85%        | 23.76 points   | 22.18    the report's: a small effect
    3      | 0.0005       | 63.02%        | 23.28 points   | 20.22
    4      | 0.001        | 63.93%        | 21.39 points   | 18.37
    5      | 0.005        | 66.22%        | 10.10 points   | 11.60    narrower gap, higher accuracy

The control overfits (its test accuracy peaks at 64.69% in epoch 26), so strong L2 helps both. At
batch 64 (our guess for the report's) 1e-4 barely acts; weight decay acts once per step. Three seeds
with a validation split (modelset/reference/seeds/; README.md, "Results"), test accuracy at the last
epoch and at the epoch of the best validation accuracy: the control 60.97 +- 1.46% and
63.31 +- 1.39%; 1e-4 61.28 +- 1.27% and 63.54 +- 1.00%, no gain beyond the seeds' spread; 5e-3
64.74 +- 1.08% and 64.85 +- 0.87%, higher for every seed; 1e-2 63.31 +- 0.87% and 64.09 +- 0.28%.
Error bars for your own configs:

    python l2_regularization.py --configs 1 2 5 6 --val-fraction 0.1 --seed 1   # then 2, 3
    python error_bars.py modelset/l2_regularization
"""

import common  # first: a Ctrl-C while torch loads then ends in one line

import torch
import torch.nn as nn
import torch.optim as optim

from lenet_cpu import MEAN, STD, Net  # the tutorial LeNet and its normalization

# the report's setting: 50 epochs, lr 0.001, momentum 0.95; batch size 64 (the report did not say)
REPORT = dict(num_epochs=50, lr=0.001, momentum=0.95, batch_size=64)
CONFIGS = [
    dict(REPORT, weight_decay=0.0),  # control
    dict(REPORT, weight_decay=1e-4),  # the report's L2
    dict(REPORT, weight_decay=5e-4),
    dict(REPORT, weight_decay=1e-3),
    dict(REPORT, weight_decay=5e-3),
    dict(REPORT, weight_decay=1e-2),
]


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
            # --val-fraction: the last training images held out, to pick an epoch without the test
            # set
            train_split, val_split = common.hold_out(data.train, config.get("val_fraction", 0.0))
            # evaluated in eval mode: overfitting
            train_eval_batches = run.batches(train_split, 1000)
            val_batches = run.batches(val_split, 1000) if val_split else None
            torch.manual_seed(args.seed)  # the initial weights
            model = Net().to(run.device)  # fp32
            if run.gpu_count > 1:
                # one process splits every batch over all visible GPUs
                model = nn.DataParallel(model)
            # on a GPU with CUDA graphs: a step's ~70 small kernels launched as one
            if args.compile:
                model = torch.compile(model, mode=common.lenet_compile_mode(run.device))
            criterion = nn.CrossEntropyLoss()
            # fused: the same update rule, in one kernel
            optimizer = optim.SGD(
                model.parameters(),
                lr=config["lr"],
                momentum=config["momentum"],
                weight_decay=config["weight_decay"],  # the L2 penalty
                fused=True,
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
                model.eval()
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
                record.finish(test_batches, weight_norm=round(weight_norm(model), 3))
            train_seconds = record.result["train_seconds"]
            print(f"{name}: Training time: {train_seconds:.2f} seconds (its epochs' steps)")
        return run.finish(compare_key="weight_decay")


if __name__ == "__main__":
    common.run_main(main)
