"""One markdown table of training runs, their ablation flags and their accuracies.

    python summarize.py output/cifar10-* output/results.json

Each argument is a run directory (config.json, metrics.csv), an evaluation's
results.json, or a directory holding one. The results.json in a run directory
or one level below it are read too, with results-2.json, results-3.json, ...
(later evaluations into the same directory). An evaluation's AutoAttack accuracy is
shown for a run when the checkpoint it evaluated has the same content (sha256)
as the run's best_model.pth or final_model.pth.
"""
import argparse
import csv
import glob
import json
import os
import sys

import models
import training
from cli import cuda_default, exit_status, start_script
from utils import DATASETS, InputError, sha256_file

# Where files are, not how the model was trained; the method and arch have their own columns.
NOT_SHOWN_FLAGS = {'data_dir', 'out_dir', 'resume', 'device', 'method', 'arch'}
METRIC_COLUMNS = ['epoch', 'seconds', 'eval_seconds', 'test_clean_acc', 'test_pgd_acc']
CHECKPOINTS = ['best_model.pth', 'final_model.pth']
TEST_SET_SIZE = 10000
# Runs from before the --arch flag trained PreActResNet-18.
DEFAULT_ARCH = 'preactresnet18'
HEADER = ['run', 'dataset', 'arch', 'method', 'changed flags', 'epochs', 'best epoch',
          'best clean', 'best PGD', 'final clean', 'final PGD', 'AA best', 'AA final', 'minutes']


# ---------------------------------------------------------------------------
# Reading

def read_json(path):
    """The parsed JSON file; an unreadable or malformed file is an InputError."""
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise InputError(f'{path}: {e.strerror}')
    except ValueError as e:
        raise InputError(f'{path}: not valid JSON ({e})')


def read_config(run_dir):
    """The run's flags, as the trainer wrote them to config.json."""
    path = os.path.join(run_dir, 'config.json')
    config = read_json(path)
    if not isinstance(config, dict) or 'method' not in config or 'dataset' not in config:
        raise InputError(f'{path}: not the config.json of a MIX_KL_CIFAR*.py run '
                         '(no "method" or "dataset" entry)')
    if config['dataset'] not in DATASETS:
        raise InputError(f'{path}: unknown dataset {config["dataset"]!r}')
    return config


def read_metrics(run_dir):
    """The per-epoch rows of metrics.csv, as floats; [] before the first epoch ends."""
    path = os.path.join(run_dir, 'metrics.csv')
    if not os.path.exists(path):
        return []
    try:
        with open(path, newline='') as f:
            reader = csv.DictReader(f)
            # A --val-examples run has val_* where the others have test_*: read them in their place.
            def column(name):
                return 'test_' + name[len('val_'):] if name.startswith('val_') else name
            missing = [c for c in METRIC_COLUMNS if c not in map(column, reader.fieldnames or [])]
            if missing:
                raise InputError(f'{path}: no column {", ".join(missing)}')
            rows = [{column(k): v for k, v in row.items()} for row in reader]
    except OSError as e:
        raise InputError(f'{path}: {e.strerror}')
    numbers = []
    for line, row in enumerate(rows, start=2):
        try:
            numbers.append({c: float(row[c]) for c in METRIC_COLUMNS})
        except (TypeError, ValueError):
            raise InputError(f'{path}, line {line}: not a number in one of '
                             f'{", ".join(METRIC_COLUMNS)}')
    return numbers


def read_evaluation(path):
    """An evaluate.py report: its list of {checkpoint, sha256, attacks} entries.

    Other entries (width, arch, same_as: a checkpoint not attacked again because an
    earlier one had the same content, whose numbers it carries) are kept, not needed.
    """
    report = read_json(path)
    entries = report.get('results') if isinstance(report, dict) else None
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get('attacks'), dict)
            and all(isinstance(r, dict) and 'accuracy' in r for r in e['attacks'].values())
            for e in entries):
        raise InputError(f'{path}: not a results.json of test_cifar10.py / test_cifar100.py '
                         '(no "results" list of checkpoints and their attack accuracies)')
    return [dict(entry, report=path) for entry in entries]


def evaluations_in(directory, below=False):
    """The reports evaluate.py wrote in ``directory`` (``below``: in its subdirectories).

    results.json, then results-2.json, results-3.json, ...: later evaluations into
    the same directory (evaluate.py never overwrites one), in the order they were made.
    """
    base = glob.escape(directory)
    if below:
        base = os.path.join(base, '*')
    found = [path for pattern in ('results.json', 'results-[0-9]*.json')
             for path in glob.glob(os.path.join(base, pattern))]
    return sorted(found, key=lambda path: (os.path.dirname(path), evaluation_number(path)))


def evaluation_number(path):
    """1 for results.json, n for results-n.json."""
    suffix = os.path.basename(path)[len('results-'):-len('.json')]
    return int(suffix) if suffix.isdigit() else 1


