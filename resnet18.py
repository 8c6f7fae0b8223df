"""ResNet-18 for CIFAR-10: the report's four configs, then a modern recipe aiming at 94% in 25 epochs.

The network (He et al., 2016, "Deep Residual Learning", in its common CIFAR form): a 3x3 stem of 64
channels and no max-pool, BasicBlocks [2, 2, 2, 2] at 64-128-256-512 channels with 1x1 projection
shortcuts, global average pooling and a linear head: 11,173,962 parameters.

On a GPU the dataset and its augmentation (a random crop with 4-pixel padding and a horizontal flip,
different for every image) stay on the device, training runs in bf16 autocast with channels_last,
--compile adds torch.compile, and several visible GPUs get nn.DataParallel (torchrun: DDP).

    python resnet18.py                          # all configs, outputs in modelset/resnet18/
    python resnet18.py --configs 5 --compile    # the modern recipe, fastest
    python benchmarks/resnet18_speed.py         # training images/s on the device at hand

The report (one A100): 86.09, 88.59, 88.40, 89.56% for configs 1-4; config 4 took 306 s (REPORTED
below; the summary prints ours beside it). Not yet measured here: no GPU has been lent to this
repository so far. On a 2-core CPU a 25-epoch config takes many hours (the script says how long
in its first seconds); the tests check the CPU path on a tiny subset.
"""

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

import common

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# The report gave epochs, lr and momentum only. Our choice for the rest: batch size 128, random crop
# and flip, a constant learning rate, no weight decay, no label smoothing: plain SGD as reported.
REPORT = dict(batch_size=128, augment=True, schedule="constant", warmup_epochs=0, nesterov=False,
              weight_decay=0.0, label_smoothing=0.0, val_fraction=0.0)
# Large batch, Nesterov momentum, weight decay, label smoothing, 2 warm-up epochs then a linear
# decay to zero (the one-cycle shape): the usual short-schedule recipe for this network. The peak
# lr 0.4 is the common 0.1 per 128 images scaled linearly to the batch of 512.
MODERN = dict(batch_size=512, augment=True, schedule="linear", warmup_epochs=2, nesterov=True,
              weight_decay=5e-4, label_smoothing=0.1, val_fraction=0.0)

CONFIGS = [
    # 1-4: the report's
    dict(num_epochs=15, lr=0.01, momentum=0.95, **REPORT),
    dict(num_epochs=25, lr=0.01, momentum=0.95, **REPORT),
    dict(num_epochs=25, lr=0.005, momentum=0.9, **REPORT),
    dict(num_epochs=25, lr=0.005, momentum=0.95, **REPORT),
    dict(num_epochs=25, lr=0.4, momentum=0.9, **MODERN),  # the modern recipe: aims at >= 94%
    # tuning without the test set: 10% of the training images held out, cosine schedule
    dict(num_epochs=25, lr=0.4, momentum=0.9, **MODERN) | dict(schedule="cosine", val_fraction=0.1),
    # the schedule of other course reports: StepLR(step_size=20 epochs, gamma=0.5)
    dict(num_epochs=40, lr=0.01, momentum=0.9, **REPORT) | dict(schedule="step"),
]
# The report's test accuracy (one A100) per config, printed and saved beside ours; it timed config 4.
REPORTED = {"config_1": dict(test_accuracy=86.09), "config_2": dict(test_accuracy=88.59),
            "config_3": dict(test_accuracy=88.40), "config_4": dict(test_accuracy=89.56, train_seconds=306)}


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm; the shortcut is a 1x1 projection when the shape changes."""

    def __init__(self, in_channels, channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images: 3x3 stem, no max-pool, stages of 64-128-256-512 channels."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, in_channels = [], 64
        for channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(in_channels, channels, stride),
                                        BasicBlock(channels, channels, 1)))
            in_channels = channels
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def make_optimizer(config, model, steps_per_epoch):
    """SGD (Nesterov where the config says) and its per-step learning-rate schedule."""
    optimizer = optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"],
                          nesterov=config["nesterov"], weight_decay=config["weight_decay"])
    schedule = partial(common.lr_factor, total_steps=config["num_epochs"] * steps_per_epoch,
                       schedule=config["schedule"], warmup_steps=round(config["warmup_epochs"] * steps_per_epoch),
                       steps_per_epoch=steps_per_epoch)
    return optimizer, optim.lr_scheduler.LambdaLR(optimizer, schedule)


def main(argv=None):
    args = common.parse_args(__doc__, CONFIGS, argv)
    run = common.Run(__file__, args, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    data = run.load_data()
    test_batches = run.batches(data.test, 1000)
    for name, config in run.configs(CONFIGS):
        train_split, val_batches = data.train, None
        if config["val_fraction"]:  # tuning: the test set is evaluated once, at the end
            train_split, val_split = common.split_validation(data.train, config["val_fraction"])
            val_batches = run.batches(val_split, 1000)
        train_batches = run.batches(train_split, config["batch_size"], train=True, augment=config["augment"])
        model = run.place(ResNet18())  # channels_last on GPUs; DistributedDataParallel under torchrun
        if run.gpu_count > 1:
            model = nn.DataParallel(model)  # one process splits every batch over all visible GPUs
        model = run.compile(model)
        criterion = nn.CrossEntropyLoss(label_smoothing=config["label_smoothing"])
        optimizer, scheduler = make_optimizer(config, model, len(train_batches))
        record = run.record(name, config, model, optimizer, scheduler, validation=val_batches is not None,
                            reported=REPORTED.get(name))  # with --resume: from the last checkpoint
        for epoch in record.epochs():
            train_batches.set_epoch(epoch)
            started = common.clock(run.device)  # waits for the GPU before reading the time
            # bf16 autocast on GPUs; the scheduler steps after every batch
            loss, accuracy = common.train_one_epoch(model, train_batches, optimizer, criterion, scheduler,
                                                    log_interval=args.log_interval, epoch=epoch,
                                                    progress=record.progress(epoch, train_batches))
            seconds = common.clock(run.device) - started
            if val_batches:
                record.add_epoch(loss, accuracy, seconds, val_accuracy=common.evaluate(model, val_batches))
            else:
                record.add_epoch(loss, accuracy, seconds, test_accuracy=common.evaluate(model, test_batches))
        if record.status == "running":  # every epoch trained now: neither diverged nor ended in a resumed run
            # reported apart: test-time augmentation is not the headline accuracy
            tta = round(common.evaluate(model, test_batches, flip_tta=True), 2)
            record.finish(test_batches, flip_tta_test_accuracy=tta)
        run.log(f"{name}: Training time: {record.train_seconds:.2f} seconds")
    return run.finish()


if __name__ == "__main__":
    common.run_main(main)
