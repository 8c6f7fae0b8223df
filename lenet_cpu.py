"""The PyTorch CIFAR-10 tutorial's LeNet, trained on the CPU exactly as the tutorial does.

Hyper-parameters of "Training a Classifier" (pytorch.org/tutorials/beginner/blitz/cifar10_tutorial):
batch size 4, SGD lr 0.001 momentum 0.9, 5 epochs, inputs normalized with mean 0.5 / std 0.5, the
running loss printed every 2000 batches, then the accuracy overall and per class. train() below is
the tutorial's loop. It runs on the CPU even when a GPU exists (--device cuda moves it). The whole
dataset is held as one normalized tensor, so no per-image PIL or DataLoader work sits in the loop.

    python lenet_cpu.py                        # 5 epochs on ./data, outputs in modelset/lenet_cpu/
    python lenet_cpu.py --subset 5000 --epochs 2 --data-dir ../shared/data/cifar10-subset
    python benchmarks/lenet_cpu_speed.py       # against the tutorial's DataLoader loop

Measured on the full CIFAR-10 (a JPEG copy: a few tenths below the original archive is expected),
2-core x86-64 CPU, one thread, torch 2.14.1: 59.17% after 5 epochs (the report: 60%), 53.8 s of
training; 2 epochs take 2.73-2.75x less wall time than the tutorial's DataLoader loop on the same
files (benchmarks/lenet_cpu_speed.py: 21.8 s against 59.6 s, start-up included; README.md).
"""

import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

import common

CONFIGS = [
    # the tutorial's settings: 12,500 steps of 4 images per epoch
    dict(num_epochs=5, lr=0.001, momentum=0.9, batch_size=4),
]
REPORTED = {"config_1": dict(test_accuracy=60.0)}  # the report's figure, printed beside ours


class Net(nn.Module):
    """LeNet-5 as in the PyTorch tutorial (LeCun et al., 1998): 62,006 parameters."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def train(model, batches, optimizer, criterion, epoch, log_interval, progress):
    """One epoch of the tutorial's loop; returns the mean loss and the training accuracy in percent."""
    model.train()
    running_loss = loss_sum = 0.0
    correct = 0
    for i, (inputs, labels) in enumerate(batches):
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()
        running_loss += loss.item()
        correct += (outputs.argmax(1) == labels).sum().item()
        if log_interval and i % log_interval == log_interval - 1:  # the tutorial prints every 2000 batches
            print(f"[{epoch + 1}, {i + 1:5d}] loss: {running_loss / log_interval:.3f}", flush=True)
            loss_sum += running_loss
            running_loss = 0.0
        progress.update(i + 1)  # a line every half minute: images/s, time left
    loss_sum += running_loss
    return loss_sum / len(batches), 100.0 * correct / (len(batches) * batches.batch_size)


def main(argv=None):
    args = common.parse_args(__doc__, CONFIGS, argv, device="cpu", log_interval=2000)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise common.ExperimentError("lenet_cpu.py is the single-process tutorial baseline; "
                                     "run lenet_multigpu.py under torchrun")
    # Batches of 4 images are too small to share between threads or to pay for oneDNN's set-up:
    # one thread and PyTorch's plain convolution make the fastest CPU step.
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    run = common.Run(__file__, args)
    data = run.load_data()
    test_batches = run.batches(data.test, 1000)
    for name, config in run.configs(CONFIGS):
        model = run.compile(run.place(Net()))
        criterion = nn.CrossEntropyLoss()
        optimizer = optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"],
                              fused=True)  # the same update in one kernel
        train_batches = run.batches(data.train, config["batch_size"], train=True)
        # the config's history and checkpoints; with --resume it goes on from the last checkpoint
        record = run.record(name, config, model, optimizer, reported=REPORTED.get(name))
        for epoch in record.epochs():
            train_batches.set_epoch(epoch)  # a fresh shuffle every epoch
            started = time.perf_counter()
            loss, accuracy = train(model, train_batches, optimizer, criterion, epoch, args.log_interval,
                                   record.progress(epoch, train_batches))
            seconds = time.perf_counter() - started
            record.add_epoch(loss, accuracy, seconds, test_accuracy=common.evaluate(model, test_batches))
        record.finish(test_batches)  # final figures, confusion matrix, pictures
        if record.status == "completed":
            print("Finished Training")
            print(f"Accuracy of the network on the {len(data.test)} test images: "
                  f"{record.result['final_test_accuracy']:.2f} %")
            for label, class_accuracy in record.result["per_class_test_accuracy"].items():
                print(f"Accuracy for class: {label:5s} is {class_accuracy:.1f} %")
    return run.finish()


if __name__ == "__main__":
    common.run_main(main)
