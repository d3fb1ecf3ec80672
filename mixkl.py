"""MIX-KL: fast adversarial training with Mixup and a geometric temperature-scaled KL loss.

The method of METHOD.md, once, for both datasets. Read it top to
bottom: the loss pieces, one training step, the teacher, the schedules, then
the epoch loop in ``Trainer.fit``. ``MIX_KL_CIFAR10.py`` and ``MIX_KL_CIFAR100.py``
only name the dataset and call ``main``.
"""
import argparse
import contextlib
import copy
import csv
import inspect
import io
import json
import math
import os
import random
import signal
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ddp import Distributed
import plots
from preactresnet import PreActResNet18
from utils import (DATASETS, CifarLoader, HelpFormatter, InputError, atomic_save,
                   atomic_write_text, attack_fgsm, clamp, cudnn_autotuning, enable_fast_cuda,
                   evaluate_batches, load_cifar, nonnegative, number_in_range, pgd_attack,
                   positive_int, resolve_device, safe_torch_load)


# ---------------------------------------------------------------------------
# Loss pieces

def soft_cross_entropy(logits, target):
    """mean_b( -sum_c target[b, c] * log_softmax(logits)[b, c] )"""
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


def geometric_kl(student_logits, teacher_logits, tau):
    """tau^2-scaled KL(teacher || student) between geometric temperature-scaled distributions.

    geo(z) = normalise(softmax(z / tau) ** (1 / tau)), which is softmax(z / tau^2).
    As in the paper, 1e-8 is added to the student's probabilities inside the log.
    """
    t2 = tau ** 2
    log_p_teacher = F.log_softmax(teacher_logits / t2, dim=1)
    p_student = F.softmax(student_logits / t2, dim=1)
    kl = log_p_teacher.exp() * (log_p_teacher - torch.log(p_student + 1e-8))
    return t2 * kl.sum() / len(student_logits)


def consistency_loss(adv_logits, clean_logits, adv_features, start_features, xm, delta):
    """Prediction and feature consistency, divided by the perturbation's size (+ 0.125)."""
    num = (F.mse_loss(F.softmax(adv_logits, 1), F.softmax(clean_logits, 1))
           + F.mse_loss(F.softmax(adv_features, 1), F.softmax(start_features, 1)))
    return num / (F.mse_loss(xm + delta, xm) + 0.125)


# ---------------------------------------------------------------------------
# Building the adversarial example

def mixup(x, y, num_classes, alpha):
    """One Beta(alpha, alpha) coefficient per batch; alpha = 0 turns mixup off (lam = 1)."""
    onehot = F.one_hot(y, num_classes).float()
    if alpha <= 0:
        return x, onehot, 1.0
    lam = float(np.random.beta(alpha, alpha))
    perm = torch.randperm(len(x), device=x.device)
    return lam * x + (1 - lam) * x[perm], lam * onehot + (1 - lam) * onehot[perm], lam


def random_start(xm, epsilon, delta_init='random'):
    """A random-sign corner at half radius, kept inside [0, 1] (METHOD.md step 2)."""
    if delta_init == 'zero':
        return torch.zeros_like(xm)
    u = clamp(torch.empty_like(xm).uniform_(-epsilon, epsilon), -xm, 1 - xm)
    return clamp(epsilon / 2 * u.sign(), -xm, 1 - xm)


def fgsm_step(model, xm, ym, delta0, epsilon, alpha):
    """One signed-gradient step of the soft cross-entropy from delta0.

    Autograd is asked for d loss / d delta only (no parameter gradients). The
    graph is kept: the returned features of this forward still receive
    gradient through the consistency term. Returns (delta, features).
    """
    delta0 = delta0.requires_grad_(True)
    logits0, features0 = model(xm + delta0, return_features=True)
    grad, = torch.autograd.grad(soft_cross_entropy(logits0.float(), ym), delta0,
                                retain_graph=True)
    delta = (delta0.detach() + alpha * grad.sign()).clamp(-epsilon, epsilon)
    return clamp(delta, -xm, 1 - xm), features0


