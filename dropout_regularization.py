"""Dropout regularization of the tutorial LeNet: Dropout between the fully connected layers.

DropoutNet is the tutorial's Net with nn.Dropout(dropout_rate) after each hidden fully connected
layer (fc1 and fc2); dropout is active in training and off in evaluation (model.eval()). Config 1
is the control (dropout_rate 0), config 2 the report's setting (0.5) with otherwise identical
hyper-parameters, configs 3-4 sweep the rate. The training accuracy is measured in evaluation mode
after every epoch, so the summary's train-test gap is the overfitting; train_vs_test.png shows it.

    python dropout_regularization.py           # all configs, outputs in modelset/dropout_regularization/
    python dropout_regularization.py --configs 1 2 --epochs 30

The report: less overfitting (a smaller train-test gap) for slightly lower test accuracy. Measured
on the full CIFAR-10 (JPEG copy), 2-core CPU, 50 epochs, about 195 s of training each:

    dropout rate   test acc.   train-test gap
    0 (control)     62.73%      24.79 points
    0.5             63.55%       6.90 points     the report's: most of the gap closes, no accuracy lost
    0.25            65.39%      13.21 points     the best test accuracy
    0.75            57.56%       2.03 points     no gap left, but it underfits

Dropout slows learning (0.5 is still improving at epoch 50) but stops the control's overfitting.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

import common
from lenet_cpu import Net  # the tutorial LeNet

# the report's setting: 50 epochs, lr 0.001, momentum 0.95; batch size 64 (the report did not say)
REPORT = dict(num_epochs=50, lr=0.001, momentum=0.95, batch_size=64)
CONFIGS = [
    dict(REPORT, dropout_rate=0.0),  # control
    dict(REPORT, dropout_rate=0.5),  # the report's Dropout
    dict(REPORT, dropout_rate=0.25),
    dict(REPORT, dropout_rate=0.75),
]


class DropoutNet(Net):
    """The tutorial LeNet with Dropout on the hidden fully connected layers (Srivastava et al., 2014)."""

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


def main(argv=None):
    args = common.parse_args(__doc__, CONFIGS, argv)
    run = common.Run(__file__, args)
    data = run.load_data()
    test_batches = run.batches(data.test, 1000)
    train_eval_batches = run.batches(data.train, 1000)  # the training images, in eval mode
    for name, config in run.configs(CONFIGS):
        model = run.place(DropoutNet(config["dropout_rate"]))  # DistributedDataParallel under torchrun
        if run.gpu_count > 1:
            model = nn.DataParallel(model)  # one process splits every batch over all visible GPUs
        model = run.compile(model)
        criterion = nn.CrossEntropyLoss()
        optimizer = optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"])
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
        record.finish(test_batches)
        run.log(f"{name}: Training time: {record.train_seconds:.2f} seconds")
    return run.finish(compare_key="dropout_rate")


if __name__ == "__main__":
    common.run_main(main)
