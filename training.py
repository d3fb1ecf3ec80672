"""The training run around mixkl.py's step: flags, epochs, per-epoch evaluation, checkpoints.

``MIX_KL_CIFAR10.py`` and ``MIX_KL_CIFAR100.py`` name the dataset and call
``main``. ``Trainer.fit`` runs the epochs; ``Trainer.train_epoch`` calls the
method's step (mixkl.STEPS) on every batch; ``Trainer.end_epoch`` evaluates the
teacher, writes the metrics and a resumable checkpoint. Under torchrun, ddp.py
wraps the student and the teacher; the step is the same.
"""
import argparse
import contextlib
import csv
import fcntl
import hashlib
import io
import itertools
import json
import math
import os
import random
import signal
import socket
import sys
import time

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import plots
from checks import overfitting_warning
from cli import (HelpFormatter, cuda_default, enable_fast_cuda, nonnegative, number_in_range,
                 pixel_units, positive_int, resolve_device, seed_int)
from ddp import Distributed, SyncedTeacher, wrap_ddp
from mixkl import (STEPS, ConditionalEMA, Hyperparameters, kl_weight, lr_factor, momentum_at,
                   temperature)
from models import ARCHS, NORMALIZATION
from models import build_model as build_architecture
from utils import (DATASETS, CifarLoader, InputError, atomic_save, atomic_write_text, attack_fgsm,
                   check_writable_dir, cudnn_autotuning, evaluate_batches, evaluate_robustness,
                   load_dataset, pgd_attack, safe_torch_load)


# ---------------------------------------------------------------------------
# Command line

DEFAULT_ALPHA = {'mixkl': 8.0, 'fgsm_rs': 10.0, 'n_fgsm': 8.0, 'pgd_at': 2.0}
# Flags that may change when a run is resumed; every other one must match the run.
RESUME_MAY_CHANGE = {'resume', 'device', 'data_dir', 'out_dir', 'amp', 'channels_last'}
TRAINING_SCRIPTS = {'cifar10': 'MIX_KL_CIFAR10.py', 'cifar100': 'MIX_KL_CIFAR100.py',
                    'tinyimagenet': 'MIX_KL_TinyImageNet.py'}

# The authors' Tiny-ImageNet script differs from their CIFAR ones in these defaults (METHOD.md).
DATASET_DEFAULTS = {
    'tinyimagenet': dict(batch_size=64, lr_max=0.2, lamda=42.0, mixup_alpha=1.0, ema_value=0.55,
                         ema_decay_max=0.55, con_reference='start', lr_schedule='cyclic',
                         lr_peak=20 / 110, augment=False),
}
# What a run resumed from a checkpoint written before a flag existed had in its place.
BEFORE_THE_FLAG = dict(arch='preactresnet18', val_examples=0, lr_peak=0.5,
                       ema_decay_max=0.999, con_reference='clean', augment=True, attack_iters=10)


def data_help(dataset):
    if dataset == 'tinyimagenet':
        return 'folder holding tiny-imagenet-200/ (train/<wnid>/images, val/images, ' \
               'val/val_annotations.txt), or that folder itself'
    return 'folder holding (or receiving) the python-pickle CIFAR files'


