"""The PyTorch CIFAR-10 tutorial's training loop, as published: the baseline lenet_cpu.py is timed
against.

Per-image PIL images with ToTensor + Normalize, a DataLoader with batch size 4 and 2 workers, SGD lr
0.001 momentum 0.9, the running loss every 2000 batches, then the test accuracy. The model is
lenet_cpu.Net, the same network. The images come from common.load_cifar10, which reads the files
without running code from them; each item then goes through what torchvision's CIFAR10 dataset does
per image (Image.fromarray, then the transform). Run by benchmarks/lenet_cpu_speed.py:

    python benchmarks/tutorial_lenet.py --data-dir ./data --epochs 2
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.optim as optim
import torchvision.transforms as transforms
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
from lenet_cpu import Net  # noqa: E402  (the same network as the script under test)


class CIFAR10Images(torch.utils.data.Dataset):
    """One split as torchvision's CIFAR10 serves it: a PIL image through the transform, and the
    label."""

    def __init__(self, split, transform):
        # height, width, channels: as PIL wants them
        self.images = split.images.permute(0, 2, 3, 1).numpy()
        self.labels = split.labels.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default="./data", help="folder holding cifar-10-batches-py")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs")
    parser.add_argument("--seed", type=int, default=1, help="random seed")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    data = common.load_cifar10(args.data_dir)
    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
    )
    trainloader = torch.utils.data.DataLoader(
        CIFAR10Images(data.train, transform), batch_size=4, shuffle=True, num_workers=2
    )
    testloader = torch.utils.data.DataLoader(
        CIFAR10Images(data.test, transform), batch_size=4, shuffle=False, num_workers=2
    )

    net = Net()
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    for epoch in range(args.epochs):
        running_loss = 0.0
        for i, (inputs, labels) in enumerate(trainloader, 0):
            optimizer.zero_grad()
            outputs = net(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            if i % 2000 == 1999:
                print(f"[{epoch + 1}, {i + 1:5d}] loss: {running_loss / 2000:.3f}")
                running_loss = 0.0
    print("Finished Training")

    correct = total = 0
    with torch.no_grad():
        for images, labels in testloader:
            predicted = net(images).argmax(1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
    print(f"Accuracy of the network on the {total} test images: {100 * correct / total:.2f} %")


if __name__ == "__main__":
    main()
