"""The tutorial LeNet on every visible GPU with nn.DataParallel: the report's ten configs, timed.

The report trained with DistributedDataParallel under torchrun on 4 A100s, and its batch size is
per GPU: its "batch 32" took steps of 4 x 32 = 128 images, 391 steps an epoch. Here one process
drives every visible GPU with nn.DataParallel (the design of this repository), and each config
trains on the report's global batch, on any machine: nn.DataParallel splits it over the GPUs it
finds (on 4 GPUs each gets the report's per-GPU batch); a CPU or one GPU takes it whole. The last
batch of an epoch is short, as the report's. In fp32 (on Ampere and newer GPUs, cuDNN's
convolutions in TF32 by PyTorch's defaults); the data sits on the device, so no loading is timed.

After every epoch, as the report's loop: the test accuracy, and the training accuracy in eval mode
on a quarter of the training images (the report's rank 0 evaluated its quarter). Each config
records two times: its training steps (ours, the warm-up apart), and the time the report's loop
counted, steps, both evaluations and the checkpoint save, which the report's seconds are compared
with. versus_report.png draws the report's test accuracy after every epoch beside ours.

    python lenet_multigpu.py --configs 6     # the report's best timed config: 64.99%
    python lenet_multigpu.py                 # all eleven, in modelset/lenet_multigpu/
    python lenet_multigpu.py --list-configs

The report (4x A100): configs 1-3 reached 47.63 / 60.25 / 65.75%; configs 4-10 reached 62.00,
62.50, 64.99, 63.11, 56.45, 59.44, 58.02% in 263.94, 181.47, 259.07, 180.19, 260.93, 181.00,
163.23 s (REPORTED below; the summary prints ours beside them). Ours, on the full CIFAR-10 (a
JPEG copy on which the report's own models score 0.16-1.41 points lower, README.md), one 2-core
CPU shared with other runs (modelset/reference/lenet_multigpu/; config 3's time includes a pause):

    config | report | ours   | as its loop timed | training time
    1      | 47.63% | 46.94% | 832 s             | 681 s
    2      | 60.25% | 59.29% | not recorded      | 1390 s
    3      | 65.75% | 63.25% | 6129 s            | 5456 s
    4      | 62.00% | 62.44% | 963 s             | 791 s
    5      | 62.50% | 63.23% | 1029 s            | 841 s
    6      | 64.99% | 64.39% | 1124 s            | 931 s
    7      | 63.11% | 62.73% | 1183 s            | 970 s
    8      | 56.45% | 59.13% | 1040 s            | 864 s
    9      | 59.44% | 61.43% | 911 s             | 748 s
    10     | 58.02% | 57.97% | 1056 s            | 871 s
    11     | none   | 56.15% | none              | 1215 s

Config 11 (ours) is config 8 on the same batches every epoch, as the report's sampler drew them: it
ends 0.30 points from the report's config 8, where config 8 ends 2.68 above it; over three seeds it
ends 3.98 points below config 8 (95% CI 0.72 to 7.25; README.md).
"""

import torch
import torch.nn as nn
import torch.optim as optim

import common
from lenet_cpu import MEAN, STD, Net, compile_mode  # the tutorial LeNet and its normalization

REPORT_GPUS = 4  # the report's processes, one per A100


def report_config(num_epochs, lr, momentum, batch_per_gpu):
    """A config of the report's: its batch per GPU on its 4 GPUs, trained as one global batch."""
    return dict(num_epochs=num_epochs, lr=lr, momentum=momentum, batch_per_gpu=batch_per_gpu,
                report_gpus=REPORT_GPUS, batch_size=REPORT_GPUS * batch_per_gpu)


