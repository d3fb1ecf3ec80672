"""A run directory: its name, its files and their formats, and reading one back.

Training writes run directories; summarize.py and grid.py read them. This
module is the one place that knows what is in one:

    <dataset>[-<arch>]-<method>-seed<seed>-<time>[-n]/
        config.json        every flag, the device, torch version, data SHA-256, the command
        metrics.csv        one row per finished epoch (METRIC_FIELDS)
        checkpoint.pth     everything needed to resume (CHECKPOINT_FORMAT)
        best_model.pth     state_dict of the evaluated model at the best epoch
        final_model.pth    the same after the last epoch: the run is finished
        train.log, curves.png, run.lock
        results.json, results-2.json, ...   evaluations written into it (or one level below)
"""
import csv
import fcntl
import glob
import io
import itertools
import json
import math
import os
import socket
import sys
import time

import flags
from mixkl import STEPS
from utils import (DATASETS, InputError, atomic_save, atomic_write_text, one_line, read_file,
                   safe_torch_load, sha256_file)

# ---------------------------------------------------------------------------
# Names and formats

CONFIG = 'config.json'
METRICS = 'metrics.csv'
CHECKPOINT = 'checkpoint.pth'
BEST = 'best_model.pth'
FINAL = 'final_model.pth'
CURVES = 'curves.png'
LOG = 'train.log'
LOCK = 'run.lock'
# The two saved models, as the evaluation and the tables name them.
MODELS = {'best': BEST, 'final': FINAL}
# The files a run writes atomically: a kill during a write leaves '.NAME.XXXXXXXX' behind.
RUN_FILES = (CHECKPOINT, BEST, FINAL, METRICS, CONFIG, CURVES)

CHECKPOINT_FORMAT = 'mixkl-resumable-1'
METRIC_FIELDS = ['epoch', 'seconds', 'eval_seconds', 'lr', 'train_loss', 'train_acc', 'tau',
                 'kl_weight', 'teacher_updates', 'test_clean_acc', 'test_pgd_acc',
                 'alarm_fgsm_acc', 'alarm_pgd_acc']
# The columns every reader needs (as test_*, whichever split was evaluated).
NEEDED_METRICS = ['epoch', 'seconds', 'eval_seconds', 'test_clean_acc', 'test_pgd_acc']
ACCURACY_METRICS = ['train_acc', 'test_clean_acc', 'test_pgd_acc', 'alarm_fgsm_acc',
                    'alarm_pgd_acc']
# What a checkpoint.pth holds besides its flags, and of which kind (training.py writes it).
CHECKPOINT_FIELDS = {'student': dict, 'teacher': (dict, type(None)), 'teacher_updates': int,
                     'optimizer': dict, 'scheduler': dict, 'epoch': int, 'step': int,
                     'stats': dict, 'best_pgd': (int, float), 'history': list, 'rng': dict}
# JSON nesting beyond this is no file this project wrote (and Python's parser would
# otherwise run out of stack on it).
JSON_DEPTH_LIMIT = 32
# Runs from before the --arch flag trained PreActResNet-18.
DEFAULT_ARCH = 'preactresnet18'


def metric_fields(val_examples):
    """The columns of metrics.csv: with --val-examples the per-epoch accuracies are val_*."""
    return [f.replace('test_', 'val_') if val_examples else f for f in METRIC_FIELDS]


def run_name(dataset, arch, method, seed):
    """The start of a run directory's name; the time and, if taken, a number follow."""
    arch = '' if arch == DEFAULT_ARCH else f'{arch}-'
    return f'{dataset}-{arch}{method}-seed{seed}'


# ---------------------------------------------------------------------------
# Creating, locking, writing

def new_run_dir(out_dir, dataset, arch, method, seed):
    """A new directory in ``out_dir``, named after the run; race-free under concurrent starts."""
    base = os.path.join(out_dir, f'{run_name(dataset, arch, method, seed)}-'
                                 f'{time.strftime("%Y%m%d-%H%M%S")}')
    os.makedirs(out_dir, exist_ok=True)
    for n in itertools.count():
        run_dir = f'{base}-{n}' if n else base
        try:
            os.mkdir(run_dir)  # fails if another start took the name in between
            return os.path.abspath(run_dir)
        except FileExistsError:
            continue