def sort_arguments(paths):
    """Split the command line into run directories and results.json files."""
    run_dirs, result_files = [], []
    for path in paths:
        if not os.path.exists(path):
            raise InputError(f'{path}: no such file or directory')
        if os.path.isfile(path):
            result_files.append(path)
        elif os.path.isfile(os.path.join(path, 'config.json')):
            run_dirs.append(path)
            result_files += evaluations_in(path) + evaluations_in(path, below=True)
        elif evaluations_in(path):
            result_files += evaluations_in(path)
        else:
            raise InputError(f'{path}: neither a run directory (no config.json) nor an '
                             'evaluation (no results.json)')
    if not run_dirs:
        raise InputError('no run directory among the arguments (a run directory holds config.json)')
    unique_files = list(dict.fromkeys(os.path.realpath(p) for p in result_files))
    return run_dirs, unique_files


# ---------------------------------------------------------------------------
# One run, one row

def changed_flags(config):
    """The run's flags that differ from the script's defaults, as command-line text."""
    method = config['method']
    changed = []
    for action in training.build_parser(config['dataset'])._actions:
        key = action.dest
        if key in NOT_SHOWN_FLAGS or key not in config or not action.option_strings:
            continue
        # --alpha, --width, --amp and --channels-last have no default of their own: they
        # follow the method, the architecture, the device.
        on_cuda = cuda_default(config.get('device_used'))
        arch = models.ARCHS.get(config.get('arch', DEFAULT_ARCH))
        own_defaults = {'alpha': training.DEFAULT_ALPHA.get(method), 'amp': on_cuda,
                        'channels_last': on_cuda, 'width': arch and arch.default_width}
        default = own_defaults.get(key, action.default)
        value = config[key]
        if value == default:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            changed.append(action.option_strings[0 if value else 1])
        elif action.nargs == 0:  # a switch such as --sync-bn
            changed.append(action.option_strings[0])
        else:
            text = format(value, 'g') if isinstance(value, float) else str(value)
            changed.append(f'--{key.replace("_", "-")} {text}')
    return changed


def autoattack(run_dir, checkpoint, evaluations):
    """AutoAttack accuracy of the run's ``checkpoint`` file, as table text.

    An evaluation counts when it saw the same file content; with several, the
    one on the most test images wins. Without the file (weights not copied),
    the evaluated path is matched instead.
    """
    path = os.path.realpath(os.path.join(run_dir, checkpoint))
    digest = sha256_file(path) if os.path.isfile(path) else None
    matches = []
    for entry in evaluations:
        same_path = os.path.realpath(str(entry.get('checkpoint'))) == path
        same_file = entry.get('sha256') == digest if digest is not None else same_path
        if same_path and not same_file:
            print(f'note: {path} changed after {entry["report"]} evaluated it; '
                  'that evaluation is not shown', file=sys.stderr)
        if same_file and 'aa' in entry['attacks']:
            matches.append(entry['attacks']['aa'])
    if not matches:
        return '-'
    best = max(matches, key=lambda result: result.get('n', 0))
    text = percent(best['accuracy'])
    return text if best.get('n', TEST_SET_SIZE) >= TEST_SET_SIZE else f'{text} (n={best["n"]})'


def percent(fraction):
    """0.4123 -> '41.23%', as evaluate.py prints accuracies."""
    return f'{100 * fraction:.2f}%'


def summarize_run(run_dir, evaluations):
    """The table row of one run directory, as a list of cells."""
    config = read_config(run_dir)
    rows = read_metrics(run_dir)
    if rows:
        # The trainer keeps the first epoch reaching the best PGD accuracy; so does max().
        best = max(rows, key=lambda row: row['test_pgd_acc'])
        final = rows[-1]
        accuracies = [str(int(best['epoch'])), percent(best['test_clean_acc']),
                      percent(best['test_pgd_acc']), percent(final['test_clean_acc']),
                      percent(final['test_pgd_acc'])]
        minutes = f"{sum(row['seconds'] + row['eval_seconds'] for row in rows) / 60:.1f}"
    else:
        accuracies, minutes = ['-'] * 5, '-'
    return ([os.path.basename(os.path.normpath(run_dir)), config['dataset'],
             str(config.get('arch', DEFAULT_ARCH)), config['method'],
             ' '.join(changed_flags(config)) or '(defaults)',
             f'{len(rows)}/{config.get("epochs", "?")}']
            + accuracies
            + [autoattack(run_dir, name, evaluations) for name in CHECKPOINTS]
            + [minutes])


def markdown_table(header, rows):
    """A markdown table from a header and rows of cells (strings)."""
    lines = ['| ' + ' | '.join(header) + ' |', '|---' * len(header) + '|']
    lines += ['| ' + ' | '.join(cells) + ' |' for cells in rows]
    return '\n'.join(lines)


def main(argv=None):
    """Print the table for the paths in ``argv``; returns the exit status."""
    start_script()
    parser = argparse.ArgumentParser(
        description=__doc__.strip().splitlines()[0],
        epilog='Run directories and results.json files (or folders holding one), in any order.')
    parser.add_argument('paths', nargs='+', metavar='PATH')
    args = parser.parse_args(argv)
    try:
        run_dirs, result_files = sort_arguments(args.paths)
        evaluations = [entry for path in result_files for entry in read_evaluation(path)]
        rows = [summarize_run(run_dir, evaluations) for run_dir in run_dirs]
    except InputError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return exit_status(lambda: print(markdown_table(HEADER, rows)))  # stdout may be a full disk


if __name__ == '__main__':
    sys.exit(main())
