"""Evaluate checkpoints under clean, PGD-10/20/50, C&W-20 and AutoAttack (METHOD.md).

``test_cifar10.py`` and ``test_cifar100.py`` only name the dataset and call
``main``. Every attack runs in fp32 on the model in eval mode, on images in
[0, 1]; the numbers come back from ``evaluate_checkpoint`` and are printed
and saved afterwards. Each distinct file content is attacked once: a checkpoint
with the same SHA-256 as an earlier one is reported with its numbers
(``same_as`` in results.json). After the attacks, ``checks.run_checks`` looks for
the signs of gradient masking (``--no-checks`` skips it).
"""
import argparse
import contextlib
import copy
import json
import logging
import os
import re
import sys
import time

import torch

import checks
from flags import default_eval_alpha
from models import ARCHS
from progress import progress
from cli import (HelpFormatter, device_flag, exit_status, network_width, number_in_range,
                 pixel_units, positive_int, resolve_device, seed_int, start_script)
from data import load_dataset
from utils import (DATASETS, InputError, NonFiniteLogits, atomic_write_text, attack_backend,
                   check_writable_dir, create_new_text_file, evaluate_batches,
                   load_model_weights, pgd_attack, sha256_file)

# name: (loss, iterations); None is clean accuracy, 'aa' is AutoAttack.
ATTACKS = {'clean': None, 'pgd10': ('ce', 10), 'pgd20': ('ce', 20), 'pgd50': ('ce', 50),
           'cw20': ('cw', 20), 'aa': 'autoattack'}
LABELS = {'clean': 'clean', 'pgd10': 'PGD-10', 'pgd20': 'PGD-20', 'pgd50': 'PGD-50',
          'cw20': 'C&W-20', 'aa': 'AutoAttack'}
# --alpha, in /255: a step of 0 would leave PGD and C&W their random start alone.
attack_step = number_in_range(float, 0, 255, low_open=True)


def attack_list(text):
    """--attacks: known names, each once, in the order first given."""
    names = list(dict.fromkeys(n.strip() for n in text.split(',') if n.strip()))
    unknown = [n for n in names if n not in ATTACKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f'unknown attack {", ".join(unknown) or "(none given)"}; choose from {",".join(ATTACKS)}')
    return names


def build_parser(dataset):
    p = argparse.ArgumentParser(
        description=f'Evaluate checkpoints on the {DATASETS[dataset]["name"]} '
                    f'{"validation" if dataset == "tinyimagenet" else "test"} set under L-inf '
                    'attacks.',
        formatter_class=HelpFormatter)
    p.add_argument('--model_path', '--model-path', nargs='+', required=True,
                   help='checkpoint file(s); a run directory means its best_model.pth and '
                        'final_model.pth')
    p.add_argument('--out_dir', '--out-dir', default='./output/',
                   help='results.json (results-2.json, ... when taken: nothing is '
                        'overwritten) and the AutoAttack logs go here')
    p.add_argument('--data-dir', '--data_dir', dest='data_dir', default=f'{dataset}-data')
    p.add_argument('--epsilon', type=pixel_units, default=8.0, help='L-inf radius, in /255')
    p.add_argument('--alpha', type=attack_step, default=None,
                   help='PGD and C&W step, in /255 (default: eps/4, 2 at eps 8)')
    p.add_argument('--n_ex', '--n-ex', type=positive_int, default=10000,
                   help='evaluate the first N test images')
    p.add_argument('--batch_size', '--batch-size', type=positive_int, default=500)
    p.add_argument('--arch', choices=list(ARCHS), default=None,
                   help='the architecture (default: read from the checkpoint)')
    p.add_argument('--width', type=network_width, default=None,
                   help='the width, to check it (default: read from the checkpoint)')
    p.add_argument('--attacks', type=attack_list, default=list(ATTACKS),
                   help=f'comma list from {",".join(ATTACKS)}')
    p.add_argument('--restarts', type=positive_int, default=1, help='for PGD and C&W')
    p.add_argument('--seed', type=seed_int, default=0)
    p.add_argument('--device', type=device_flag,
                   help='cuda, cpu ... (default: cuda when present)')
    p.add_argument('--checks', action=argparse.BooleanOptionalAction, default=True,
                   help='after the attacks, check for signs of gradient masking (checks.py)')
    p.add_argument('--checks-examples', '--checks_examples', type=positive_int,
                   default=checks.SETTINGS.examples, help='test images the checks attack')
    return p


