"""Error bars: each config's figures over seeds, and each config against its control.

One seed's figure moves by a point or more with the seed alone (README.md, "Results"), so a
difference between two configs means something only beside its spread. Train the configs once per
seed, then point this at the run folders:

    python l2_regularization.py --configs 1 5 --val-fraction 0.1 --seed 1   # then --seed 2 and 3
    python error_bars.py modelset/l2_regularization/run_001 modelset/l2_regularization/run_002 ...
    python error_bars.py modelset/l2_regularization       # every run in that folder

A group is one script's config (overrides included) on the same data, subset and precision: one
completed run per seed (the same seed twice is refused: a repeat, not a new sample; a --dry-run is
no sample at all). For each group, as mean +- sample standard deviation (n - 1):
  - the last epoch's test accuracy, the figure every script reports;
  - with a validation split (--val-fraction): the test accuracy at the epoch of the best validation
    accuracy (an epoch picked without looking at the test set), and those epochs;
  - the train-test gap at the last epoch (eval-mode train minus test accuracy), where recorded.
Then each config against its control (the same config with its treatment off or absent: weight
decay, dropout rate, the report's fixed batch order), seed by seed over the seeds both ran: the
mean of the paired differences with its 95% confidence interval from the t-distribution. With 3
seeds, "higher for every seed" has a chance of 1 in 8 without any effect; the interval is the
evidence. --json PATH writes it all.
"""

import argparse
import json
import math
import statistics
from pathlib import Path

import common

TREATMENTS = ("weight_decay", "dropout_rate", "same_order_every_epoch")  # a control has them off
FIGURES = {  # what is compared, and its unit
    "last_epoch_test_accuracy": "%",
    "val_picked_test_accuracy": "%",
    "train_test_gap": " points",
}


def run_folders(paths):
    """The run folders among `paths`, each a run (run_NNN) or a folder of runs."""
    folders = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise common.ExperimentError(f"{path} is not a folder; name run folders or the "
                                         f"folders that hold them")
        runs = [path] if list(path.glob("config_*/results.json")) else sorted(path.glob("run_*"))
        runs = [run for run in runs if list(run.glob("config_*/results.json"))]
        if not runs:
            raise common.ExperimentError(f"{path} holds no run (no config_N/results.json)")
        folders += runs
    return folders


def read_results(folder):
    """(path, result) of every config's results.json in run folder `folder`, checked as --resume
    checks them; config folders not named config_N are no configs."""
    found = []
    for path in sorted(folder.glob("config_*/results.json")):
        if path.parent.name[7:].isdigit():
            found.append((path, common.load_saved(path)))
    return found


def group_key(result):
    """What must match for runs to be seeds of one experiment."""
    environment = result["environment"]
    same = [result["script"], result["config"], result["data"], result.get("precision"),
            environment.get("subset")]
    return json.dumps(same, sort_keys=True)


def picked_by_validation(history):
    """(epoch, test accuracy there): the first epoch of the best validation accuracy; None without
    a validation split or a test accuracy per epoch."""
    if not all("val_accuracy" in entry and "test_accuracy" in entry for entry in history):
        return None
    best = max(history, key=lambda entry: entry["val_accuracy"])  # max keeps the first of equals
    return best["epoch"], best["test_accuracy"]


def t_quantile(probability, freedom):
    """The `probability` quantile of Student's t-distribution with `freedom` (whole) degrees of
    freedom, by bisection on its exact distribution function (Abramowitz and Stegun 26.7.3-4)."""
    def below(t):  # P(|T| < t)
        theta = math.atan(t / math.sqrt(freedom))
        cos, sin = math.cos(theta), math.sin(theta)
        term = 1.0 if freedom % 2 == 0 else cos
        total = term if freedom > 1 else 0.0
        for k in range(2 if freedom % 2 == 0 else 3, freedom - 1, 2):
            term *= cos * cos * (k - 1) / k
            total += term
        return sin * total if freedom % 2 == 0 else 2 / math.pi * (theta + sin * total)

    low, high = 0.0, 1000.0
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if below(middle) < 2 * probability - 1 else (low, middle)
    return (low + high) / 2


def spread(values):
    """{"mean", "sd" (sample standard deviation; None for one value), "values"}."""
    sd = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "sd": sd, "values": values}


def paired(differences):
    """The mean of paired differences with its 95% confidence interval (t-distribution)."""
    figure = spread(differences)
    if figure["sd"] is not None:
        half = t_quantile(0.975, len(differences) - 1) * figure["sd"] / math.sqrt(len(differences))
        figure["ci95"] = [figure["mean"] - half, figure["mean"] + half]
    return figure


def shown(figure, unit):
    """A figure as mean +- sd, in `unit` ("%" or " points")."""
    if figure["sd"] is None:
        return f"{figure['mean']:.2f}{unit} (one seed: no spread)"
    return f"{figure['mean']:.2f} +- {figure['sd']:.2f}{unit}"