def build_parser(dataset):
    name = DATASETS[dataset]['name']
    p = argparse.ArgumentParser(
        description=f'Train a robust network on {name} with MIX-KL (or a baseline).',
        formatter_class=HelpFormatter)
    io = p.add_argument_group('data and output')
    io.add_argument('--data-dir', '--data_dir', dest='data_dir', default=f'{dataset}-data',
                    help=data_help(dataset))
    io.add_argument('--out_dir', '--out-dir', dest='out_dir', default='./output/',
                    help='a run directory is created inside it')
    io.add_argument('--resume', help='run directory (or its checkpoint.pth) to continue')
    io.add_argument('--train-examples', type=positive_int, help='use only the first N training images')
    io.add_argument('--eval-examples', type=positive_int, help='use only the first N test images')
    io.add_argument('--val-examples', type=number_in_range(int, 0), default=0,
                    help='hold the last N training images out, evaluate on them after every '
                         'epoch and pick best_model.pth on them (Rice et al. 2020); 0: pick it '
                         'on the test set, as the paper does')

    m = p.add_argument_group('method (defaults: METHOD.md)')
    m.add_argument('--method', choices=list(STEPS), default='mixkl',
                   help='baselines, without a teacher: fgsm_rs, FGSM from a uniform random '
                        'start (Wong et al. 2020); n_fgsm, FGSM from 2-eps noise, unprojected '
                        '(de Jorge et al. 2022); pgd_at, PGD-10 (Madry et al. 2018)')
    m.add_argument('--arch', choices=list(ARCHS), default='preactresnet18',
                   help='resnet18: the authors\' default; wrn34-10: WideResNet-34-10')
    m.add_argument('--epochs', type=positive_int, default=110)
    m.add_argument('--batch-size', type=positive_int, default=128)
    m.add_argument('--lr-schedule', choices=['multistep', 'cyclic'], default='multistep')
    m.add_argument('--lr-peak', type=number_in_range(float, 0, 1, low_open=True), default=0.5,
                   help='cyclic: the fraction of training at which the learning rate peaks '
                        '(Tiny-ImageNet: 20/110, the authors\' 20 of 110 epochs)')
    m.add_argument('--lr-max', type=number_in_range(float, 0, low_open=True), default=0.1)
    m.add_argument('--momentum', type=number_in_range(float, 0, 1), default=0.9)
    m.add_argument('--momentum-min', type=number_in_range(float, 0, 1), default=0.8,
                   help='cyclic: momentum falls from --momentum to this as the learning rate '
                        'rises to its peak, as torch\'s CyclicLR does in the authors\' runs; '
                        'equal to --momentum keeps it constant')
    m.add_argument('--weight-decay', type=nonnegative, default=5e-4)
    m.add_argument('--epsilon', type=pixel_units, default=8.0, help='L-inf radius, in /255')
    m.add_argument('--alpha', type=pixel_units, default=None,
                   help='attack step, in /255 (default 8 for mixkl and n_fgsm, 10 for fgsm_rs, '
                        '2 for pgd_at)')
    m.add_argument('--attack-iters', type=positive_int, default=10, help='pgd_at: PGD steps')
    m.add_argument('--augment', action=argparse.BooleanOptionalAction, default=True,
                   help='random crop (4-pixel zero padding) and horizontal flip of the '
                        'training images')
    m.add_argument('--delta-init', choices=['random', 'zero'], default='random',
                   help='zero: start the FGSM step at the mixed image itself')
    m.add_argument('--mixup-alpha', type=nonnegative, default=0.4, help='0 turns mixup off')
    m.add_argument('--lamda', type=nonnegative, default=12.0,
                   help='weight of the consistency term (0 turns it off)')
    m.add_argument('--tau0', type=number_in_range(float, 0, low_open=True), default=2.0)
    m.add_argument('--gamma', type=number_in_range(float, 0, 1, low_open=True), default=0.99,
                   help='temperature decay per epoch')
    m.add_argument('--tau-schedule', choices=['geometric', 'constant'], default='geometric')
    m.add_argument('--lambda-kl-base', type=nonnegative, default=1.0,
                   help='weight of the KL term at tau0 (0 turns it off)')
    m.add_argument('--ema-value', type=number_in_range(float, 0, 1, low_open=True), default=0.82,
                   help='teacher update when adv/clean accuracy of the batch is below this')
    m.add_argument('--ema-decay-max', type=number_in_range(float, 0, 1), default=0.999,
                   help='the teacher\'s decay is min(this, (k+1)/(k+10)) after k updates')
    m.add_argument('--con-reference', choices=['clean', 'start'], default='clean',
                   help='consistency denominator: mse(xm+delta, xm), or mse(xm+delta, xm+delta0) '
                        'as the authors\' Tiny-ImageNet script has it')

    e = p.add_argument_group('per-epoch evaluation')
    e.add_argument('--pgd-iters', type=positive_int, default=10)
    e.add_argument('--pgd-alpha', type=pixel_units, default=2.0, help='PGD step, in /255')
    e.add_argument('--eval-batch-size', type=positive_int, default=512)
    e.add_argument('--alarm-examples', type=positive_int, default=512,
                   help='training images watched for catastrophic overfitting')

    r = p.add_argument_group('machine')
    r.add_argument('--seed', type=seed_int, default=0)
    r.add_argument('--width', type=positive_int, default=None,
                   help='base width of the ResNets (default 64), widen factor of the '
                        'WideResNet (default 10)')
    r.add_argument('--device', help='cuda, cuda:1, cpu ... (default: cuda when present)')
    r.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                   help='bf16 autocast in the training forwards; evaluation stays fp32 '
                        '(default: on for CUDA, off on CPU, where it is fast only with '
                        'AVX512-BF16 or AMX)')
    r.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=None,
                   help='keep the models in the channels_last memory format '
                        '(default: on for CUDA, off on CPU)')
    r.add_argument('--sync-bn', action='store_true',
                   help='under torchrun: batch-norm statistics over the global batch '
                        '(SyncBatchNorm, CUDA only) instead of per process')
    p.set_defaults(**DATASET_DEFAULTS.get(dataset, {}))
    return p


def parse_args(dataset, argv=None):
    parser = build_parser(dataset)
    args = parser.parse_args(argv)
    if not args.resume:  # a resumed run keeps its own settings
        if args.alpha is None:
            args.alpha = DEFAULT_ALPHA[args.method]
        if args.width is None:
            args.width = ARCHS[args.arch].default_width
        if args.lr_schedule == 'cyclic' and args.momentum_min > args.momentum:
            parser.error(f'--momentum {args.momentum:g}: the cyclic schedule lowers the momentum '
                         f'to --momentum-min ({args.momentum_min:g}), which must not exceed it; '
                         'give --momentum-min too (equal to --momentum: constant momentum)')
    try:
        torch.device(args.device or 'cpu')
    except RuntimeError as e:
        parser.error(f'--device: {e}')
    args.dataset = dataset
    parser.given_flags = given_flags(dataset, argv)
    return args, parser


