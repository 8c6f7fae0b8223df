"""Scores published LeNet weights on the test set here: how much of a difference is the data copy.

The report published the weights of its LeNet runs: state dicts of the tutorial's Net, saved from
DistributedDataParallel (their keys start "module."). Each file's name says its script, config and
epoch, as the report named them (lenet_multigpu_config_3_epoch_50.pth); this scores each with
lenet_cpu.Net and this repository's data loading on the test set at --data-dir, beside the test
accuracy the report recorded at that epoch on the original CIFAR-10 (report/).

    python score_weights.py REPORT/weights/*.pth --data-dir DIR --json FILE
"""

import argparse
import hashlib
import re
from pathlib import Path

import torch

import common
from lenet_cpu import MEAN, STD, Net

# the report's result file of each script, as its weights' names begin
RESULT_FILES = {
    "lenet_multigpu": "lenet_multigpu_training_results.json",
    "l2": "l2_regularization_training_results.json",
    "dropout": "dropout_regularization_training_results.json",
}
NAME = re.compile(r"(lenet_cpu|lenet_multigpu|l2|dropout)(?:_config_(\d+))?_epoch_(\d+)\.pth")


def reported(path):
    """The test accuracy the report recorded for the weights at `path`, and its decimals."""
    found = NAME.fullmatch(path.name)
    if not found:
        raise common.ExperimentError(f"{path}: not named as the report's weights "
                                     f"(SCRIPT_config_N_epoch_E.pth)")
    script, config, epoch = found.groups()
    if script == "lenet_cpu":
        return 60, 0  # its tutorial line printed a whole percent, and no per-epoch figures
    return common.report_curve(RESULT_FILES[script], f"config_{config}")[int(epoch) - 1], 2


def main(argv=None):
    parser = common.OneLineErrorParser(description=__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", nargs="+", type=Path, metavar="PTH", help="weights files")
    parser.add_argument("--data-dir", default="./data", help="CIFAR-10 folder (default: ./data)")
    parser.add_argument("--json", metavar="PATH", help="also write the scores to this JSON file")
    args = parser.parse_args(argv)
    test = common.load_cifar10(args.data_dir).test
    batches = common.Batches(test, 1000, torch.device("cpu"), MEAN, STD)
    rows = []
    for path in args.weights:
        theirs, decimals = reported(path)
        model = Net()
        common.load_saved(path, lambda state: model.load_state_dict(
            {key.removeprefix("module."): value for key, value in state.items()}))
        ours = common.evaluate(model.eval(), batches)
        rows.append({"weights": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                     "report_test_accuracy": theirs, "report_decimals": decimals,
                     "this_copy_test_accuracy": ours, "difference": ours - theirs})
        print(f"{path.name}: {ours:.2f}% here, {theirs:.{decimals}f}% in the report "
              f"(the original CIFAR-10), {ours - theirs:+.2f} points")
    differences = [row["difference"] for row in rows if row["report_decimals"] == 2]
    if differences:
        print(f"{len(differences)} with a two-decimal figure: {min(differences):+.2f} to "
              f"{max(differences):+.2f} points, mean {sum(differences) / len(differences):+.2f}")
    if args.json:
        data = {"test_images": len(test.labels), "code": common.code_version(__file__),
                "rows": rows}
        common.write_json(Path(args.json), data)
    return 0


if __name__ == "__main__":
    common.run_main(main)