def shown_difference(figure, unit):
    """A paired difference as its mean and 95% confidence interval, in `unit`."""
    if "ci95" not in figure:
        return f"{figure['mean']:+.2f}{unit} (one seed: no interval)"
    low, high = figure["ci95"]
    return f"{figure['mean']:+.2f}{unit} (95% CI {low:+.2f} to {high:+.2f})"


def per_seed(results):
    """{figure name: {seed: value}} of one group's completed runs."""
    figures = {name: {} for name in FIGURES}
    for result in results:
        seed = result["environment"]["seed"]
        figures["last_epoch_test_accuracy"][seed] = result["final_test_accuracy"]
        picked = picked_by_validation(result["history"])
        if picked:
            figures["val_picked_test_accuracy"][seed] = picked[1]
        if "train_test_gap" in result:
            figures["train_test_gap"][seed] = result["train_test_gap"]
    return figures


def summarize(group):
    """The figures of one group: [(path, result), ...] of completed runs with distinct seeds."""
    results = [result for _, result in group]
    seeds = [result["environment"]["seed"] for result in results]
    summary = {
        "script": results[0]["script"],
        "names": sorted({r["name"] for r in results}),
        "config": results[0]["config"],
        "data": results[0]["data"],
        "seeds": seeds,
        "results": [str(path) for path, _ in group],
        "per_seed": per_seed(results),
    }
    for name, values in summary["per_seed"].items():
        if len(values) == len(seeds):
            summary[name] = spread([values[seed] for seed in seeds])
    picked = [picked_by_validation(r["history"]) for r in results]
    if all(picked):
        summary["val_picked_test_accuracy"]["epochs"] = [epoch for epoch, _ in picked]
    return summary


def control_of(summary, found):
    """The summary among `found` of the same script and data whose config is this one's with its
    treatment at 0 or absent; None when there is none (or this is a control)."""
    for key in TREATMENTS:
        if summary["config"].get(key):
            without = {k: v for k, v in summary["config"].items() if k != key}
            for other in found:
                same = (other["script"], other["data"]) == (summary["script"], summary["data"])
                if same and other["config"] in (without, without | {key: 0.0}):
                    return other
    return None


def versus_control(summary, control):
    """Each figure's paired differences from the control, over the seeds both ran."""
    versus = {"control": control["names"][0]}
    for name in FIGURES:
        ours, theirs = summary["per_seed"][name], control["per_seed"][name]
        seeds = sorted(set(ours) & set(theirs))
        if seeds:
            versus[name] = paired([ours[seed] - theirs[seed] for seed in seeds]) | {"seeds": seeds}
    return versus


def summaries(paths):
    """The summary of every group of completed configs in the run folders `paths`, sorted by
    script and config, each with its comparison with its control; configs left out are printed."""
    groups = {}
    for folder in run_folders(paths):
        for path, result in read_results(folder):
            if result["environment"].get("dry_run"):
                raise common.ExperimentError(f"{path} is a --dry-run: no figure to average")
            if result["status"] != "completed":
                print(f"left out: {path} ({result['status']})")
                continue
            group = groups.setdefault(group_key(result), [])
            seed = result["environment"]["seed"]
            for other_path, other in group:
                if other["environment"]["seed"] == seed:
                    raise common.ExperimentError(f"{other_path} and {path} are the same config "
                                                 f"with the same seed ({seed}): name each once")
            group.append((path, result))
    found = [summarize(group) for group in groups.values()]
    found.sort(key=lambda s: (s["script"], int(s["names"][0][7:])))
    for summary in found:
        control = control_of(summary, found)
        if control:
            summary["versus_control"] = versus_control(summary, control)
    return found


def main(argv=None):
    parser = common.OneLineErrorParser(description=__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders, or folders of runs")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    found = summaries(args.runs)
    print("mean +- standard deviation over seeds; test accuracy at the last epoch, and at the "
          "epoch of the best validation accuracy where there is a validation split")
    for summary in found:
        line = f"{summary['script']} {'/'.join(summary['names'])} {summary['config']} (seeds "
        line += f"{', '.join(map(str, summary['seeds']))}):"
        labels = {"last_epoch_test_accuracy": "last epoch", "train_test_gap": "train-test gap"}
        for name, unit in FIGURES.items():
            if name in summary:
                epochs = summary[name].get("epochs")
                label = labels.get(name, f"at the best validation epoch ({epochs})")
                line += f" | {label} {shown(summary[name], unit)}"
        print(line)
        versus = summary.get("versus_control", {})
        for name, unit in FIGURES.items():
            if name in versus:
                print(f"    minus {versus['control']}, {name.replace('_', ' ')}, paired over "
                      f"seeds {versus[name]['seeds']}: {shown_difference(versus[name], unit)}")
    if args.json:
        common.write_json(Path(args.json), found)
        print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    common.run_main(main)
