"""The training run around mixkl.py's step: flags, epochs, per-epoch evaluation, checkpoints.

``MIX_KL_CIFAR10.py`` and ``MIX_KL_CIFAR100.py`` name the dataset and call
``main``. ``Trainer.fit`` runs the epochs; ``Trainer.train_epoch`` calls the
method's step (mixkl.STEPS) on every batch; ``Trainer.end_epoch`` evaluates the
teacher, writes the metrics and a resumable checkpoint. Under torchrun, ddp.py
wraps the student and the teacher; the step is the same.
"""
import contextlib
import hashlib
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import plots
import runs
from checks import overfitting_warning
from cli import (cuda_default, enable_fast_cuda, failed_write, print_error, resolve_device,
                 start_script)
from ddp import Distributed, SyncedTeacher, wrap_ddp
from mixkl import (STEPS, ConditionalEMA, Hyperparameters, kl_weight, lr_factor, momentum_at,
                   temperature)
from flags import parse_args, resumed_args
from models import NORMALIZATION
from progress import progress
from models import build_model as build_architecture
from data import load_dataset
from files import append_text
from utils import (DATASETS, WEIGHT_LIMIT, CifarLoader, InputError, NonFiniteLogits, atomic_save,
                   attack_backend, attack_fgsm, check_writable_dir, evaluate_batches,
                   evaluate_robustness, one_line, pgd_attack, safe_torch_load)


# ---------------------------------------------------------------------------
# Flags (flags.py) to the step's settings

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
# Resumable state

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
    """Load the checkpoint named by --resume and merge the run's flags into ``args``.

    Returns (args, checkpoint, run directory). A checkpoint whose weights are not
    finite (or beyond WEIGHT_LIMIT) is refused here, before any step.
    """
    path = args.resume
    if os.path.isdir(path):
        path = os.path.join(path, runs.CHECKPOINT)
    if not os.path.isfile(path):
        raise InputError(f'--resume {args.resume}: no resumable checkpoint at {path}')
    checkpoint = runs.read_checkpoint(path)
    merged = resumed_args(args, parser.given_flags, checkpoint['args'], path)
    bad = tensors_diverged({name: checkpoint.get(name) for name in ('student', 'teacher')})
    if bad is not None:
        raise InputError(f'--resume {path}: {bad} is not finite or beyond {WEIGHT_LIMIT:g}; '
                         'this checkpoint cannot be trained on')
    return merged, checkpoint, os.path.dirname(os.path.abspath(path))


class Diverged(Exception):
    """The run diverged: a non-finite loss, or a weight that is not finite or beyond WEIGHT_LIMIT."""


# WEIGHT_LIMIT (utils.py): a float parameter or buffer beyond it in absolute value counts
# as diverged; evaluation refuses such a checkpoint too.

def weights_diverged(models):
    """'student conv1.weight' (the first float tensor not finite or beyond WEIGHT_LIMIT), or None.

    One fused max-abs per model and one host sync for all of them (this runs after
    every step); the tensors are named only when one is bad.
    """
    return tensors_diverged({name: model.state_dict() for name, model in models.items()})