CONFIGS = [
    # 1-3: from an earlier version of the report's code, whose batch size is not published; ours
    # is a choice, 128 per GPU (512 in all): config 1's low 47.63% fits few, large steps
    report_config(50, 0.001, 0.9, 128),
    report_config(100, 0.01, 0.9, 128),
    report_config(200, 0.001, 0.95, 128),
    # 4-10: the report's code (numbered 1-7 there), 50 epochs
    report_config(50, 0.001, 0.9, 32),
    report_config(50, 0.005, 0.9, 64),
    report_config(50, 0.001, 0.95, 32),
    report_config(50, 0.001, 0.95, 64),
    report_config(50, 0.01, 0.9, 32),
    report_config(50, 0.01, 0.9, 64),
    report_config(50, 0.01, 0.9, 512),
]
# 11: ours, config 8 in the report's batch order: its DistributedSampler was never given set_epoch,
# so every epoch drew the same batches; ours draw a new order each epoch
CONFIGS.append(CONFIGS[7] | dict(same_order_every_epoch=True))
# The report's test accuracy per config; for configs 4-10 its seconds on 4x A100 (its loop timed
# the steps, both evaluations and a checkpoint save every epoch, TIMED) and its test accuracy after
# every epoch (report/lenet_multigpu_training_results.json, its config_1-7)
TIMED = ["eval_seconds", "save_seconds"]  # what the report's loop timed besides the steps
REPORTED = {f"config_{number}": dict(test_accuracy=accuracy, timed=TIMED) for number, accuracy in
            enumerate([47.63, 60.25, 65.75, 62.00, 62.50, 64.99, 63.11, 56.45, 59.44, 58.02], 1)}
for number, seconds in zip(range(4, 11), [263.94, 181.47, 259.07, 180.19, 260.93, 181.00, 163.23]):
    curve = common.report_curve("lenet_multigpu_training_results.json", f"config_{number - 3}")
    REPORTED[f"config_{number}"] |= dict(train_seconds=seconds, device="4x A100",
                                         test_accuracy_per_epoch=curve)


def train(model, batches, criterion, optimizer, meter):
    """One epoch: the tutorial's step on every batch."""
    model.train()
    for images, labels in batches:
        optimizer.zero_grad()
        outputs = model(images)  # nn.DataParallel: each GPU runs its share of the batch
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()
        meter.add(loss, outputs, labels)  # running loss and accuracy, summed on the device


def main(argv=None):
    # LeNet's steps are too small to share between threads: one, unless --threads says otherwise
    args = common.parse_args(__doc__, CONFIGS, argv, threads=1)
    if args.evaluate:
        return common.evaluate_saved(args, Net(), MEAN, STD)
    # the with block: Ctrl-C or a kill marks the config interrupted and prints how to resume it
    short_run = "--configs 4 --subset 5000"
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
            split = f", split over {run.gpu_count} GPUs" if run.gpu_count > 1 else ""
            print(f"{name}: the report's {config['batch_per_gpu']} images per GPU on its "
                  f"{REPORT_GPUS} GPUs: batch {config['batch_size']}, {train_batches.steps} steps "
                  f"an epoch{split}")
            torch.manual_seed(args.seed)  # the initial weights
            model = Net().to(run.device)  # fp32, as the report
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
                meter = record.meter(epoch, train_batches.steps)  # seeds the epoch's draws
                started = common.clock(run.device)  # waits for the GPUs: the time is this epoch's
                order = 0 if config.get("same_order_every_epoch") else epoch
                train(model, train_batches.epoch(order), criterion, optimizer, meter)
                ended = common.clock(run.device)
                model.eval()
                accuracies = {
                    "train_eval_accuracy": common.evaluate(model, train_eval_batches),
                    "test_accuracy": common.evaluate(model, test_batches),
                }
                if val_batches:
                    accuracies["val_accuracy"] = common.evaluate(model, val_batches)
                evaluated = common.clock(run.device)
                if not record.add_epoch(meter, started, ended, evaluated, **accuracies):
                    break  # diverged
            if record.status == "running":  # every epoch trained
                record.finish(test_batches)
            result = record.result
            # None: a config the report did not time, or an epoch whose save a kill cut short
            loop_seconds = result["report_loop_seconds"]
            loop = f"; {loop_seconds:.2f} s as the report's loop timed" if loop_seconds else ""
            print(f"{name}: Training time: {result['train_seconds']:.2f} seconds (its steps){loop}")
        return run.finish()


if __name__ == "__main__":
    common.run_main(main)
