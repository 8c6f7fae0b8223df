"""The PyTorch CIFAR-10 tutorial's LeNet on the CPU: batch 4, SGD lr 0.001 momentum 0.9, the
course's 5 epochs.

The tutorial, "Training a Classifier"
(https://pytorch.org/tutorials/beginner/blitz/cifar10_tutorial.html), trains this Net with batch
size 4 and SGD (lr 0.001, momentum 0.9) on images normalized with mean 0.5 and std 0.5, for 2
epochs, printing the running loss every 2000 batches. The course ran 5 epochs (CONFIGS). train()
below is the tutorial's loop, step for step. What differs from the tutorial, for speed and
bookkeeping; none of it changes the mathematics of a step:
  - the images are held as one normalized tensor and shuffled by a seeded permutation every epoch:
    no PIL images, no DataLoader workers;
  - one CPU thread, PyTorch's own convolution instead of oneDNN's, and SGD's fused kernel (the same
    update rule, computed in one kernel): the fastest step for batches of 4 images;
  - the test set is evaluated after every epoch (curves.png); the final accuracy is the last
    epoch's; --val-fraction holds out a validation split, evaluated beside it;
  - each epoch saves results.json and a checkpoint (Ctrl-C, then --resume), the end confusion.png.
With --device cuda it trains on a GPU in fp32, the report's precision (on Ampere and newer GPUs,
PyTorch's defaults let cuDNN compute its convolutions in TF32).

    python lenet_cpu.py                   # 5 epochs on ./data, outputs in modelset/lenet_cpu/
    python lenet_cpu.py --data-dir PATH   # CIFAR-10 already on disk
    python lenet_cpu.py --evaluate modelset/reference/lenet_cpu/config_1/model.pth --data-dir PATH
    python benchmarks/lenet_cpu_speed.py --data-dir PATH   # against the tutorial's DataLoader loop

Measured on the full CIFAR-10 (a JPEG copy), 2-core x86-64 CPU, torch 2.14.1, nothing else running
(the run in modelset/reference/lenet_cpu/; 1 min 43 s from the start to the summary, summary.json's
wall_seconds). The report wrote a whole percent, so the two differ by about 1 point, not 0.83:

    config | report | ours   | training time
    1      | 60%    | 59.17% | 91 s
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

import common

CONFIGS = [
    # the tutorial's, the course's 5 epochs
    dict(num_epochs=5, lr=0.001, momentum=0.9, batch_size=4),
]
# the report's figure, printed and saved beside ours: "60%", a whole percent (the tutorial's
# accuracy line divides with //), so ours is compared at that precision
REPORTED = {"config_1": dict(test_accuracy=60, decimals=0)}
# the tutorial's transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)): from [0, 1] to [-1, 1]
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


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


def compile_mode(device):
    """torch.compile's mode for LeNet's small steps: on a GPU "reduce-overhead", CUDA graphs (a
    step's ~70 small kernels launched as one); on a CPU, where launches cost nothing extra, the
    default."""
    return "reduce-overhead" if device.type == "cuda" else "default"


def train(model, batches, criterion, optimizer, meter):
    """One epoch of the tutorial's loop."""
    model.train()
    for inputs, labels in batches:
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()
        # running loss and accuracy; the loss line every 2000 batches
        meter.add(loss, outputs, labels)


def main(argv=None):
    # Batches of 4 images are too small to share between threads or to pay for oneDNN's set-up: one
    # thread (--threads' default here) and PyTorch's plain convolution make the fastest CPU step.
    args = common.parse_args(__doc__, CONFIGS, argv, device="cpu", log_interval=2000, threads=1)
    if args.evaluate:
        return common.evaluate_saved(args, Net(), MEAN, STD)
    torch.backends.mkldnn.enabled = False
    # the with block: Ctrl-C or a kill marks the config interrupted and prints how to resume it
    with common.Run(__file__, args, MEAN, STD, short_run="--subset 10000") as run:
        data = run.load_data()
        test_batches = run.batches(data.test, 1000)
        for name, config in run.configs(CONFIGS):
            # --val-fraction: the last training images held out, evaluated beside the test set
            train_split, val_split = common.hold_out(data.train, config.get("val_fraction"))
            train_batches = run.batches(train_split, config["batch_size"])
            val_batches = run.batches(val_split, 1000) if val_split else None
            torch.manual_seed(args.seed)  # the initial weights
            model = Net().to(run.device)
            if args.compile:
                model = torch.compile(model, mode=compile_mode(run.device))
            criterion = nn.CrossEntropyLoss()
            optimizer = optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"],
                                  fused=True)  # fused: the same update rule, in one kernel
            record = common.Record(run, name, config, reported=REPORTED.get(name))
            # what every checkpoint saves; with --resume, loaded from the last one
            start = record.resume(model, optimizer)
            for epoch in range(start, config["num_epochs"]):
                meter = record.meter(epoch, train_batches.steps)  # seeds the epoch's draws
                started = common.clock(run.device)
                train(model, train_batches.epoch(epoch), criterion, optimizer, meter)
                ended = common.clock(run.device)
                model.eval()
                accuracies = {"test_accuracy": common.evaluate(model, test_batches)}
                if val_batches:
                    accuracies["val_accuracy"] = common.evaluate(model, val_batches)
                evaluated = common.clock(run.device)
                if not record.add_epoch(meter, started, ended, evaluated, **accuracies):
                    break  # diverged
            if record.status == "running":  # every epoch trained
                record.finish(test_batches)  # final figures, confusion matrix, model.pth
                result = record.result
                print("Finished Training")
                print(f"Accuracy of the network on the {len(data.test.labels)} test images: "
                      f"{result['final_test_accuracy']:.2f} %")
                for label, class_accuracy in result["per_class_test_accuracy"].items():
                    print(f"Accuracy for class: {label:5s} is {class_accuracy:.1f} %")
            print(f"{name}: Training time: {record.result['train_seconds']:.2f} seconds")
        return run.finish()


if __name__ == "__main__":
    common.run_main(main)