# ---------------------------------------------------------------------------
# The teacher

class ConditionalEMA:
    """MIX-KL's teacher ("auto weight averaging").

    An average of the student, updated only on steps where the student's
    adversarial accuracy falls below ``threshold`` times its clean accuracy.
    Floating-point parameters and buffers are averaged; integer buffers (BN's
    batch counter) are copied.
    """

    def __init__(self, student, threshold):
        self.model = copy.deepcopy(student).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.threshold = threshold
        self.updates = 0

    def wants_update(self, clean_correct, adv_correct):
        return adv_correct / (clean_correct + 1e-8) < self.threshold

    def decay(self):
        return min(0.999, (self.updates + 1) / (self.updates + 10))

    @torch.no_grad()
    def update(self, student):
        decay = self.decay()
        teacher_state, student_state = self.model.state_dict(), student.state_dict()
        averaged = [k for k, v in teacher_state.items() if v.is_floating_point()]
        copied = [k for k in teacher_state if k not in averaged]
        teacher_floats = [teacher_state[k] for k in averaged]
        torch._foreach_mul_(teacher_floats, decay)
        torch._foreach_add_(teacher_floats, [student_state[k] for k in averaged], alpha=1 - decay)
        for k in copied:
            teacher_state[k].copy_(student_state[k])
        self.updates += 1


# ---------------------------------------------------------------------------
# Schedules

def temperature(epoch, tau0, gamma, schedule='geometric'):
    return tau0 * gamma ** epoch if schedule == 'geometric' else tau0


def kl_weight(tau, tau0, lambda_kl_base):
    return lambda_kl_base * (tau / tau0) ** 2


def lr_factor(iteration, total_iterations, schedule):
    """Learning rate at ``iteration`` (0-based), as a fraction of --lr-max."""
    if schedule == 'cyclic':
        return 1 - abs(2 * iteration / total_iterations - 1)
    milestones = (math.floor(total_iterations * 99 / 110), math.floor(total_iterations * 104 / 110))
    return 0.1 ** sum(iteration >= m for m in milestones)


# ---------------------------------------------------------------------------
# One training step, up to the loss

def mixkl_student_calls(student, xm, ym, delta0, epsilon, alpha):
    """Every student call of a MIX-KL step (METHOD.md steps 3-4), in order."""
    delta, features0 = fgsm_step(student, xm, ym, delta0, epsilon, alpha)
    adv_logits, adv_features = student(xm + delta, return_features=True)
    clean_logits = student(xm)
    return delta, features0, adv_logits, adv_features, clean_logits


class StudentPass(nn.Module):
    """All student calls of one training step as a single forward: what DDP wraps.

    DistributedDataParallel expects one forward of the wrapped module per
    backward. A MIX-KL step calls the student three times and takes an input
    gradient (``torch.autograd.grad`` w.r.t. the perturbation only, which runs
    no parameter hook) in between. Run inside one forward of this module, DDP
    sees one forward, and its gradient all-reduce runs once, in loss.backward().
    ``calls(student, *inputs)`` is ``mixkl_student_calls`` or
    ``fgsm_rs_student_calls``. Without torchrun the trainer calls those directly.
    """

    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, calls, *inputs):
        return calls(self.student, *inputs)


def _run_student(student_pass, student, calls, *inputs):
    return student_pass(calls, *inputs) if student_pass is not None else calls(student, *inputs)