def given_flags(dataset, argv):
    """The flags written on the command line (their dests), whether or not equal to the default."""
    quiet = build_parser(dataset)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    quiet._defaults.clear()  # the dataset's own defaults (DATASET_DEFAULTS) were not written either
    return set(vars(quiet.parse_args(argv)))


def hyperparameters(args):
    """The step's settings from the flags, in final units: the one place where /255 is applied."""
    return Hyperparameters(
        num_classes=DATASETS[args.dataset]['num_classes'],
        epsilon=args.epsilon / 255, alpha=args.alpha / 255,
        mixup_alpha=args.mixup_alpha, delta_init=args.delta_init, lamda=args.lamda,
        tau0=args.tau0, gamma=args.gamma, tau_schedule=args.tau_schedule,
        lambda_kl_base=args.lambda_kl_base, ema_value=args.ema_value, amp=args.amp,
        ema_decay_max=args.ema_decay_max, con_reference=args.con_reference,
        attack_iters=args.attack_iters)


# ---------------------------------------------------------------------------
# Catastrophic overfitting alarm

def overfitting_alarm(fgsm_accs, pgd_accs):
    """True when PGD accuracy fell below half its best while FGSM accuracy did not."""
    if not pgd_accs or max(pgd_accs) <= 0:
        return False
    return pgd_accs[-1] < 0.5 * max(pgd_accs) and fgsm_accs[-1] >= 0.5 * max(fgsm_accs)


# ---------------------------------------------------------------------------
# Resumable state

CHECKPOINT_FORMAT = 'mixkl-resumable-1'
METRIC_FIELDS = ['epoch', 'seconds', 'eval_seconds', 'lr', 'train_loss', 'train_acc', 'tau',
                 'kl_weight', 'teacher_updates', 'test_clean_acc', 'test_pgd_acc',
                 'alarm_fgsm_acc', 'alarm_pgd_acc']


def metric_fields(val_examples):
    """The columns of metrics.csv: with --val-examples the per-epoch accuracies are val_*."""
    return [f.replace('test_', 'val_') if val_examples else f for f in METRIC_FIELDS]