def checkpoint_paths(paths):
    out = []
    for path in paths:
        if os.path.isdir(path):
            found = [os.path.join(path, n) for n in ('best_model.pth', 'final_model.pth')
                     if os.path.isfile(os.path.join(path, n))]
            if not found:
                raise InputError(f'{path}: no best_model.pth or final_model.pth in this directory')
            out += found
        else:
            out.append(path)
    return out


def in_batches(x, y, batch_size):
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)]


def run_attack(model, name, x, y, args, log_path):
    """Accuracy of ``model`` under one attack, as a result dict.

    The RNG is reseeded before each attack, so an attack's number does not
    depend on which attacks ran before it, and PGD-k and PGD-m share their
    random starts.
    """
    torch.manual_seed(args.seed)
    epsilon, alpha = args.epsilon / 255, args.alpha / 255
    start = time.time()
    if name == 'aa':
        correct, info = run_autoattack(model, x, y, epsilon, args, log_path)
    else:
        # What was run, recorded beside its number: clean accuracy is no perturbation at all.
        attack, info = None, dict(epsilon=0.0, epsilon_255=0.0, iterations=0, step_size=0.0,
                                  step_size_255=0.0, restarts=0)
        if ATTACKS[name] is not None:
            loss, iters = ATTACKS[name]
            attack = pgd_attack(epsilon, alpha, iters, args.restarts, loss)
            info = dict(loss=loss, epsilon=epsilon, epsilon_255=args.epsilon, iterations=iters,
                        step_size=alpha, step_size_255=args.alpha, restarts=args.restarts)
        batches = progress(in_batches(x, y, args.batch_size), desc=LABELS[name], leave=False)
        correct, _ = evaluate_batches(model, batches, attack)
    return dict(accuracy=correct / len(y), correct=correct, n=len(y), **info,
                seconds=round(time.time() - start, 2))


def run_autoattack(model, x, y, epsilon, args, log_path):
    """Standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) from the pyautoattack package.

    Its whole log goes to ``log_path``; its progress (attack, batches, robust
    accuracy after each attack) is echoed to stdout by ``AutoAttackProgress``.
    """
    from pyautoattack import AutoAttack
    logger = logging.getLogger('auto-attack')
    logger.setLevel(logging.DEBUG)
    handler = StrictFileHandler(log_path, mode='w')
    handler.setFormatter(logging.Formatter('%(asctime)s %(message)s'))
    echo = AutoAttackProgress()
    logger.addHandler(handler)
    logger.addHandler(echo)
    try:
        adversary = AutoAttack(model, norm='Linf', eps=epsilon, version='standard',
                               seed=args.seed, device=x.device)
        x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=args.batch_size)
    except OSError:  # a failed write (of the log, of stdout) stops the run: no partial log
        with contextlib.suppress(OSError):
            os.unlink(log_path)
        raise
    finally:
        logger.removeHandler(handler)
        logger.removeHandler(echo)
        handler.close()
    max_perturbation = (x_adv - x).abs().amax().item()
    if max_perturbation > epsilon + 1e-5 or x_adv.min() < 0 or x_adv.max() > 1:
        raise RuntimeError(f'AutoAttack returned points outside the threat model '
                           f'(max perturbation {max_perturbation:.6f})')
    correct, _ = evaluate_batches(model, in_batches(x_adv, y, args.batch_size))
    return correct, dict(version='standard', epsilon=adversary.epsilon,
                         epsilon_255=round(adversary.epsilon * 255, 6),
                         components=autoattack_settings(adversary),
                         log=os.path.basename(log_path), max_perturbation=max_perturbation)