def mixkl_loss(args, student, teacher, x, y, tau, w_kl, num_classes, student_pass=None):
    """METHOD.md steps 1-5. Returns (loss, clean logits, adversarial logits).

    ``student_pass``: a DDP-wrapped ``StudentPass(student)`` under torchrun, else None.
    """
    epsilon, alpha = args.epsilon / 255, args.alpha / 255
    xm, ym, _ = mixup(x, y, num_classes, args.mixup_alpha)
    delta0 = random_start(xm, epsilon, args.delta_init)
    with autocast(args, x.device):
        delta, features0, adv_logits, adv_features, clean_logits = _run_student(
            student_pass, student, mixkl_student_calls, xm, ym, delta0, epsilon, alpha)
        if w_kl:
            with torch.no_grad():
                teacher_logits = teacher.model(xm + delta).float()
    adv_logits, clean_logits = adv_logits.float(), clean_logits.float()
    loss = soft_cross_entropy(adv_logits, ym)
    if args.lamda:
        loss = loss + args.lamda * consistency_loss(
            adv_logits, clean_logits, adv_features.float(), features0.float(), xm, delta)
    if w_kl:
        loss = loss + w_kl * geometric_kl(adv_logits, teacher_logits, tau)
    return loss, clean_logits, adv_logits


def fgsm_rs_student_calls(student, x, y, delta, epsilon, alpha):
    """The FGSM step from ``delta`` and the adversarial forward; returns the logits."""
    start_loss = F.cross_entropy(student(x + delta).float(), y)
    grad, = torch.autograd.grad(start_loss, delta)
    delta = (delta.detach() + alpha * grad.sign()).clamp(-epsilon, epsilon)
    delta = clamp(delta, -x, 1 - x)
    return student(x + delta).float()


def fgsm_rs_loss(args, student, x, y, student_pass=None):
    """Wong et al. 2020: one FGSM step from a uniform start, cross-entropy on the true labels."""
    epsilon, alpha = args.epsilon / 255, args.alpha / 255
    delta = clamp(torch.empty_like(x).uniform_(-epsilon, epsilon), -x, 1 - x)
    delta.requires_grad_(True)
    with autocast(args, x.device):
        adv_logits = _run_student(student_pass, student, fgsm_rs_student_calls,
                                  x, y, delta, epsilon, alpha)
    return F.cross_entropy(adv_logits, y), None, adv_logits