def rng_state():
    keys, pos, has_gauss, cached = np.random.get_state()[1:]
    return {'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            'numpy': [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                      float(cached)],
            'python': random.getstate()}


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state(('MT19937', keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state['python'])


def read_resume_checkpoint(args, parser):
    """Load the checkpoint named by --resume and merge the run's flags into ``args``."""
    path = args.resume
    if os.path.isdir(path):
        path = os.path.join(path, 'checkpoint.pth')
    if not os.path.isfile(path):
        raise InputError(f'--resume {args.resume}: no resumable checkpoint at {path}')
    checkpoint = safe_torch_load(path)
    if not isinstance(checkpoint, dict) or checkpoint.get('format') != CHECKPOINT_FORMAT:
        raise InputError(f'--resume {path}: not a resumable checkpoint of this project')
    saved = {**BEFORE_THE_FLAG, 'momentum_min': checkpoint['args']['momentum'],
             **checkpoint['args']}
    if saved['dataset'] != args.dataset:
        raise InputError(f'--resume {path}: that is a {DATASETS[saved["dataset"]]["name"]} run; '
                         f'resume it with {TRAINING_SCRIPTS[saved["dataset"]]}')
    merged = dict(saved, device=args.device, resume=args.resume)
    for key in sorted(parser.given_flags - {'device', 'resume'}):
        value = getattr(args, key)
        if key in RESUME_MAY_CHANGE:
            merged[key] = value
        elif value != saved.get(key):
            flag = '--' + key.replace('_', '-')
            raise InputError(f'--resume {path}: the run was trained with {flag} {saved.get(key)}, '
                             f'not {value}')
    return argparse.Namespace(**merged), checkpoint, os.path.dirname(os.path.abspath(path))


class Diverged(Exception):
    """The run diverged: a non-finite loss, or a weight that is not finite or beyond WEIGHT_LIMIT."""


# A float parameter or buffer (BN statistics too) beyond this in absolute value counts as
# diverged. Trained CIFAR networks stay many orders of magnitude below it; a run whose
# weights grow past it (too large a learning rate) is not going to come back.
WEIGHT_LIMIT = 1e8


def weights_diverged(models):
    """'student conv1.weight' (the first float tensor not finite or beyond WEIGHT_LIMIT), or None.

    One fused max-abs per model and one host sync for all of them (this runs after
    every step); the tensors are named only when one is bad.
    """
    states = {name: {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
              for name, model in models.items()}
    largest = torch.stack([torch.stack(torch._foreach_norm(list(state.values()), float('inf')))
                           .max() for state in states.values()]).max()
    if largest <= WEIGHT_LIMIT:  # False for NaN too
        return None
    return next(f'{name} {k}' for name, state in states.items() for k, v in state.items()
                if not v.abs().max() <= WEIGHT_LIMIT)


class Interrupted(Exception):
    """A stop signal during the per-epoch evaluation: it is abandoned, to be run again on resume."""


class StopSignal:
    """Turns SIGINT/SIGTERM into a request to stop at the next step boundary.

    Inside ``interrupting()`` (the per-epoch evaluation, which can take minutes
    on a CPU) a signal raises Interrupted at once instead. A second signal stops
    at once (KeyboardInterrupt), without a checkpoint.
    """

    def __init__(self):
        self.signum = None
        self._previous = {}
        self._at_once = False

    @contextlib.contextmanager
    def interrupting(self):
        if self.signum is not None:
            raise Interrupted
        self._at_once = True
        try:
            yield
        finally:
            self._at_once = False

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f'\n{signal.Signals(signum).name}: saving a checkpoint '
              f'{"now" if self._at_once else "after this step"} '
              '(signal again to quit without one)', file=sys.stderr, flush=True)
        if self._at_once:
            raise Interrupted


# ---------------------------------------------------------------------------
# The run

class Trainer:
    """One training run: data, models, optimiser, run directory, the epoch loop."""

    def __init__(self, args, parser, dist=None):
        # Under torchrun ``dist`` is this process's Distributed (ddp.py); without
        # it everything below is the single-process run.
        self.dist = dist if dist is not None else Distributed()
        checkpoint, self._lock = None, None
        if args.resume:
            args, checkpoint, self.run_dir = read_resume_checkpoint(args, parser)
            check_world_size(checkpoint, self.run_dir, self.dist.world_size)
            if self.dist.is_main:
                self._lock = lock_run_dir(self.run_dir)
                remove_leftover_temporaries(self.run_dir)
            use_threads_of(checkpoint)
        self.args = args
        self.device = self.dist.device if self.dist.enabled else resolve_device(args.device)
        if self.device.type == 'cuda':
            enable_fast_cuda()
        if args.amp is None:
            args.amp = cuda_default(self.device)
        if args.channels_last is None:
            args.channels_last = cuda_default(self.device)
        self.hp = hyperparameters(args)
        self.pgd_alpha = args.pgd_alpha / 255  # the per-epoch evaluation's PGD step
        if args.sync_bn and not self.dist.enabled:
            raise InputError('--sync-bn synchronises BatchNorm across torchrun processes; '
                             'this run has one process')
        if args.sync_bn and self.device.type != 'cuda':
            raise InputError('--sync-bn needs CUDA (SyncBatchNorm has no CPU implementation)')
        if checkpoint is None:
            check_writable_dir(args.out_dir, '--out_dir')
        else:
            check_writable_dir(self.run_dir, '--resume')
        # Rank r draws its own mixup and random starts: seed + r (rank 0: the single-process seed).
        seed_everything(args.seed + self.dist.rank)
        self._load_data()
        if checkpoint is not None and checkpoint.get('data_sha256', self.data_sha256) \
                != self.data_sha256:
            raise InputError(f'--resume {self.run_dir}: {args.data_dir} holds other data than '
                             'the run was trained on (the SHA-256 in config.json differs)')
        if checkpoint is None:
            self.run_dir = self.dist.broadcast_object(new_run_dir(args) if self.dist.is_main
                                                      else None)
            if self.dist.is_main:
                self._lock = lock_run_dir(self.run_dir)
        self._build_models()
        self.epoch, self.step, self.stats = 0, 0, new_epoch_stats()
        self.history, self.best_pgd = [], -1.0
        self._stop_agreed = False  # under torchrun: a stop requested on any rank (see _record)
        if checkpoint is not None:
            self._restore(checkpoint)
        elif self.dist.is_main:
            atomic_write_text(self.path('config.json'), json.dumps(self.config(), indent=2))

    def what_is_kept(self):
        """After a divergence, which files are left, in words: all of them are from before it."""
        kept = [n for n in ('checkpoint.pth', 'best_model.pth') if os.path.exists(self.path(n))]
        if not kept:
            return f'Nothing was saved in {self.run_dir} before it diverged.'
        return f'Kept in {self.run_dir}, from before it diverged: {", ".join(kept)}.'

    def evaluated_split(self):
        """What the per-epoch evaluation sees: 'test', 'val' (Tiny-ImageNet's labelled
        val/ folder), or 'validation' (the images --val-examples holds out)."""
        if self.args.val_examples:
            return 'validation'
        return DATASETS[self.args.dataset].get('test_split', 'test')

    def path(self, name):
        return os.path.join(self.run_dir, name)

    def log(self, message):
        if not self.dist.is_main:
            return
        print(message, flush=True)
        with open(self.path('train.log'), 'a') as f:
            f.write(f'[{time.strftime("%Y-%m-%d %H:%M:%S")}] {message}\n')

    def config(self):
        a = self.args
        chosen_on = (f'{a.val_examples} held-out training images (--val-examples)'
                     if a.val_examples else 'the test set, as in the paper')
        return {**vars(self.args), 'best_model_chosen_on': chosen_on,
                'device_used': str(self.device), 'torch': torch.__version__,
                'world_size': self.dist.world_size, 'threads': torch.get_num_threads(),
                'data_sha256': self.data_sha256,
                'command': ' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:])}

    def _load_data(self):
        a = self.args
        # Under torchrun rank 0 reads (and, if need be, downloads) the data first, alone.
        if not self.dist.is_main:
            self.dist.barrier()
        quiet = not self.dist.is_main
        x_train, y_train = load_dataset(a.dataset, a.data_dir, train=True, quiet=quiet)
        x_test, y_test = load_dataset(a.dataset, a.data_dir, train=False, quiet=quiet)
        if self.dist.is_main:
            self.dist.barrier()
        self.data_sha256 = data_digest(x_train, y_train, x_test, y_test)
        if a.val_examples:
            # The per-epoch evaluation (and best_model.pth) sees these, never the test set.
            if a.val_examples >= len(y_train):
                raise InputError(f'--val-examples {a.val_examples} leaves no training images '
                                 f'(there are {len(y_train)})')
            x_test, y_test = x_train[-a.val_examples:], y_train[-a.val_examples:]
            x_train, y_train = x_train[:-a.val_examples], y_train[:-a.val_examples]
        x_train, y_train = x_train[:a.train_examples], y_train[:a.train_examples]
        x_test, y_test = x_test[:a.eval_examples], y_test[:a.eval_examples]
        self.train_loader = CifarLoader(x_train, y_train, a.batch_size, self.device, train=True,
                                        seed=a.seed, rank=self.dist.rank,
                                        world_size=self.dist.world_size, augment=a.augment)
        check_shares(len(y_train), a.batch_size, self.dist.world_size)
        # The images evaluated after every epoch: the test set, or the held-out validation images.
        self.eval_loader = CifarLoader(x_test, y_test, a.eval_batch_size, self.device, train=False)
        n = a.alarm_examples
        self.alarm_batch = (x_train[:n].to(self.device).float() / 255, y_train[:n].to(self.device))

    def _build_models(self):
        a = self.args
        self.student = build_model(a.arch, a.dataset, a.width, self.device, a.channels_last)
        # Under torchrun every rank starts from rank 0's initialisation (the single-process one).
        self.dist.broadcast_(list(self.student.state_dict().values()))
        self.teacher = None
        if a.method == 'mixkl':
            hp = self.hp
            self.teacher = (SyncedTeacher(self.student, hp.ema_value, hp.ema_decay_max, self.dist)
                            if self.dist.enabled
                            else ConditionalEMA(self.student, hp.ema_value, hp.ema_decay_max))
        # What the step trains: under torchrun the DDP-wrapped student (gradients averaged).
        self.trained = self.student
        if self.dist.enabled:
            if a.sync_bn:
                self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
            self.trained = wrap_ddp(self.student, self.device)
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr=a.lr_max,
                                         momentum=a.momentum, weight_decay=a.weight_decay)
        total = a.epochs * len(self.train_loader)
        self.lr_at = lambda it: lr_factor(it, total, a.lr_schedule, a.lr_peak)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_at)
        self._cycle_momentum()

    def _cycle_momentum(self):
        """Under the cyclic schedule, the momentum of the scheduler's current iteration."""
        a = self.args
        if a.lr_schedule == 'cyclic' and a.momentum_min != a.momentum:
            fraction = self.lr_at(self.scheduler.last_epoch)
            for group in self.optimizer.param_groups:
                group['momentum'] = momentum_at(fraction, a.momentum, a.momentum_min)

    def models(self):
        """{'student': ..., 'teacher': ...}: what training changes (the teacher if MIX-KL)."""
        return {'student': self.student, **({'teacher': self.teacher.model} if self.teacher else {})}

    @property
    def eval_model(self):
        """The model evaluated and saved: the teacher for MIX-KL, else the student."""
        return self.teacher.model if self.teacher is not None else self.student

    # -- the loop ----------------------------------------------------------

    def fit(self):
        a = self.args
        self.log(f'run directory: {self.run_dir}')
        self.log(f'{a.method} on {a.dataset}, {a.arch} (width {a.width}): '
                 f'{len(self.train_loader.labels)} training images, '
                 f'{len(self.eval_loader.labels)} {self.evaluated_split()} images, '
                 f'device {self.device}, '
                 f'epochs {self.epoch + 1}..{a.epochs}')
        with StopSignal() as stop:
            for epoch in range(self.epoch, a.epochs):
                if not (self.train_epoch(epoch, stop) and self.end_epoch(epoch, stop)):
                    self.save_checkpoint()
                    script = os.path.basename(sys.argv[0]) or 'the training script'
                    launcher = (f'torchrun --nproc_per_node={self.dist.world_size}'
                                if self.dist.enabled else 'python')
                    where = (f'in the evaluation after epoch {epoch + 1} (it runs again on resume)'
                             if self.step == len(self.train_loader)
                             else f'at epoch {epoch + 1}, step {self.step}')
                    self.log(f'stopped {where}; checkpoint saved. '
                             f'Resume with: {launcher} {script} --resume {self.run_dir}')
                    # Exit together: torchrun stops the others when one process exits non-zero.
                    self.dist.barrier()
                    self.release()
                    # Under torchrun a rank that got no signal stops because another did.
                    return 128 + (stop.signum or signal.SIGTERM)
        if self.dist.is_main:
            atomic_save(self.eval_model.state_dict(), self.path('final_model.pth'))
            plots.plot_curves(self.history, self.path('curves.png'))
        # Leave together: a rank that tears down its process group while rank 0 is still
        # writing can abort gloo's connection threads.
        self.dist.barrier()
        if self.dist.enabled:
            models = 'the student and the teacher were' if self.teacher is not None \
                else 'the student was'
            self.log(f'{models} bitwise identical on all {self.dist.world_size} processes '
                     'after every epoch')
        self.log(f'done: best {self.evaluated_split()} PGD accuracy {self.best_pgd:.4f}; '
                 f'best_model.pth and final_model.pth in {self.run_dir}')
        self.release()
        return 0

    def release(self):
        """Unlock the run directory (the process's end does it too)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def train_epoch(self, epoch, stop):
        """Train from self.step to the end of the epoch; False if a stop was requested."""
        step = STEPS[self.args.method]
        self.student.train()
        start = time.time()
        batches = tqdm(self.train_loader.batches(epoch, self.step), total=len(self.train_loader),
                       initial=self.step, desc=f'epoch {epoch + 1}/{self.args.epochs}',
                       leave=False, disable=not self.dist.is_main)
        for x, y in batches:
            # Under torchrun only the stop agreed by all ranks counts (same step everywhere).
            if (self._stop_agreed if self.dist.enabled else stop.signum is not None):
                self.stats['seconds'] += time.time() - start
                return False
            result = step(self.trained, self.teacher, self.optimizer, x, y, self.hp, epoch)
            self.scheduler.step()
            self._cycle_momentum()
            self._record(epoch, result, stop)
            batches.set_postfix(loss=f'{self.stats["loss"] / self.stats["n"]:.3f}')
        self.stats['seconds'] += time.time() - start
        return True

    def _record(self, epoch, result, stop):
        """Check the step's loss and add it to the epoch's statistics.

        Under torchrun the numbers are summed over the ranks first (one
        all-reduce), and the ranks agree on a stop requested on any of them.
        """
        loss, correct, n = result.loss, result.correct, result.n
        if self.dist.enabled:
            stopping = stop.signum is not None
            loss_sum, correct, n, stops = self.dist.all_sum(
                torch.tensor([loss * n, correct, n, stopping], dtype=torch.float64)).tolist()
            loss, n, self._stop_agreed = loss_sum / n, int(n), stops > 0
        where = f'epoch {epoch + 1}, step {self.step + 1}'
        if not math.isfinite(loss):
            raise Diverged(f'non-finite loss ({loss}) at {where}')
        bad = weights_diverged(self.models())
        if bad is not None:
            raise Diverged(f'{bad} is not finite or beyond {WEIGHT_LIMIT:g} after {where}')
        self.stats['teacher_updates'] += result.teacher_updated
        self.stats['loss'] += loss * n
        self.stats['correct'] += correct
        self.stats['n'] += n
        self.step += 1

    def end_epoch(self, epoch, stop):
        """Evaluate, record the epoch, save best model, checkpoint and metrics.

        False if a stop signal interrupted the evaluation: the RNGs are then as
        training left them, so the checkpoint saved next reruns it on resume.
        """
        a = self.args
        start = time.time()
        # Under torchrun: rank 0's BN statistics everywhere (ddp.SyncedTeacher says why).
        self.dist.broadcast_(list(self.student.buffers()))
        before = rng_state()
        # Under torchrun the ranks split the test batches and sum the counts; the
        # attacks' random starts then come from (seed, epoch, batch), not the ranks' RNGs.
        # The ranks' collectives must stay in step, so there the evaluation is not cut short.
        try:
            with stop.interrupting() if not self.dist.enabled else contextlib.nullcontext(), \
                    cudnn_autotuning(False):  # PGD's batches shrink as it breaks examples
                clean, pgd = evaluate_robustness(
                    self.eval_model, self.eval_loader.batches(), self.hp.epsilon,
                    self.pgd_alpha, a.pgd_iters, dist=self.dist,
                    seed=a.seed * 100003 + epoch if self.dist.enabled else None)
                alarm_fgsm, alarm_pgd = self._alarm_accuracies()
        except Interrupted:
            set_rng_state(before)
            self.student.train()
            return False
        self._check_replicas(epoch)
        tau = temperature(epoch, a.tau0, a.gamma, a.tau_schedule)
        row = dict(epoch=epoch + 1, seconds=round(self.stats['seconds'], 2),
                   eval_seconds=round(time.time() - start, 2),
                   lr=self.optimizer.param_groups[0]['lr'],
                   train_loss=self.stats['loss'] / self.stats['n'],
                   train_acc=self.stats['correct'] / self.stats['n'],
                   tau=tau, kl_weight=kl_weight(tau, a.tau0, a.lambda_kl_base),
                   teacher_updates=self.stats['teacher_updates'],
                   test_clean_acc=clean, test_pgd_acc=pgd,
                   alarm_fgsm_acc=alarm_fgsm, alarm_pgd_acc=alarm_pgd)
        split = self.evaluated_split()
        row = dict(zip(metric_fields(a.val_examples), row.values()))
        self.history.append(row)
        if pgd > self.best_pgd:
            self.best_pgd = pgd
            if self.dist.is_main:
                atomic_save(self.eval_model.state_dict(), self.path('best_model.pth'))
        self.epoch, self.step, self.stats = epoch + 1, 0, new_epoch_stats()
        self.save_checkpoint()
        if self.dist.is_main:
            write_metrics(self.path('metrics.csv'), self.history,
                          metric_fields(a.val_examples))
        self.log(f'epoch {epoch + 1}/{a.epochs}  {row["seconds"]:.1f}s+{row["eval_seconds"]:.1f}s  '
                 f'lr {row["lr"]:.4g}  loss {row["train_loss"]:.4f}  train acc {row["train_acc"]:.4f}  '
                 f'tau {tau:.4f}  teacher updates {row["teacher_updates"]}  '
                 f'{split} clean {clean:.4f}  PGD-{a.pgd_iters} {pgd:.4f}')
        if overfitting_alarm([r['alarm_fgsm_acc'] for r in self.history],
                             [r['alarm_pgd_acc'] for r in self.history]):
            self.log('WARNING: ' + overfitting_warning(
                f'{len(self.alarm_batch[1])} training images', alarm_fgsm, alarm_pgd,
                best_pgd=max(r['alarm_pgd_acc'] for r in self.history)))
        return True

    def _alarm_accuracies(self):
        """FGSM and PGD accuracy of the student on a fixed batch of training images.

        Under torchrun each rank takes a contiguous part of the batch and the counts are summed.
        """
        x, y = self.alarm_batch
        eps = self.hp.epsilon
        if self.dist.enabled:
            part = torch.arange(len(y), device=y.device).tensor_split(self.dist.world_size)
            x, y = x[part[self.dist.rank]], y[part[self.dist.rank]]
        fgsm = pgd = 0
        if len(y):
            fgsm, _ = evaluate_batches(self.student, [(x, y)],
                                       lambda m, X, Y: attack_fgsm(m, X, Y, eps))
            pgd, _ = evaluate_batches(self.student, [(x, y)],
                                      pgd_attack(eps, self.pgd_alpha, self.args.pgd_iters, 1))
        fgsm, pgd, n = self.dist.all_sum([fgsm, pgd, len(y)])
        self.student.train()
        return fgsm / n, pgd / n

    def _check_replicas(self, epoch):
        """Under torchrun: fail loudly unless the student and teacher are bitwise equal on all ranks."""
        if not self.dist.enabled:
            return
        for name, model in (('student', self.student),
                            ('teacher', self.teacher.model if self.teacher is not None else None)):
            if model is not None and not self.dist.identical(list(model.state_dict().values())):
                raise RuntimeError(f'after epoch {epoch + 1} the {name} differs between the '
                                   f'{self.dist.world_size} processes; this is a bug')

    # -- checkpoints -------------------------------------------------------

    def save_checkpoint(self):
        """Rank 0 writes; under torchrun it holds every rank's RNG states (gathered here)."""
        states = self.dist.gather_objects(rng_state())
        if not self.dist.is_main:
            return
        checkpoint = {
            'format': CHECKPOINT_FORMAT, 'args': vars(self.args),
            'student': self.student.state_dict(),
            'teacher': self.teacher.model.state_dict() if self.teacher is not None else None,
            'teacher_updates': self.teacher.updates if self.teacher is not None else 0,
            'optimizer': self.optimizer.state_dict(), 'scheduler': self.scheduler.state_dict(),
            'epoch': self.epoch, 'step': self.step, 'stats': self.stats,
            'best_pgd': self.best_pgd, 'history': self.history, 'rng': states[0],
            'threads': torch.get_num_threads(), 'data_sha256': self.data_sha256,
        }
        if self.dist.enabled:
            checkpoint.update(world_size=self.dist.world_size, rng_per_rank=states)
        atomic_save(checkpoint, self.path('checkpoint.pth'))

    def _restore(self, checkpoint):
        self.student.load_state_dict(checkpoint['student'])
        if self.teacher is not None:
            self.teacher.model.load_state_dict(checkpoint['teacher'])
            self.teacher.updates = checkpoint['teacher_updates']
        self.optimizer.load_state_dict(checkpoint['optimizer'])
        self.scheduler.load_state_dict(checkpoint['scheduler'])
        self.epoch, self.step = checkpoint['epoch'], checkpoint['step']
        self.stats, self.best_pgd = checkpoint['stats'], checkpoint['best_pgd']
        self.history = checkpoint['history']
        set_rng_state(checkpoint['rng_per_rank'][self.dist.rank] if self.dist.enabled
                      else checkpoint['rng'])
        self.log(f'resumed from {self.path("checkpoint.pth")} at epoch {self.epoch + 1}, '
                 f'step {self.step}')