def lock_run_dir(run_dir):
    """An exclusive lock on run.lock in the run directory, held while this process trains there.

    flock's lock belongs to the open file: the kernel drops it when the process
    ends, however it ends, so a killed run leaves no lock that blocks a resume.
    """
    f = open(os.path.join(run_dir, LOCK), 'a+')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or 'another process'
        f.close()
        raise InputError(f'{run_dir} is in use: {holder} is training in it; one process '
                         'at a time (wait for it, or stop it and resume)')
    f.seek(0)
    f.truncate()
    f.write(f'process {os.getpid()} on {socket.gethostname()}\n')
    f.flush()
    return f


def in_use(run_dir):
    """True while a process holds the run directory's lock (trains in it)."""
    path = os.path.join(run_dir, LOCK)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False


def remove_leftover_temporaries(run_dir):
    for name in os.listdir(run_dir):
        if any(name.startswith(f'.{f}.') for f in RUN_FILES):
            os.unlink(os.path.join(run_dir, name))


def write_config(run_dir, config):
    atomic_write_text(os.path.join(run_dir, CONFIG), json.dumps(config, indent=2))


def write_metrics(path, rows, fields=METRIC_FIELDS):
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())


def save_checkpoint(run_dir, checkpoint):
    atomic_save({'format': CHECKPOINT_FORMAT, **checkpoint}, os.path.join(run_dir, CHECKPOINT))


# ---------------------------------------------------------------------------
# Reading

def read_json(path):
    """The parsed JSON file; an unreadable, malformed or absurdly nested one is an InputError."""
    try:
        text = read_file(path).decode()
    except UnicodeDecodeError:
        raise InputError(f'{path}: not a text file')
    if json_depth(text) > JSON_DEPTH_LIMIT:
        raise InputError(f'{path}: nested deeper than {JSON_DEPTH_LIMIT} levels; not a file '
                         'of this project')
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except ValueError as e:
        raise InputError(f'{path}: not valid JSON ({e})')


def _refuse_constant(name):
    raise ValueError(f'{name} is not a number')


def json_depth(text):
    """The deepest bracket nesting of a JSON text (brackets inside strings not counted)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == '\\':
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in '[{':
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ']}':
            depth -= 1
    return deepest


def read_config(run_dir):
    """The run's flags, as training wrote them to config.json; InputError naming the file if
    it is not what training writes (edited into another shape, truncated, not an object)."""
    path = os.path.join(run_dir, CONFIG)
    config = read_json(path)
    if not isinstance(config, dict):
        raise InputError(f'{path}: not a JSON object of flags')
    problems = []
    if config.get('dataset') not in DATASETS:
        problems.append(f'dataset {config.get("dataset")!r}')
    if config.get('method') not in STEPS:
        problems.append(f'method {config.get("method")!r}')
    epochs = config.get('epochs')
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        problems.append(f'epochs {epochs!r}')
    if not isinstance(config.get('seed'), int) or isinstance(config.get('seed'), bool):
        problems.append(f'seed {config.get("seed")!r}')
    if not problems:  # every flag as the parser would have made it
        problems = flags.config_problems(config)
    if problems:
        raise InputError(f'{path}: not the config.json of a training run '
                         f'({", ".join(problems)})')
    return config


def read_metrics(run_dir):
    """The per-epoch rows of metrics.csv as floats, val_* read as test_*; [] before the first
    epoch ends. Values that are not finite numbers are an InputError naming the line."""
    path = os.path.join(run_dir, METRICS)
    if not os.path.lexists(path):
        return []
    try:
        reader = csv.DictReader(io.StringIO(read_file(path).decode(), newline=''))
        fields = [as_test_column(c) for c in reader.fieldnames or []]
        missing = [c for c in NEEDED_METRICS if c not in fields]
        if missing:
            raise InputError(f'{path}: no column {", ".join(missing)}')
        rows = [{as_test_column(k): v for k, v in row.items()} for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise InputError(f'{path}: not a metrics file ({e})')
    numbers = []
    for line, row in enumerate(rows, start=2):
        try:
            values = {c: float(v) for c, v in row.items() if c is not None and v not in (None, '')}
        except (TypeError, ValueError):
            raise InputError(f'{path}, line {line}: not a number')
        if any(c not in values or not math.isfinite(values[c]) for c in NEEDED_METRICS):
            raise InputError(f'{path}, line {line}: not a finite number in one of '
                             f'{", ".join(NEEDED_METRICS)}')
        outside = [c for c in ACCURACY_METRICS if c in values and not 0 <= values[c] <= 1]
        if outside:
            raise InputError(f'{path}, line {line}: {", ".join(outside)} not an accuracy in '
                             '[0, 1]')
        numbers.append(values)
    return numbers


def as_test_column(name):
    """A --val-examples run has val_* where the others have test_*: read them in their place."""
    return 'test_' + name[len('val_'):] if name and name.startswith('val_') else name


def read_checkpoint(path):
    """A resumable checkpoint.pth, loaded without executing code; InputError if it is not one."""
    checkpoint = safe_torch_load(path)
    if not isinstance(checkpoint, dict) or checkpoint.get('format') != CHECKPOINT_FORMAT \
            or not isinstance(checkpoint.get('args'), dict):
        raise InputError(f'--resume {path}: not a resumable checkpoint of this project')
    wrong = [key for key, kind in CHECKPOINT_FIELDS.items()
             if not isinstance(checkpoint.get(key), kind) or isinstance(checkpoint.get(key), bool)]
    if wrong or checkpoint['epoch'] < 0 or checkpoint['step'] < 0:
        raise InputError(f'--resume {path}: not a resumable checkpoint of this project '
                         f'({", ".join(wrong) or "epoch, step"} missing or not what training '
                         'writes)')
    return checkpoint


def check_checkpoint_matches_config(run_dir, checkpoint):
    """A resume's checkpoint.pth must be this run directory's: its flags (seed, method,
    dataset, architecture, width, ...) and data digest are config.json's. InputError naming
    the fields that differ, or the problem with config.json."""
    config = read_config(run_dir)
    saved = {**checkpoint['args'], 'data_sha256': checkpoint.get('data_sha256')}
    differ = sorted(k for k in set(saved) | set(config)
                    if k not in flags.RESUME_MAY_CHANGE and k in saved and k in config_flags(config)
                    and saved[k] != config[k])
    differ += sorted(k for k in ('seed', 'method', 'dataset', 'arch', 'width', 'data_sha256')
                     if k in saved and saved[k] is not None and k not in config)
    if differ:
        raise InputError(f'--resume {run_dir}: {CHECKPOINT} does not belong to this run '
                         f'directory: {", ".join(differ)} differ(s) from {CONFIG}')


def config_flags(config):
    """The keys of config.json that are the run's flags and data (not what it ran on)."""
    return set(config) - {'best_model_chosen_on', 'device_used', 'torch', 'world_size',
                          'threads', 'command'}


