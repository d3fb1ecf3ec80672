"""One markdown table of training runs, their ablation flags and their accuracies.

    python summarize.py output/cifar10-* output/results.json

Each argument is a run directory (config.json, metrics.csv), an evaluation's
results.json, or a directory holding one. The results.json in a run directory
or one level below it are read too, with results-2.json, results-3.json, ...
(later evaluations into the same directory). An evaluation's AutoAttack accuracy is
shown for a run when the checkpoint it evaluated has the same content (sha256)
as the run's best_model.pth or final_model.pth. A run whose files are malformed
is left out with a note naming the file; the others are still shown.
"""
import argparse
import math
import os
import sys

import flags
import runs
from cli import exit_status, print_error, start_script
from utils import InputError

# Where files are, not how the model was trained; the method and arch have their own columns.
NOT_SHOWN_FLAGS = flags.LOCATION_FLAGS | {'method', 'arch'}
TEST_SET_SIZE = 10000
HEADER = ['run', 'dataset', 'arch', 'method', 'changed flags', 'epochs', 'best epoch',
          'best clean', 'best PGD', 'final clean', 'final PGD', 'AA best', 'AA final',
          'checks warned', 'minutes']


# ---------------------------------------------------------------------------
# Arguments

def sort_arguments(paths):
    """Split the command line into run directories and results.json files."""
    run_dirs, result_files = [], []
    for path in paths:
        if not os.path.exists(path):
            raise InputError(f'{path}: no such file or directory')
        if os.path.isfile(path):
            result_files.append(path)
        elif runs.is_run_dir(path):
            run_dirs.append(path)
        elif runs.evaluations_in(path):
            result_files += runs.evaluations_in(path)
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
    changed = []
    # --alpha, --pgd-alpha, --width, --amp and --channels-last have no default of their
    # own: they follow epsilon and the method, the architecture, the device.
    own_defaults = flags.own_defaults(config)
    for action in flags.build_parser(config['dataset'])._actions:
        key = action.dest
        if key in NOT_SHOWN_FLAGS or key not in config or not action.option_strings:
            continue
        value = config[key]
        if value == own_defaults.get(key, action.default):
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            changed.append(action.option_strings[0 if value else 1])
        elif action.nargs == 0:  # a switch such as --sync-bn
            changed.append(action.option_strings[0])
        else:
            text = format(value, 'g') if isinstance(value, float) else str(value)
            changed.append(f'{flags.flag_name(key)} {text}')
    return changed


def percent(fraction):
    """0.4123 -> '41.23%', as evaluate.py prints accuracies; '-' for no number."""
    if fraction is None or not math.isfinite(fraction):
        return '-'
    return f'{100 * fraction:.2f}%'


def autoattack(result):
    """An AutoAttack result as table text, with its number of images if not the whole test set."""
    if result is None:
        return '-'
    text = percent(result['accuracy'])
    return text if result.get('n', TEST_SET_SIZE) >= TEST_SET_SIZE else f'{text} (n={result["n"]})'


def summary_row(run):
    """The table row of one run (runs.read_run), as a list of cells."""
    config, best, final = run['config'], run['best'], run['final']
    if best is not None:
        accuracies = [str(int(best['epoch'])), percent(best['test_clean_acc']),
                      percent(best['test_pgd_acc']), percent(final['test_clean_acc']),
                      percent(final['test_pgd_acc'])]
        minutes = f"{run['minutes']:.1f}"
    else:
        accuracies, minutes = ['-'] * 5, '-'
    return ([os.path.basename(os.path.normpath(run['run_dir'])), config['dataset'],
             str(config.get('arch', runs.DEFAULT_ARCH)), config['method'],
             ' '.join(changed_flags(config)) or '(defaults)',
             f'{len(run["rows"])}/{config["epochs"]}']
            + accuracies
            + [autoattack(run['results'][key]['attacks'].get('aa')) for key in runs.MODELS]
            + [checks_warned(run), minutes])


def checks_warned(run):
    """How many gradient-masking checks of the evaluations warned, best and final together."""
    if not any(run['results'][key]['attacks'] for key in runs.MODELS):
        return '-'  # not evaluated
    return str(sum(run['results'][key]['warnings'] for key in runs.MODELS))


def markdown_table(header, rows):
    """A markdown table from a header and rows of cells (strings)."""
    lines = ['| ' + ' | '.join(header) + ' |', '|---' * len(header) + '|']
    lines += ['| ' + ' | '.join(cells) + ' |' for cells in rows]
    return '\n'.join(lines)


def read_all(run_dirs, result_files):
    """(runs.read_run of each readable run, notes): a malformed file leaves out only its own
    run (or, for a results.json named on the command line, only itself), with a note."""
    notes, evaluations = [], []
    for path in result_files:
        try:
            evaluations += runs.read_evaluation(path)
        except InputError as e:
            notes.append(f'{e}; left out')
    read = []
    for run_dir in run_dirs:
        try:
            read.append(runs.read_run(run_dir, evaluations))
        except InputError as e:
            notes.append(f'{e}; run {run_dir} left out')
    return read, notes


def main(argv=None):
    """Print the table for the paths in ``argv``; returns the exit status (2 if any input
    was refused, the table of the rest printed all the same; 1 if it cannot be written)."""
    start_script()
    parser = argparse.ArgumentParser(
        description=__doc__.strip().splitlines()[0],
        epilog='Run directories and results.json files (or folders holding one), in any order.')
    parser.add_argument('paths', nargs='+', metavar='PATH')
    args = parser.parse_args(argv)
    try:
        run_dirs, result_files = sort_arguments(args.paths)
    except InputError as e:
        print_error(e)
        return 2
    read, notes = read_all(run_dirs, result_files)
    for note in notes:
        print_error(note)
    if not read:
        return 2 if notes else 0
    table = markdown_table(HEADER, [summary_row(run) for run in read])
    written = exit_status(lambda: print(table))  # stdout may be a full disk
    return written or (2 if notes else 0)


if __name__ == '__main__':
    sys.exit(main())