def autoattack_settings(adversary):
    """The iterations, restarts, targets and queries each of AutoAttack's attacks ran with.

    Read from the adversary after construction (its version sets them), so
    results.json says what ran, not what the package's defaults should be.
    """
    apgd, apgd_t, fab, square = (adversary.apgd, adversary.apgd_targeted, adversary.fab,
                                 adversary.square)
    settings = {
        'apgd-ce': dict(iterations=apgd.n_iter, restarts=apgd.n_restarts, epsilon=apgd.eps),
        'apgd-t': dict(iterations=apgd_t.n_iter, restarts=apgd_t.n_restarts,
                       target_classes=apgd_t.n_target_classes, epsilon=apgd_t.eps),
        'fab-t': dict(iterations=fab.n_iter, restarts=fab.n_restarts,
                      target_classes=fab.n_target_classes, epsilon=fab.eps),
        'square': dict(queries=square.n_queries, restarts=square.n_restarts, epsilon=square.eps),
    }
    return {name: settings[name] for name in adversary.attacks_to_run}


class StrictFileHandler(logging.FileHandler):
    """A log file whose failed write (a full disk) raises, instead of logging's traceback.

    logging reports a handler's error on stderr and carries on, which would leave
    a partial log and no error status; here the OSError stops the evaluation.
    """

    def handleError(self, record):
        raise  # the exception emit() is handling


class AutoAttackProgress(logging.Handler):
    """Echoes pyautoattack's progress messages to stdout, one short line each.

    pyautoattack has no progress callback; it logs (at DEBUG) the attacks it
    will run, 'running <attack>', '<attack> - <batch>/<batches> - <k> out of
    <n> successfully perturbed' after every batch and 'robust accuracy after
    <ATTACK>: ...' after every attack. Those become lines such as
    'AutoAttack 2/4 APGD-T: batch 3/20, 41 of 500 broken'. Its warnings
    (randomised or dynamic model, too few classes, ...) are shown as they are;
    other messages only go to the log file.
    """
    PATTERNS = {
        'version': re.compile(r'using (\S+) version including (.*?)\.?$'),
        'initial': re.compile(r'initial accuracy: (\S+)$'),
        'running': re.compile(r'running (\S+)$'),
        'batch': re.compile(r'(\S+) - (\d+)/(\d+) - (\d+) out of (\d+) successfully perturbed$'),
        'after': re.compile(r'robust accuracy after (\S+): (\S+) \(total time ([\d.]+) s\)$'),
        'final': re.compile(r'robust accuracy: (\S+)$'),
        'none_left': re.compile(r'no robust datapoints left'),
    }

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.attacks = []

    def emit(self, record):
        try:
            line = self.progress_line(record)
        except Exception:
            self.handleError(record)
            return
        if line is not None:
            print(f'    {line}', file=sys.stdout, flush=True)  # sys.stdout as it is now

    def progress_line(self, record):
        """The console line for one log record, or None for a log-file-only message."""
        message = record.getMessage().strip()
        found = {kind: p.match(message) for kind, p in self.PATTERNS.items()}
        if found['version']:
            self.attacks = [a.strip() for a in found['version'].group(2).split(',')]
            return f'AutoAttack ({found["version"].group(1)}): {", ".join(self.attacks)}'
        if found['initial']:
            return f'AutoAttack: {found["initial"].group(1)} correct before attacking'
        if found['running']:
            return f'AutoAttack {self.numbered(found["running"].group(1))}: running'
        if found['batch']:
            attack, batch, batches, broken, n = found['batch'].groups()
            return (f'AutoAttack {self.numbered(attack)}: batch {batch}/{batches}, '
                    f'{broken} of {n} broken')
        if found['after']:
            attack, accuracy, seconds = found['after'].groups()
            return (f'AutoAttack {self.numbered(attack.lower())}: {accuracy} robust '
                    f'({float(seconds):.1f} s so far)')
        if found['final']:
            return f'AutoAttack: {found["final"].group(1)} robust after all attacks'
        if found['none_left'] or record.levelno >= logging.WARNING:
            return f'AutoAttack: {message}'
        return None

    def numbered(self, attack):
        """'apgd-t' -> '2/4 APGD-T' (its place among the attacks to run)."""
        name = 'Square' if attack == 'square' else attack.upper()
        if attack in self.attacks:
            return f'{self.attacks.index(attack) + 1}/{len(self.attacks)} {name}'
        return name