def read_evaluation(path):
    """An evaluate.py report: its list of {checkpoint, sha256, attacks} entries, each accuracy
    a finite number in [0, 1]; InputError naming the file otherwise.

    Other entries (width, arch, checks, same_as: a checkpoint not attacked again because an
    earlier one had the same content, whose numbers it carries) are kept, not needed. Each
    entry is given the report's path and its radius (``epsilon_255``; None if unrecorded).
    """
    report = read_json(path)
    entries = report.get('results') if isinstance(report, dict) else None
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get('attacks'), dict)
            and all(isinstance(r, dict) and 'accuracy' in r for r in e['attacks'].values())
            for e in entries):
        raise InputError(f'{path}: not a results.json of the test scripts '
                         '(no "results" list of checkpoints and their attack accuracies)')
    for entry in entries:
        checkpoint = entry.get('checkpoint')
        if not isinstance(checkpoint, str) or not checkpoint or '\0' in checkpoint \
                or not isinstance(entry.get('sha256', ''), str):
            raise InputError(f'{path}: an entry whose checkpoint is not a path '
                             f'({one_line(repr(checkpoint), 60)})')
        for attack, result in entry['attacks'].items():
            accuracy, n = result['accuracy'], result.get('n', 0)
            if not is_number(accuracy) or not 0 <= accuracy <= 1:
                raise InputError(f'{path}: the {one_line(attack, 40)} accuracy '
                                 f'{one_line(repr(accuracy), 40)} is not a number in [0, 1]')
            if not is_number(n) or n != int(n) or n < 0:
                raise InputError(f'{path}: the {one_line(attack, 40)} image count '
                                 f'{one_line(repr(n), 40)} is not a whole number')
    radius = report.get('epsilon_255')
    radius = radius if is_number(radius) else None
    return [dict(entry, report=path, epsilon_255=radius) for entry in entries]


def is_number(value):
    """A finite int or float from JSON (True and False are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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


def run_evaluations(run_dir):
    """The results.json files written into a run directory or one level below it."""
    return evaluations_in(run_dir) + evaluations_in(run_dir, below=True)


# ---------------------------------------------------------------------------
# What a run has done

def is_run_dir(path):
    return os.path.isfile(os.path.join(path, CONFIG))


def run_state(run_dir):
    """'finished' (final_model.pth written), 'interrupted' (a checkpoint to resume from),
    or 'started' (nothing to resume from: killed in its first epoch)."""
    if os.path.isfile(os.path.join(run_dir, FINAL)):
        return 'finished'
    if os.path.isfile(os.path.join(run_dir, CHECKPOINT)):
        return 'interrupted'
    return 'started'


def diverged(run_dir):
    """The divergence message of the run's log, if its last run stopped because it diverged."""
    path = os.path.join(run_dir, LOG)
    if not os.path.isfile(path):
        return None
    with open(path, errors='replace') as f:
        lines = f.read().splitlines()
    last = lines[-1] if lines else ''
    return last.split('] ', 1)[-1] if 'the run diverged' in last else None