def new_epoch_stats():
    return {'loss': 0.0, 'correct': 0.0, 'n': 0, 'teacher_updates': 0, 'seconds': 0.0}


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def new_run_dir(args):
    """A new directory in --out_dir, named after the run; race-free under concurrent starts."""
    arch = '' if args.arch == 'preactresnet18' else f'{args.arch}-'
    base = os.path.join(args.out_dir, f'{args.dataset}-{arch}{args.method}-seed{args.seed}-'
                                      f'{time.strftime("%Y%m%d-%H%M%S")}')
    os.makedirs(args.out_dir, exist_ok=True)
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
    f = open(os.path.join(run_dir, 'run.lock'), 'a+')
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


# The files a run writes atomically: a kill during a write leaves '.NAME.XXXXXXXX' behind.
RUN_FILES = ('checkpoint.pth', 'best_model.pth', 'final_model.pth', 'metrics.csv',
             'config.json', 'curves.png')


def remove_leftover_temporaries(run_dir):
    for name in os.listdir(run_dir):
        if any(name.startswith(f'.{f}.') for f in RUN_FILES):
            os.unlink(os.path.join(run_dir, name))


def use_threads_of(checkpoint):
    """Resume with the run's CPU thread count: another count sums in another order (other bits)."""
    threads = checkpoint.get('threads')
    if threads and threads != torch.get_num_threads():
        print(f'using {threads} CPU threads, as the run did (not {torch.get_num_threads()}), '
              'so that it continues bit for bit')
        torch.set_num_threads(threads)


