"""L2 regularization of the tutorial LeNet: SGD's weight_decay against an unregularized control.

`weight_decay` adds wd * w to every gradient, so each SGD step also shrinks the weights by
lr * wd * w. Config 1 is the control (weight_decay 0), config 2 the report's setting (1e-4) with
otherwise identical hyper-parameters, configs 3-5 sweep the strength. The training accuracy is
measured in evaluation mode after every epoch, so the summary's train-test gap is the overfitting;
train_vs_test.png shows it per config, and the summary adds each model's weight norm.

    python l2_regularization.py                # all configs, outputs in modelset/l2_regularization/
    python l2_regularization.py --configs 1 2 --epochs 30

The report: less overfitting (a smaller train-test gap) for slightly lower test accuracy. Measured
on the full CIFAR-10 (JPEG copy), 2-core CPU, 50 epochs, 190-266 s of training each:

    weight decay   test acc.   train-test gap   weight norm
    0 (control)     62.73%      24.79 points      22.79
    1e-4            62.72%      25.36 points      22.31     the report's: no measurable effect
    5e-4            63.10%      22.58 points      20.26
    1e-3            63.90%      21.38 points      18.34
    5e-3            65.71%      10.33 points      11.60     the gap closes, and accuracy rises

The control overfits (its test accuracy peaks at 64.2% in epoch 27), so strong L2 helps both.
"""

import torch
import torch.nn as nn
import torch.optim as optim

import common
from lenet_cpu import Net  # the tutorial LeNet

# the report's setting: 50 epochs, lr 0.001, momentum 0.95; batch size 64 (the report did not say)
REPORT = dict(num_epochs=50, lr=0.001, momentum=0.95, batch_size=64)
CONFIGS = [
    dict(REPORT, weight_decay=0.0),  # control
    dict(REPORT, weight_decay=1e-4),  # the report's L2
    dict(REPORT, weight_decay=5e-4),
    dict(REPORT, weight_decay=1e-3),
    dict(REPORT, weight_decay=5e-3),
]


def weight_norm(model):
    """L2 norm of all weights and biases: what weight decay pulls towards zero."""
    return torch.sqrt(sum(p.detach().float().pow(2).sum() for p in model.parameters())).item()


def main(argv=None):
    args = common.parse_args(__doc__, CONFIGS, argv)
    run = common.Run(__file__, args)
    data = run.load_data()
    test_batches = run.batches(data.test, 1000)
    train_eval_batches = run.batches(data.train, 1000)  # the training images, in eval mode
    for name, config in run.configs(CONFIGS):
        model = run.place(Net())  # on the device; DistributedDataParallel under torchrun
        if run.gpu_count > 1:
            model = nn.DataParallel(model)  # one process splits every batch over all visible GPUs
        model = run.compile(model)
        criterion = nn.CrossEntropyLoss()
        optimizer = optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"],
                              weight_decay=config["weight_decay"])  # the L2 penalty
        train_batches = run.batches(data.train, config["batch_size"], train=True)
        record = run.record(name, config, model, optimizer)  # with --resume: from the last checkpoint
        for epoch in record.epochs():
            train_batches.set_epoch(epoch)
            started = common.clock(run.device)
            loss, accuracy = common.train_one_epoch(model, train_batches, optimizer, criterion,
                                                    log_interval=args.log_interval, epoch=epoch,
                                                    progress=record.progress(epoch, train_batches))
            seconds = common.clock(run.device) - started
            record.add_epoch(loss, accuracy, seconds,
                             train_eval_accuracy=common.evaluate(model, train_eval_batches),  # the overfitting
                             test_accuracy=common.evaluate(model, test_batches))
        record.finish(test_batches, weight_norm=round(weight_norm(model), 3))
        run.log(f"{name}: Training time: {record.train_seconds:.2f} seconds")
    return run.finish(compare_key="weight_decay")


if __name__ == "__main__":
    common.run_main(main)