def model_results(run_dir, evaluations, epsilon_255=None):
    """The evaluations of the run's two models: for 'best' and 'final', a dict of
    ``attacks`` ({attack: result}) and ``warnings`` (how many of the evaluation's
    gradient-masking checks warned).

    An evaluation counts when it saw the same file content (SHA-256), and, given
    ``epsilon_255`` (the run's radius), when it attacked at that radius; for each
    attack, the one on the most images wins (the latest on a tie). Without the
    file (weights not copied), the evaluated path is matched instead.
    """
    out = {}
    for key, name in MODELS.items():
        path = os.path.realpath(os.path.join(run_dir, name))
        digest = sha256_file(path) if os.path.isfile(path) else None
        attacks, warnings = {}, 0
        for entry in evaluations:
            same_path = os.path.realpath(str(entry.get('checkpoint'))) == path
            same_file = entry.get('sha256') == digest if digest is not None else same_path
            if same_path and not same_file:
                print(f'note: {path} changed after {entry["report"]} evaluated it; '
                      'that evaluation is not used', file=sys.stderr, flush=True)
            if not same_file:
                continue
            radius = entry.get('epsilon_255')
            if None not in (radius, epsilon_255) and abs(radius - epsilon_255) > 1e-6:
                print(f'note: {entry["report"]} evaluated {path} at eps {radius:g}/255, not at '
                      f'the {epsilon_255:g}/255 it trained at; that evaluation is not used',
                      file=sys.stderr, flush=True)
                continue
            for attack, result in entry['attacks'].items():
                if result.get('n', 0) >= attacks.get(attack, {}).get('n', 0):
                    attacks[attack] = result
            warnings = max(warnings, check_warnings(entry))
        out[key] = dict(attacks=attacks, warnings=warnings)
    return out


def check_warnings(entry):
    """How many of an evaluation entry's checks (its ``checks`` list) warned."""
    checks = entry.get('checks')
    if not isinstance(checks, list):
        return 0
    return sum(1 for check in checks if isinstance(check, dict) and check.get('verdict') == 'warn')


# ---------------------------------------------------------------------------
# Catastrophic overfitting

def overfitting_alarm(fgsm_accs, pgd_accs):
    """True when PGD accuracy fell below half its best while FGSM accuracy did not."""
    if not pgd_accs or max(pgd_accs) <= 0:
        return False
    return pgd_accs[-1] < 0.5 * max(pgd_accs) and fgsm_accs[-1] >= 0.5 * max(fgsm_accs)


def alarm_epochs(rows):
    """The epochs after which the overfitting alarm fired (metrics.csv rows, as training logs it)."""
    fgsm = [row.get('alarm_fgsm_acc') for row in rows]
    pgd = [row.get('alarm_pgd_acc') for row in rows]
    if None in fgsm or None in pgd:
        return []
    return [int(rows[n - 1]['epoch']) for n in range(1, len(rows) + 1)
            if overfitting_alarm(fgsm[:n], pgd[:n])]


# ---------------------------------------------------------------------------
# One run, as the tables see it

def read_run(run_dir, evaluations=()):
    """What summarize.py and grid.py show of one run directory, as a dict.

    ``evaluations`` (read_evaluation entries) are added to those found in the run
    directory. InputError naming the file if any of the run's files is malformed.
    """
    config = read_config(run_dir)
    rows = read_metrics(run_dir)
    own = [entry for path in run_evaluations(run_dir) for entry in read_evaluation(path)]
    return dict(
        run_dir=run_dir, config=config, rows=rows, state=run_state(run_dir),
        # The trainer keeps the first epoch reaching the best PGD accuracy; so does max().
        best=max(rows, key=lambda row: row['test_pgd_acc']) if rows else None,
        final=rows[-1] if rows else None,
        minutes=sum(row['seconds'] + row['eval_seconds'] for row in rows) / 60 if rows else None,
        alarm_epochs=alarm_epochs(rows),
        results=model_results(run_dir, [*own, *evaluations], config.get('epsilon')))
