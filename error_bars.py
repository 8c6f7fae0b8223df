"""Error bars: each config's figures as mean +- standard deviation over runs with different seeds.

One seed's figure moves by a point or more with the seed alone (README.md, "Results"), so a
difference between two configs means something only beside its spread. Train the configs once per
seed, then point this at the run folders:

    python l2_regularization.py --configs 1 2 --val-fraction 0.1 --seed 1   # then --seed 2 and 3
    python error_bars.py modelset/l2_regularization/run_001 modelset/l2_regularization/run_002 ...
    python error_bars.py modelset/l2_regularization       # every run in that folder

A group is one script's config (overrides included) on the same data and precision; it holds one
completed run per seed (the same seed twice is refused: a repeat, not a new sample). For each group
it prints, as mean +- sample standard deviation (n - 1):
  - the last epoch's test accuracy, the figure every script reports;
  - with a validation split (--val-fraction): the test accuracy at the epoch of the best validation
    accuracy (an epoch picked without looking at the test set), and those epochs; a ResNet-18 run
    with a validation split evaluates the test set once only, so it has the first figure alone;
  - the regularization scripts' train-test gap at the last epoch (eval-mode train minus test).
--json PATH writes the same figures, with every seed's value, to a file.
"""

import common  # first: a Ctrl-C while torch loads then ends in one line

import argparse
import json
import statistics
from pathlib import Path


# of each results.json
def run_folders(paths):
    """The run folders among `paths`, each a run (run_NNN) or a folder of runs (all of its
    run_NNN)."""
    folders = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise common.ExperimentError(
                f"{path} is not a folder; name run folders (run_NNN) or the folders that hold them"
            )
        runs = [path] if list(path.glob("config_*/results.json")) else sorted(path.glob("run_*"))
        runs = [run for run in runs if list(run.glob("config_*/results.json"))]
        if not runs:
            raise common.ExperimentError(f"{path} holds no run (no config_N/results.json)")
        folders += runs
    return folders


def read_results(folder):
    """Every config's results.json in run folder `folder`, read and checked as --resume reads
    them: (path, result)."""
    results = []
    for path in sorted(folder.glob("config_*/results.json")):
        result = common.load_saved(path, common.refused)
        if "data" not in result or "seed" not in result.get("environment", {}):
            raise common.ExperimentError(f"{path}: not a run's results (it lacks its data or seed)")
        results.append((path, result))
    return results


def group_key(result):
    """What must match for runs to be seeds of one experiment: script, config, data, precision."""
    return json.dumps(
        [result["script"], result["config"], result["data"], result.get("precision")],
        sort_keys=True,
    )


def picked_by_validation(history):
    """(epoch, test accuracy at it): the first epoch of the best validation accuracy; None without a
    validation split, or without a test accuracy per epoch."""
    if not all("val_accuracy" in entry and "test_accuracy" in entry for entry in history):
        return None
    best = max(history, key=lambda entry: entry["val_accuracy"])  # max keeps the first of equals
    return best["epoch"], best["test_accuracy"]


def spread(values):
    """{"mean", "sd" (sample standard deviation; None for one value), "values"}."""
    sd = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "sd": sd, "values": values}


def shown(figure, unit):
    """A figure as mean +- sd, in `unit` ("%" or " points")."""
    if figure["sd"] is None:
        return f"{figure['mean']:.2f}{unit} (one seed: no spread)"
    return f"{figure['mean']:.2f} +- {figure['sd']:.2f}{unit}"


def summarize(group):
    """The figures of one group: [(path, result), ...] of completed runs with distinct seeds."""
    results = [result for _, result in group]
    first = results[0]
    summary = {
        "script": first["script"],
        "names": sorted({r["name"] for r in results}),
        "config": first["config"],
        "data": first["data"],
        "seeds": [r["environment"]["seed"] for r in results],
        "results": [str(path) for path, _ in group],
        "last_epoch_test_accuracy": spread([r["final_test_accuracy"] for r in results]),
    }
    picked = [picked_by_validation(r["history"]) for r in results]
    if all(picked):
        summary["val_picked_test_accuracy"] = spread([accuracy for _, accuracy in picked])
        summary["val_picked_test_accuracy"]["epochs"] = [epoch for epoch, _ in picked]
    if all("train_test_gap" in r for r in results):
        summary["train_test_gap"] = spread([r["train_test_gap"] for r in results])
    return summary


def summaries(paths):
    """The summary of every group of completed configs in the run folders `paths` (see run_folders),
    sorted by script and config; a config left out (not completed) is printed."""
    groups = {}
    for folder in run_folders(paths):
        for path, result in read_results(folder):
            if result["status"] != "completed":
                print(f"left out: {path} ({result['status']})")
                continue
            group = groups.setdefault(group_key(result), [])
            for other_path, other in group:
                if other["environment"]["seed"] == result["environment"]["seed"]:
                    raise common.ExperimentError(
                        f"{other_path} and {path} are the same config with the same seed "
                        f"({result['environment']['seed']}): name each seed's run once"
                    )
            group.append((path, result))
    found = [summarize(group) for group in groups.values()]
    found.sort(key=lambda s: (s["script"], int(s["names"][0].removeprefix("config_"))))
    return found


def main(argv=None):
    parser = common.OneLineErrorParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders, or folders of runs")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    found = summaries(args.runs)
    print(
        "mean +- standard deviation over seeds; test accuracy at the last epoch, and at the "
        "epoch of the best validation accuracy where there is a validation split"
    )
    for summary in found:
        seeds = ", ".join(map(str, summary["seeds"]))
        line = (
            f"{summary['script']} {'/'.join(summary['names'])} {summary['config']} "
            f"(seeds {seeds}): "
            f"last epoch {shown(summary['last_epoch_test_accuracy'], '%')}"
        )
        if "val_picked_test_accuracy" in summary:
            picked = summary["val_picked_test_accuracy"]
            epochs = ", ".join(map(str, picked["epochs"]))
            line += f" | at the best validation epoch ({epochs}) {shown(picked, '%')}"
        if "train_test_gap" in summary:
            line += f" | train-test gap {shown(summary['train_test_gap'], ' points')}"
        print(line)
    if args.json:
        common.write_json(Path(args.json), found)
        print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    common.run_main(main)