def data_digest(*tensors):
    """SHA-256 of the data's bytes: a resume must see the images the run was trained on."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_world_size(checkpoint, run_dir, world_size):
    """A run resumes with as many processes as it was trained with (1 without torchrun)."""
    saved = checkpoint.get('world_size', 1)
    if saved != world_size:
        def launch(n):
            return f'torchrun --nproc_per_node={n} (or nodes x processes = {n})' if n > 1 \
                else 'python, without torchrun'
        raise InputError(f'--resume {run_dir}: the run was trained by {saved} process(es) and '
                         f'must be resumed by as many ({launch(saved)}), not {world_size}: '
                         'each process\'s share of the batches and its random state are part '
                         'of the checkpoint')


def check_shares(n, batch_size, world_size):
    """Under torchrun every rank needs at least one image of every batch, the last one too."""
    smallest = n % batch_size or batch_size
    if world_size > 1 and smallest < world_size:
        raise InputError(f'a batch of {smallest} training image(s) cannot be shared by '
                         f'{world_size} processes; change --batch-size or --train-examples')


def build_model(arch, dataset, width, device, channels_last):
    """A fresh ``arch`` network for ``dataset`` on ``device``.

    Tiny-ImageNet's models normalise their input as the authors' loader did;
    channels_last is the memory format convolutions run fastest in on CUDA.
    """
    spec = DATASETS[dataset]
    model = build_architecture(arch, spec['num_classes'], width, spec['image_size'],
                               NORMALIZATION.get(dataset)).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def write_metrics(path, rows, fields=METRIC_FIELDS):
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())


def main(dataset, argv=None):
    """Train; under torchrun (WORLD_SIZE > 1) as one process of the group."""
    args, parser = parse_args(dataset, argv)
    dist = None
    try:
        dist = Distributed.from_env(args.device)
        trainer = Trainer(args, parser, dist)
        code = trainer.fit()
    except InputError as e:
        rank = os.environ.get('RANK') if int(os.environ.get('WORLD_SIZE', '1')) > 1 else None
        print(f'{f"[rank {rank}] " if rank is not None else ""}error: {e}', file=sys.stderr)
        code = 2
    except Diverged as e:
        trainer.log(f'error: the run diverged: {e}. {trainer.what_is_kept()}')
        code = 1
    except OSError as e:  # a full disk, a directory removed under the run ...
        print(f'error: {e.filename + ": " if e.filename else ""}{e.strerror or e}; '
              'nothing was left half-written', file=sys.stderr)
        code = 1
    finally:
        if dist is not None:
            dist.close()
    sys.exit(code)