def tensors_diverged(state_dicts):
    """``weights_diverged`` for {name: state_dict or None}."""
    states = {name: {k: v for k, v in state.items()
                     if isinstance(v, torch.Tensor) and v.is_floating_point()}
              for name, state in state_dicts.items() if isinstance(state, dict)}
    states = {name: state for name, state in states.items() if state}
    if not states:
        return None
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
                self._lock = runs.lock_run_dir(self.run_dir)
                runs.remove_leftover_temporaries(self.run_dir)
            runs.check_checkpoint_matches_config(self.run_dir, checkpoint)
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
            self.run_dir = self.dist.broadcast_object(
                runs.new_run_dir(args.out_dir, args.dataset, args.arch, args.method, args.seed)
                if self.dist.is_main else None)
            if self.dist.is_main:
                self._lock = runs.lock_run_dir(self.run_dir)
        self._build_models()
        self.epoch, self.step, self.stats = 0, 0, new_epoch_stats()
        self.history, self.best_pgd = [], -1.0
        self._stop_agreed = False  # under torchrun: a stop requested on any rank (see _record)
        if checkpoint is not None:
            self._restore(checkpoint)
        elif self.dist.is_main:
            runs.write_config(self.run_dir, self.config())

    def what_is_kept(self):
        """After a divergence, which files are left, in words: those from before it whose
        weights are finite (a file that was deleted or holds bad values is not named)."""
        kept = [n for n in (runs.CHECKPOINT, runs.BEST) if self._usable(n)]
        if not kept:
            return f'Nothing was saved in {self.run_dir} before it diverged.'
        return f'Kept in {self.run_dir}, from before it diverged: {", ".join(kept)}.'

    def evaluated_split(self):
        """What the per-epoch evaluation sees: 'test', 'val' (Tiny-ImageNet's labelled
        val/ folder), or 'validation' (the images --val-examples holds out)."""
        if self.args.val_examples:
            return 'validation'
        return DATASETS[self.args.dataset].get('test_split', 'test')

    def _usable(self, name):
        """The run directory's file ``name`` exists and its weights are finite."""
        try:
            saved = safe_torch_load(self.path(name))
        except InputError:
            return False
        state = {'checkpoint': saved.get('student'), 'teacher': saved.get('teacher')} \
            if name == runs.CHECKPOINT else {'model': saved}
        return tensors_diverged(state) is None

    def path(self, name):
        return os.path.join(self.run_dir, name)

    def log(self, message):
        if not self.dist.is_main:
            return
        print(message, flush=True)
        append_text(self.path(runs.LOG), f'[{time.strftime("%Y-%m-%d %H:%M:%S")}] {message}\n')

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
            plots.plot_curves(self.history, self.path(runs.CURVES), a.method, a.epsilon,
                              a.pgd_iters)
            # Written last: a run directory with final_model.pth is a finished run.
            atomic_save(self.eval_model.state_dict(), self.path(runs.FINAL))
        # Leave together: a rank that tears down its process group while rank 0 is still
        # writing can abort gloo's connection threads.
        self.dist.barrier()
        if self.dist.enabled:
            models = 'the student and the teacher were' if self.teacher is not None \
                else 'the student was'
            self.log(f'{models} bitwise identical on all {self.dist.world_size} processes '
                     'after every epoch')
        saved = ' and '.join(n for n in (runs.BEST, runs.FINAL) if os.path.exists(self.path(n)))
        self.log(f'done: best {self.evaluated_split()} PGD accuracy {self.best_pgd:.4f}; '
                 f'{saved} in {self.run_dir}')
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
        batches = progress(self.train_loader.batches(epoch, self.step),
                           total=len(self.train_loader), initial=self.step, unit='steps',
                           desc=f'epoch {epoch + 1}/{self.args.epochs}', leave=False,
                           disable=not self.dist.is_main)
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
                    attack_backend():  # fp32 exactly; PGD's batches shrink as it breaks examples
                clean, pgd = evaluate_robustness(
                    self.eval_model, self.eval_loader.batches(), self.hp.epsilon,
                    self.pgd_alpha, a.pgd_iters, dist=self.dist,
                    seed=a.seed * 100003 + epoch if self.dist.enabled else None)
                alarm_fgsm, alarm_pgd = self._alarm_accuracies()
        except Interrupted:
            set_rng_state(before)
            self.student.train()
            return False
        except NonFiniteLogits as e:  # finite weights, logits past float range: diverged too
            raise Diverged(f'{e} (the evaluation after epoch {epoch + 1})')
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
        row = dict(zip(runs.metric_fields(a.val_examples), row.values()))
        self.history.append(row)
        if pgd > self.best_pgd:
            self.best_pgd = pgd
            if self.dist.is_main:
                atomic_save(self.eval_model.state_dict(), self.path(runs.BEST))
        self.epoch, self.step, self.stats = epoch + 1, 0, new_epoch_stats()
        self.save_checkpoint()
        if self.dist.is_main:
            runs.write_metrics(self.path(runs.METRICS), self.history,
                               runs.metric_fields(a.val_examples))
        self.log(f'epoch {epoch + 1}/{a.epochs}  {row["seconds"]:.1f}s+{row["eval_seconds"]:.1f}s  '
                 f'lr {row["lr"]:.4g}  loss {row["train_loss"]:.4f}  train acc {row["train_acc"]:.4f}  '
                 f'tau {tau:.4f}  teacher updates {row["teacher_updates"]}  '
                 f'{split} clean {clean:.4f}  PGD-{a.pgd_iters} {pgd:.4f}')
        if runs.overfitting_alarm([r['alarm_fgsm_acc'] for r in self.history],
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
            'args': vars(self.args),
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
        runs.save_checkpoint(self.run_dir, checkpoint)

    def _restore(self, checkpoint):
        """Continue from ``checkpoint`` (runs.read_checkpoint checked its fields' kinds); one
        whose tensors or states do not fit these models and optimiser is an InputError."""
        try:
            self._load_states(checkpoint)
        except (AttributeError, KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise InputError(f'--resume {self.path(runs.CHECKPOINT)}: cannot be resumed '
                             f'({one_line(e, 200)})') from None
        self.log(f'resumed from {self.path(runs.CHECKPOINT)} at epoch {self.epoch + 1}, '
                 f'step {self.step}')

    def _load_states(self, checkpoint):
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


def new_epoch_stats():
    return {'loss': 0.0, 'correct': 0.0, 'n': 0, 'teacher_updates': 0, 'seconds': 0.0}


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def main(dataset, argv=None):
    """Train; under torchrun (WORLD_SIZE > 1) as one process of the group."""
    start_script()
    args, parser = parse_args(dataset, argv)
    dist = None
    try:
        dist = Distributed.from_env(args.device)
        trainer = Trainer(args, parser, dist)
        code = trainer.fit()
    except InputError as e:
        rank = os.environ.get('RANK') if int(os.environ.get('WORLD_SIZE', '1')) > 1 else None
        print_error(e, f'[rank {rank}] ' if rank is not None else '')
        code = 2
    except Diverged as e:
        trainer.log(f'error: the run diverged: {e}. {trainer.what_is_kept()}')
        code = 1
    except OSError as e:  # a full disk, a directory removed under the run ...
        code = failed_write(e)
    finally:
        if dist is not None:
            dist.close()
    sys.exit(code)