def autocast(args, device):
    """bf16 autocast for the training forwards, with --amp (Trainer resolves its default)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(args.amp))


def amp_default(device):
    """--amp when neither --amp nor --no-amp is given: on for CUDA, off on CPU.

    ``device`` is a torch.device or its text (config.json's device_used).
    """
    return str(device).startswith('cuda')


# ---------------------------------------------------------------------------
# Command line

DEFAULT_ALPHA = {'mixkl': 8.0, 'fgsm_rs': 10.0}
# Flags that may change when a run is resumed; every other one must match the run.
RESUME_MAY_CHANGE = {'resume', 'device', 'data_dir', 'out_dir', 'amp'}


def build_parser(dataset):
    name = DATASETS[dataset]['name']
    p = argparse.ArgumentParser(
        description=f'Train PreActResNet-18 on {name} with MIX-KL (or a baseline).',
        formatter_class=HelpFormatter)
    io = p.add_argument_group('data and output')
    io.add_argument('--data-dir', '--data_dir', dest='data_dir', default=f'{dataset}-data',
                    help='folder holding (or receiving) the python-pickle CIFAR files')
    io.add_argument('--out_dir', '--out-dir', dest='out_dir', default='./output/',
                    help='a run directory is created inside it')
    io.add_argument('--resume', help='run directory (or its checkpoint.pth) to continue')
    io.add_argument('--train-examples', type=positive_int, help='use only the first N training images')
    io.add_argument('--eval-examples', type=positive_int, help='use only the first N test images')

    m = p.add_argument_group('method (defaults: METHOD.md)')
    m.add_argument('--method', choices=['mixkl', 'fgsm_rs'], default='mixkl',
                   help='fgsm_rs: FGSM with uniform random start (Wong et al. 2020), no teacher')
    m.add_argument('--epochs', type=positive_int, default=110)
    m.add_argument('--batch-size', type=positive_int, default=128)
    m.add_argument('--lr-schedule', choices=['multistep', 'cyclic'], default='multistep')
    m.add_argument('--lr-max', type=number_in_range(float, 0, low_open=True), default=0.1)
    m.add_argument('--momentum', type=number_in_range(float, 0, 1), default=0.9)
    m.add_argument('--weight-decay', type=nonnegative, default=5e-4)
    m.add_argument('--epsilon', type=nonnegative, default=8.0, help='L-inf radius, in /255')
    m.add_argument('--alpha', type=nonnegative, default=None,
                   help='FGSM step, in /255 (default 8 for mixkl, 10 for fgsm_rs)')
    m.add_argument('--delta-init', choices=['random', 'zero'], default='random',
                   help='zero: start the FGSM step at the mixed image itself')
    m.add_argument('--mixup-alpha', type=nonnegative, default=0.4, help='0 turns mixup off')
    m.add_argument('--lamda', type=nonnegative, default=12.0,
                   help='weight of the consistency term (0 turns it off)')
    m.add_argument('--tau0', type=number_in_range(float, 0, low_open=True), default=2.0)
    m.add_argument('--gamma', type=number_in_range(float, 0, low_open=True), default=0.99,
                   help='temperature decay per epoch')
    m.add_argument('--tau-schedule', choices=['geometric', 'constant'], default='geometric')
    m.add_argument('--lambda-kl-base', type=nonnegative, default=1.0,
                   help='weight of the KL term at tau0 (0 turns it off)')
    m.add_argument('--ema-value', type=number_in_range(float, 0, 1, low_open=True), default=0.82,
                   help='teacher update when adv/clean accuracy of the batch is below this')

    e = p.add_argument_group('per-epoch evaluation')
    e.add_argument('--pgd-iters', type=positive_int, default=10)
    e.add_argument('--pgd-alpha', type=nonnegative, default=2.0, help='PGD step, in /255')
    e.add_argument('--eval-batch-size', type=positive_int, default=512)
    e.add_argument('--alarm-examples', type=positive_int, default=512,
                   help='training images watched for catastrophic overfitting')

    r = p.add_argument_group('machine')
    r.add_argument('--seed', type=int, default=0)
    r.add_argument('--width', type=positive_int, default=64, help='PreActResNet-18 base width')
    r.add_argument('--device', help='cuda, cuda:1, cpu ... (default: cuda when present)')
    r.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                   help='bf16 autocast in the training forwards; evaluation stays fp32 '
                        '(default: on for CUDA, off on CPU, where it is fast only with '
                        'AVX512-BF16 or AMX)')
    r.add_argument('--sync-bn', action='store_true',
                   help='under torchrun: batch-norm statistics over the global batch '
                        '(SyncBatchNorm, CUDA only) instead of per process')
    return p


def parse_args(dataset, argv=None):
    parser = build_parser(dataset)
    args = parser.parse_args(argv)
    if args.alpha is None and not args.resume:  # a resumed run keeps its own step size
        args.alpha = DEFAULT_ALPHA[args.method]
    try:
        torch.device(args.device or 'cpu')
    except RuntimeError as e:
        parser.error(f'--device: {e}')
    args.dataset = dataset
    return args, parser


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
    saved = checkpoint['args']
    if saved['dataset'] != args.dataset:
        script = 'MIX_KL_CIFAR10.py' if saved['dataset'] == 'cifar10' else 'MIX_KL_CIFAR100.py'
        raise InputError(f'--resume {path}: that is a {DATASETS[saved["dataset"]]["name"]} run; '
                         f'resume it with {script}')
    merged = dict(saved)
    for key, value in vars(args).items():
        default = parser.get_default(key)
        if key in ('device', 'resume'):
            merged[key] = value
        elif key in RESUME_MAY_CHANGE:
            merged[key] = saved[key] if value == default else value
        elif value != default and value != saved.get(key):
            flag = '--' + key.replace('_', '-')
            raise InputError(f'--resume {path}: the run was trained with {flag} {saved.get(key)}, '
                             f'not {value}')
    return argparse.Namespace(**merged), checkpoint, os.path.dirname(os.path.abspath(path))


class NonFiniteLoss(Exception):
    pass


class StopSignal:
    """Turns SIGINT/SIGTERM into a request to stop at the next step boundary.

    A second signal stops at once (KeyboardInterrupt), without a checkpoint.
    """

    def __init__(self):
        self.signum = None
        self._previous = {}

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
        print(f'\n{signal.Signals(signum).name}: saving a checkpoint after this step '
              '(signal again to quit without one)', file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# The run

class Trainer:
    """One training run: data, models, optimiser, run directory, the epoch loop."""

    def __init__(self, args, parser, dist=None):
        # Under torchrun ``dist`` is this process's Distributed (ddp.py); without
        # it everything below is the single-process run.
        self.dist = dist if dist is not None else Distributed()
        checkpoint = None
        if args.resume:
            args, checkpoint, self.run_dir = read_resume_checkpoint(args, parser)
            check_world_size(checkpoint, self.run_dir, self.dist.world_size)
        self.args = args
        self.device = self.dist.device if self.dist.enabled else resolve_device(args.device)
        if self.device.type == 'cuda':
            enable_fast_cuda()
        if args.amp is None:
            args.amp = amp_default(self.device)
        if args.sync_bn and not self.dist.enabled:
            raise InputError('--sync-bn synchronises BatchNorm across torchrun processes; '
                             'this run has one process')
        if args.sync_bn and self.device.type != 'cuda':
            raise InputError('--sync-bn needs CUDA (SyncBatchNorm has no CPU implementation)')
        check_writable(args.out_dir if checkpoint is None else self.run_dir)
        # Rank r draws its own mixup and random starts: seed + r (rank 0: the single-process seed).
        seed_everything(args.seed + self.dist.rank)
        self.num_classes = DATASETS[args.dataset]['num_classes']
        self._load_data()
        if checkpoint is None:
            self.run_dir = self.dist.broadcast_object(new_run_dir(args) if self.dist.is_main
                                                      else None)
        self._build_models()
        self.epoch, self.step, self.stats = 0, 0, new_epoch_stats()
        self.history, self.best_pgd = [], -1.0
        self._stop_agreed = False  # under torchrun: a stop requested on any rank (see _record_step)
        if checkpoint is not None:
            self._restore(checkpoint)
        elif self.dist.is_main:
            atomic_write_text(self.path('config.json'), json.dumps(self.config(), indent=2))

    def path(self, name):
        return os.path.join(self.run_dir, name)

    def log(self, message):
        if not self.dist.is_main:
            return
        print(message, flush=True)
        with open(self.path('train.log'), 'a') as f:
            f.write(f'[{time.strftime("%Y-%m-%d %H:%M:%S")}] {message}\n')

    def config(self):
        return {**vars(self.args), 'device_used': str(self.device), 'torch': torch.__version__,
                'world_size': self.dist.world_size,
                'command': ' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:])}

    def _load_data(self):
        a = self.args
        # Under torchrun rank 0 reads (and, if need be, downloads) the data first, alone.
        if not self.dist.is_main:
            self.dist.barrier()
        quiet = not self.dist.is_main
        x_train, y_train = load_cifar(a.dataset, a.data_dir, train=True, quiet=quiet)
        x_test, y_test = load_cifar(a.dataset, a.data_dir, train=False, quiet=quiet)
        if self.dist.is_main:
            self.dist.barrier()
        x_train, y_train = x_train[:a.train_examples], y_train[:a.train_examples]
        x_test, y_test = x_test[:a.eval_examples], y_test[:a.eval_examples]
        self.train_loader = CifarLoader(x_train, y_train, a.batch_size, self.device, train=True,
                                        seed=a.seed, rank=self.dist.rank,
                                        world_size=self.dist.world_size)
        check_shares(len(y_train), a.batch_size, self.dist.world_size)
        self.test_loader = CifarLoader(x_test, y_test, a.eval_batch_size, self.device, train=False)
        n = a.alarm_examples
        self.alarm_batch = (x_train[:n].to(self.device).float() / 255, y_train[:n].to(self.device))

    def _build_models(self):
        a = self.args
        self.student = PreActResNet18(self.num_classes, a.width).to(self.device)
        if self.device.type == 'cuda':
            self.student = self.student.to(memory_format=torch.channels_last)
        # Under torchrun every rank starts from rank 0's initialisation (the single-process one).
        self.dist.broadcast_(list(self.student.state_dict().values()))
        self.teacher = ConditionalEMA(self.student, a.ema_value) if a.method == 'mixkl' else None
        self.student_pass = None
        if self.dist.enabled:
            if a.sync_bn:
                self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
            self.student_pass = wrap_ddp(StudentPass(self.student), self.device)
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr=a.lr_max,
                                         momentum=a.momentum, weight_decay=a.weight_decay)
        total = a.epochs * len(self.train_loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: lr_factor(it, total, a.lr_schedule))

    @property
    def eval_model(self):
        """The model evaluated and saved: the teacher for MIX-KL, else the student."""
        return self.teacher.model if self.teacher is not None else self.student

    # -- the loop ----------------------------------------------------------

    def fit(self):
        a = self.args
        self.log(f'run directory: {self.run_dir}')
        self.log(f'{a.method} on {a.dataset}: {len(self.train_loader.labels)} training images, '
                 f'{len(self.test_loader.labels)} test images, device {self.device}, '
                 f'epochs {self.epoch + 1}..{a.epochs}')
        with StopSignal() as stop:
            for epoch in range(self.epoch, a.epochs):
                if not self.train_epoch(epoch, stop):
                    self.save_checkpoint()
                    script = os.path.basename(sys.argv[0]) or 'the training script'
                    launcher = (f'torchrun --nproc_per_node={self.dist.world_size}'
                                if self.dist.enabled else 'python')
                    self.log(f'stopped at epoch {epoch + 1}, step {self.step}; checkpoint saved. '
                             f'Resume with: {launcher} {script} --resume {self.run_dir}')
                    # Exit together: torchrun stops the others when one process exits non-zero.
                    self.dist.barrier()
                    # Under torchrun a rank that got no signal stops because another did.
                    return 128 + (stop.signum or signal.SIGTERM)
                self.end_epoch(epoch)
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
        self.log(f'done: best test PGD accuracy {self.best_pgd:.4f}; '
                 f'best_model.pth and final_model.pth in {self.run_dir}')
        return 0

    def train_epoch(self, epoch, stop):
        """Train from self.step to the end of the epoch; False if a stop was requested."""
        a = self.args
        tau = temperature(epoch, a.tau0, a.gamma, a.tau_schedule)
        w_kl = kl_weight(tau, a.tau0, a.lambda_kl_base)
        self.student.train()
        start = time.time()
        batches = tqdm(self.train_loader.batches(epoch, self.step), total=len(self.train_loader),
                       initial=self.step, desc=f'epoch {epoch + 1}/{a.epochs}', leave=False,
                       disable=not self.dist.is_main)
        for x, y in batches:
            # Under torchrun only the stop agreed by all ranks counts (same step everywhere).
            if (self._stop_agreed if self.dist.enabled else stop.signum is not None):
                self.stats['seconds'] += time.time() - start
                return False
            if self.teacher is not None:
                loss, clean_logits, adv_logits = mixkl_loss(
                    a, self.student, self.teacher, x, y, tau, w_kl, self.num_classes,
                    self.student_pass)
            else:
                loss, clean_logits, adv_logits = fgsm_rs_loss(a, self.student, x, y,
                                                              self.student_pass)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # under torchrun: DDP averages the gradients over the ranks here
            self.optimizer.step()
            self.scheduler.step()
            # BN running statistics differ per rank (own batches): use rank 0's everywhere,
            # so that the teacher, which averages them, stays identical on all ranks.
            self.dist.broadcast_(list(self.student.buffers()))
            self._record_step(epoch, loss, clean_logits, adv_logits, y, stop)
            batches.set_postfix(loss=f'{self.stats["loss"] / self.stats["n"]:.3f}')
        self.stats['seconds'] += time.time() - start
        return True

    def _record_step(self, epoch, loss, clean_logits, adv_logits, y, stop=None):
        """One host sync per step: the loss check, the teacher decision and the epoch stats.

        Under torchrun the numbers are summed over the ranks first (one all-reduce),
        so every rank sees the global batch's counts and takes the same teacher
        decision, and the ranks agree on a stop requested on any of them.
        """
        counts = [loss.detach(), (adv_logits.argmax(1) == y).sum()]
        if clean_logits is not None:
            counts.append((clean_logits.argmax(1) == y).sum())
        values = torch.stack([c.float() for c in counts])
        n = len(y)
        if self.dist.enabled:
            stopping = stop is not None and stop.signum is not None
            values = self.dist.all_sum(torch.cat([values[:1] * n, values[1:],
                                                  values.new_tensor([n, stopping])]))
            *values, n, stops = values.tolist()
            values[0], n, self._stop_agreed = values[0] / n, int(n), stops > 0
        else:
            values = values.tolist()
        if not math.isfinite(values[0]):
            raise NonFiniteLoss(f'non-finite loss ({values[0]}) at epoch {epoch + 1}, '
                                f'step {self.step + 1}')
        if self.teacher is not None and self.teacher.wants_update(values[2], values[1]):
            self.teacher.update(self.student)
            self.stats['teacher_updates'] += 1
        self.stats['loss'] += values[0] * n
        self.stats['correct'] += values[1]
        self.stats['n'] += n
        self.step += 1

    def end_epoch(self, epoch):
        """Evaluate, record the epoch, save best model, checkpoint and metrics."""
        a = self.args
        start = time.time()
        # Under torchrun the ranks split the test batches and sum the counts; the
        # attacks' random starts then come from (seed, epoch, batch), not the ranks' RNGs.
        with cudnn_autotuning(False):  # PGD's batches shrink as it breaks examples
            clean, pgd = evaluate_robustness(
                self.eval_model, self.test_loader.batches(), a.epsilon / 255, a.pgd_alpha / 255,
                a.pgd_iters, dist=self.dist,
                seed=a.seed * 100003 + epoch if self.dist.enabled else None)
            alarm_fgsm, alarm_pgd = self._alarm_accuracies()
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
        self.history.append(row)
        if pgd > self.best_pgd:
            self.best_pgd = pgd
            if self.dist.is_main:
                atomic_save(self.eval_model.state_dict(), self.path('best_model.pth'))
        self.epoch, self.step, self.stats = epoch + 1, 0, new_epoch_stats()
        self.save_checkpoint()
        if self.dist.is_main:
            write_metrics(self.path('metrics.csv'), self.history)
        self.log(f'epoch {epoch + 1}/{a.epochs}  {row["seconds"]:.1f}s+{row["eval_seconds"]:.1f}s  '
                 f'lr {row["lr"]:.4g}  loss {row["train_loss"]:.4f}  train acc {row["train_acc"]:.4f}  '
                 f'tau {tau:.4f}  teacher updates {row["teacher_updates"]}  '
                 f'test clean {clean:.4f}  PGD-{a.pgd_iters} {pgd:.4f}')
        if overfitting_alarm([r['alarm_fgsm_acc'] for r in self.history],
                             [r['alarm_pgd_acc'] for r in self.history]):
            self.log(f'WARNING: catastrophic overfitting? On {len(self.alarm_batch[1])} training '
                     f'images PGD accuracy fell to {alarm_pgd:.4f} (best '
                     f'{max(r["alarm_pgd_acc"] for r in self.history):.4f}) while FGSM accuracy '
                     f'is {alarm_fgsm:.4f}')

    def _alarm_accuracies(self):
        """FGSM and PGD accuracy of the student on a fixed batch of training images.

        Under torchrun each rank takes a contiguous part of the batch and the counts are summed.
        """
        a = self.args
        x, y = self.alarm_batch
        eps = a.epsilon / 255
        if self.dist.enabled:
            part = torch.arange(len(y), device=y.device).tensor_split(self.dist.world_size)
            x, y = x[part[self.dist.rank]], y[part[self.dist.rank]]
        fgsm = pgd = 0
        if len(y):
            fgsm, _ = evaluate_batches(self.student, [(x, y)],
                                       lambda m, X, Y: attack_fgsm(m, X, Y, eps))
            pgd, _ = evaluate_batches(self.student, [(x, y)],
                                      pgd_attack(eps, a.pgd_alpha / 255, a.pgd_iters, 1))
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


def evaluate_robustness(model, batches, epsilon, alpha, attack_iters, dist=None, seed=None):
    """Clean and PGD accuracy (one restart) of ``model`` on the same batches.

    With ``dist`` (torchrun, world size N) rank r evaluates batches r, r + N, ...
    and the counts are summed over the ranks. With ``seed`` each batch's random
    starts come from a generator seeded by (seed, batch index), leaving the
    global RNG as it was: the result then does not depend on the number of
    processes. Without either, this is the single-process evaluation.
    """
    rank, world_size = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    clean = robust = total = 0
    for i, (X, y) in enumerate(batches):
        if i % world_size != rank:
            continue
        with batch_rng(seed, i, X.device):
            c, n = evaluate_batches(model, [(X, y)])
            r, _ = evaluate_batches(model, [(X, y)], pgd_attack(epsilon, alpha, attack_iters, 1))
        clean, robust, total = clean + c, robust + r, total + n
    if dist is not None:
        clean, robust, total = dist.all_sum([clean, robust, total])
    return clean / total, robust / total


def batch_rng(seed, index, device):
    """Global RNGs seeded by (seed, index) inside, restored on exit; nothing when seed is None."""
    if seed is None:
        return contextlib.nullcontext()
    return _seeded_rng(hash((seed, index)) & 0x7fffffffffffffff, device)


@contextlib.contextmanager
def _seeded_rng(seed, device):
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        torch.manual_seed(seed)
        yield


def new_epoch_stats():
    return {'loss': 0.0, 'correct': 0.0, 'n': 0, 'teacher_updates': 0, 'seconds': 0.0}


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_writable(directory):
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise InputError(f'cannot write to {directory}: {e.strerror or e}')


def new_run_dir(args):
    base = os.path.join(args.out_dir, f'{args.dataset}-{args.method}-seed{args.seed}-'
                                      f'{time.strftime("%Y%m%d-%H%M%S")}')
    run_dir, n = base, 1
    while os.path.exists(run_dir):
        run_dir, n = f'{base}-{n}', n + 1
    os.makedirs(run_dir)
    return os.path.abspath(run_dir)


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


def wrap_ddp(module, device):
    """PyTorch's DistributedDataParallel around ``module`` (a StudentPass).

    Buffers are not broadcast at each forward: train_epoch broadcasts the BN
    buffers after every step instead, before the teacher reads them.
    """
    # torch 2.13 renamed broadcast_buffers to forward_sync_buffers; requirements admit both.
    params = inspect.signature(DistributedDataParallel).parameters
    no_forward_sync = {'forward_sync_buffers': False} if 'forward_sync_buffers' in params \
        else {'broadcast_buffers': False}
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == 'cuda'
                                   else None, **no_forward_sync)


def write_metrics(path, rows):
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=METRIC_FIELDS)
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
    except NonFiniteLoss as e:
        trainer.log(f'error: {e}; stopping. The last good checkpoint is kept in {trainer.run_dir}')
        code = 1
    finally:
        if dist is not None:
            dist.close()
    sys.exit(code)