def evaluate_checkpoint(model, x, y, args, log_prefix, after_each=None):
    """Run ``args.attacks`` on ``model``; returns {attack name: result dict}.

    ``after_each(results so far)`` is called after every attack (to save them).
    """
    model.eval()
    results = {}
    for name in args.attacks:
        results[name] = run_attack(model, name, x, y, args, f'{log_prefix}_autoattack.log')
        print(f'  {LABELS[name]:<11} {100 * results[name]["accuracy"]:6.2f}%  '
              f'({results[name]["seconds"]:.1f} s)', flush=True)
        if after_each is not None:
            after_each(results)
    return results


def format_table(report):
    """A markdown table: one row per attack, one column per checkpoint."""
    names = [os.path.relpath(r['checkpoint']) for r in report['results']]
    lines = ['| attack | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 1) + '|']
    for attack in report['attacks']:
        cells = [f'{100 * r["attacks"][attack]["accuracy"]:.2f}%' for r in report['results']]
        lines.append(f'| {LABELS[attack]} | ' + ' | '.join(cells) + ' |')
    if any('checks' in r for r in report['results']):
        lines.append('| checks | ' + ' | '.join(checks.table_cell(r) for r in report['results'])
                     + ' |')
    return '\n'.join(lines)


def run(dataset, args):
    num_classes = DATASETS[dataset]['num_classes']
    device = resolve_device(args.device)
    script = os.path.basename(sys.argv[0])
    check_writable_dir(args.out_dir, '--out_dir')  # before the hours of attacks, not after
    paths = distinct_paths(checkpoint_paths(args.model_path))
    digests = [checkpoint_digest(p) for p in paths]
    # One model per file content: best_model.pth and final_model.pth are often the same bytes.
    models = {}
    for path, digest in zip(paths, digests):
        if digest not in models:
            models[digest] = load_model_weights(path, dataset, args.arch, args.width, script)
    x, y = load_dataset(dataset, args.data_dir, train=False)
    if args.n_ex > len(y):
        print(f'note: --n_ex {args.n_ex} but the test set has {len(y)} images; using all')
    x = x[:args.n_ex].to(device).float() / 255
    y = y[:args.n_ex].to(device)
    check_clean_logits(models, paths, digests, x[:args.batch_size], device)
    report = dict(dataset=dataset, n_examples=len(y), epsilon=args.epsilon / 255,
                  epsilon_255=args.epsilon, attacks=args.attacks, seed=args.seed,
                  device=str(device), torch=torch.__version__,
                  command=' '.join([script] + sys.argv[1:]), results=[])
    # A new file each time: an earlier evaluation's results.json is kept.
    results_path = create_new_text_file(args.out_dir, 'results.json', json.dumps(report, indent=2))
    print(f'results go to {results_path}')

    def save():
        atomic_write_text(results_path, json.dumps(report, indent=2))
    attacked = {}  # sha256 -> the entry of the first checkpoint with that content
    log_names = set()  # AutoAttack's logs of this call, one per checkpoint attacked
    for path, digest in zip(paths, digests):
        model, earlier = models[digest], attacked.get(digest)
        entry = dict(checkpoint=os.path.abspath(path), sha256=digest, arch=model.arch,
                     width=model.width, num_classes=num_classes, attacks={})
        report['results'].append(entry)
        if earlier is not None:
            # Same bytes, same numbers: reported under this name too, not attacked again.
            entry['same_as'] = earlier['checkpoint']
            entry['attacks'] = copy.deepcopy(earlier['attacks'])
            if 'checks' in earlier:
                entry['checks'] = copy.deepcopy(earlier['checks'])
            save()
            print(f'{path}: same file content as {os.path.relpath(earlier["checkpoint"])}: '
                  'not attacked again')
            continue
        attacked[digest] = entry
        print(f'{path}: {len(y)} test images, eps {args.epsilon:g}/255, device {device}')
        log_prefix = os.path.join(args.out_dir, log_name(path, log_names)
                                  + numbered_suffix(results_path))

        def save_attacks(results, entry=entry):  # after every attack: a crash keeps the others
            entry['attacks'] = results
            save()
        try:
            with checks.autoattack_messages() as autoattack_messages:
                evaluate_checkpoint(model.to(device), x, y, args, log_prefix,
                                    after_each=save_attacks)
            if args.checks:
                start = time.time()
                entry['checks'] = checks.run_checks(
                    model, x, y, args.epsilon / 255, args.seed, args.batch_size,
                    checks.Settings(examples=args.checks_examples),
                    autoattack_messages if 'aa' in args.attacks else None)
                save()
                print(checks.format_checks(entry['checks'], time.time() - start), flush=True)
        except NonFiniteLogits as e:
            raise InputError(f'{path}: {e}') from None
    print('\n' + format_table(report))
    print(f'\nresults: {results_path}')
    return report


def log_name(path, taken):
    """The checkpoint's file name without .pth, numbered (_2, _3, ...) if another checkpoint
    of this call took it (two runs' best_model.pth): one log does not overwrite another."""
    base = name = os.path.splitext(os.path.basename(path))[0]
    k = 2
    while name in taken:
        name, k = f'{base}_{k}', k + 1
    taken.add(name)
    return name


def check_clean_logits(models, paths, digests, x, device):
    """Before any attack: every checkpoint's clean logits on the first batch ``x`` are finite.

    A model that gives NaN or inf there has no accuracy to report; the InputError
    names its checkpoint, before results.json is written. ``models`` holds one model
    per distinct digest of ``digests``, in the order ``paths`` first give them.
    """
    for digest, model in models.items():  # one model per file content
        path = paths[digests.index(digest)]  # the first checkpoint holding it
        model = model.to(device).eval()
        with torch.no_grad():
            bad = (~torch.isfinite(model(x))).any(1).sum().item()
        if bad:
            raise InputError(f'{path}: the model gives NaN or inf logits on {bad} of the first '
                             f'{len(x)} test images, unattacked; nothing was evaluated')


def checkpoint_digest(path):
    """The SHA-256 of a checkpoint file; a missing or unreadable one is an InputError."""
    if not os.path.isfile(path):
        raise InputError(f'{path}: no such file')
    try:
        return sha256_file(path)
    except OSError as e:
        raise InputError(f'{path}: cannot be read ({e.strerror})')


def distinct_paths(paths):
    """``paths`` without repeats of a file already named (by another path or a symlink)."""
    seen, out = set(), []
    for path in paths:
        key = os.path.realpath(path)
        if key in seen:
            print(f'note: {path} is named more than once; it is evaluated once')
            continue
        seen.add(key)
        out.append(path)
    return out


def numbered_suffix(results_path):
    """'' for results.json, '-2' for results-2.json: the AutoAttack logs carry it too."""
    return os.path.splitext(os.path.basename(results_path))[0][len('results'):]


def parse_args(dataset, argv=None):
    """The test script's flags; --alpha, when not given, follows --epsilon (eps/4)."""
    args = build_parser(dataset).parse_args(argv)
    if args.alpha is None:
        args.alpha = default_eval_alpha(args.epsilon)
    return args


def main(dataset, argv=None):
    """Evaluate; bad input is one `error:` line and status 2, a failed write one and status 1."""
    start_script()
    args = parse_args(dataset, argv)
    with attack_backend():  # every attack and check in full fp32
        code = exit_status(lambda: run(dataset, args))
    if code:
        sys.exit(code)
