"""How fast is a MIX-KL training step here, against a reference-style step?

Both training paths run in one process, on the same synthetic files in the CIFAR
python-pickle layout (synthetic.write_synthetic_cifar), from the same initial
weights, taking their steps in turn:

- project path: what the trainer does per step. CifarLoader batches (uint8 data
  kept on the device, batched crop/flip), then mixkl.mixkl_step (bf16 autocast as
  training has it: on for CUDA, off on CPU, or as --amp / --no-amp say; on CUDA a
  channels_last model, cuDNN autotuning and TF32; FGSM gradient w.r.t. delta
  only; one host sync; the conditional teacher update).
- reference path: the same step, but the data goes through torchvision's CIFAR
  dataset, PIL transforms and a DataLoader, everything runs in fp32, and the FGSM
  step calls loss.backward(), which also computes every parameter's gradient only
  for zero_grad to throw it away.

Then PGD-10 evaluation (utils.evaluate_batches with utils.pgd_attack) of
--eval-images test images, and a projection to a 110-epoch CIFAR-10 run.
``--check`` runs bf16_check.py instead: does bf16 autocast change what is learnt?

    python benchmark.py                                   # on the GPU, defaults
    python benchmark.py --device cpu --steps 3 --warmup 1 --eval-images 128
    python benchmark.py --check                           # = python bf16_check.py
"""
import argparse
import contextlib
import itertools
import math
import resource
import shlex
import sys
import tempfile
import time
from types import SimpleNamespace

import torch
from torchvision import datasets as tv_datasets
from torchvision import transforms

import bf16_check
import mixkl
import training
from cli import (MAX_SYNTHETIC_IMAGES, HelpFormatter, backend_switches_kept, cuda_default,
                 device_flag, enable_fast_cuda, exit_status, image_count, network_width,
                 number_in_range, positive_int, print_header, resolve_device, seed_int,
                 start_script)
from synthetic import write_synthetic_cifar
from models import ARCHS
from utils import CifarLoader, attack_backend, clamp, evaluate_batches, load_cifar, pgd_attack

# One CIFAR-10 run as the paper trains it: the projection's yardstick.
EPOCHS, TRAIN_IMAGES, TEST_IMAGES = 110, 50_000, 10_000
PGD_EPSILON, PGD_ALPHA, PGD_ITERS = 8 / 255, 2 / 255, 10


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument('--steps', type=positive_int, default=50, help='timed steps per path')
    p.add_argument('--warmup', type=number_in_range(int, 0), default=5, help='untimed steps before the timed ones')
    p.add_argument('--batch-size', type=positive_int, default=128)
    p.add_argument('--eval-images', type=image_count, default=1024,
                   help='test images attacked with PGD-10')
    p.add_argument('--eval-batch-size', type=positive_int, default=512)
    p.add_argument('--arch', choices=list(ARCHS), default='preactresnet18')
    p.add_argument('--method', choices=list(mixkl.STEPS), default='mixkl',
                   help='the project path\'s step; the reference path is MIX-KL\'s and runs '
                        'only with mixkl')
    p.add_argument('--width', type=network_width, default=None,
                   help='the architecture\'s width (default: its own, 64 or 10)')
    p.add_argument('--device', type=device_flag,
                   help='cuda, cuda:1, cpu ... (default: cuda when present)')
    p.add_argument('--dataset', choices=['cifar10', 'cifar100'], default='cifar10')
    p.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                   help="the project path's bf16 autocast (default: as training, on for CUDA, "
                        'off on CPU)')
    p.add_argument('--workers', type=number_in_range(int, 0), default=2,
                   help="reference path's DataLoader workers (the fast-AT scripts use 2)")
    p.add_argument('--seed', type=seed_int, default=0)
    p.add_argument('--check', action='store_true',
                   help='run bf16_check.py instead; every other flag is then its own (see '
                        '`benchmark.py --check --help`), and one of benchmark.py\'s alone is '
                        'refused')
    args = p.parse_args(argv)
    args.width = args.width or ARCHS[args.arch].default_width
    if (args.warmup + args.steps) * args.batch_size > MAX_SYNTHETIC_IMAGES:
        p.error(f'--warmup {args.warmup} and --steps {args.steps} of --batch-size '
                f'{args.batch_size} would need more than {MAX_SYNTHETIC_IMAGES:,} synthetic '
                'training images')
    return args


# ---------------------------------------------------------------------------
# The machine

def synchronize(device):
    """CUDA runs asynchronously: wait for queued work before reading the clock."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def project_cuda_flags(device):
    """The backend settings Trainer makes on CUDA (cuDNN autotuning, TF32), around one step.

    They are process-wide, so they are set and restored step by step: the
    reference path keeps PyTorch's defaults (no autotuning; TF32 in cuDNN
    convolutions, not in matmuls).
    """
    if device.type != 'cuda':
        yield
        return
    with backend_switches_kept():
        enable_fast_cuda()
        yield


def reset_peak_memory(device):
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device):
    """CUDA: peak allocated since the last reset. CPU: this process's peak RSS so far.

    ru_maxrss (KiB on Linux) cannot be reset and leaves out the DataLoader workers.
    """
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


# ---------------------------------------------------------------------------
# Data

class _UncheckedCifarMixin:
    """torchvision's CIFAR reader minus its md5 checks and class-name file.

    The synthetic files are not the official release, so the checksums fail and
    there is no batches.meta; unpickling, PIL conversion and transforms are
    torchvision's own.
    """

    def _check_integrity(self):
        return True

    def _load_meta(self):
        self.classes = [str(c) for c in sorted(set(self.targets))]


class UncheckedCIFAR10(_UncheckedCifarMixin, tv_datasets.CIFAR10):
    pass


class UncheckedCIFAR100(_UncheckedCifarMixin, tv_datasets.CIFAR100):
    pass


# ---------------------------------------------------------------------------
# Models, as Trainer builds them

def step_settings(args, amp):
    """The training script's flags and defaults (eps, alpha, lamda, tau0, ...) and its Hyperparameters."""
    argv = ['--batch-size', str(args.batch_size), '--width', str(args.width),
            '--arch', args.arch, '--method', args.method,
            '--seed', str(args.seed), '--amp' if amp else '--no-amp']
    targs = training.parse_args(args.dataset, argv)[0]
    return targs, training.hyperparameters(targs)


def build_models(targs, device, channels_last):
    """Student, teacher and optimiser from the seed: both paths start from the same weights."""
    training.seed_everything(targs.seed)
    student = training.build_model(targs.arch, targs.dataset, targs.width, device, channels_last)
    return SimpleNamespace(
        student=student,
        teacher=mixkl.ConditionalEMA(student, targs.ema_value, targs.ema_decay_max),
        optimizer=torch.optim.SGD(student.parameters(), lr=targs.lr_max,
                                  momentum=targs.momentum, weight_decay=targs.weight_decay))


def check_finite(result):
    if not math.isfinite(result.loss):
        raise RuntimeError(f'non-finite loss ({result.loss}) in the benchmark')


# ---------------------------------------------------------------------------
# The two training paths, each a generator yielding after every step
# (the LR scheduler's step, a few Python operations, is left out of both)

def project_steps(targs, hp, models, root, device):
    """The trainer's step, over and over."""
    x, y = load_cifar(targs.dataset, root, train=True, download=False, quiet=True)
    loader = CifarLoader(x, y, targs.batch_size, device, train=True, seed=targs.seed)
    models.student.train()
    for epoch in itertools.count():
        for x, y in loader.batches(epoch):
            with project_cuda_flags(device):
                check_finite(mixkl.STEPS[targs.method](models.student, models.teacher,
                                                       models.optimizer, x, y, hp, epoch=0))
            yield len(y)


def reference_loader(targs, root, device, workers):
    augment = transforms.Compose([transforms.RandomCrop(32, padding=4),
                                  transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    cls = UncheckedCIFAR10 if targs.dataset == 'cifar10' else UncheckedCIFAR100
    return torch.utils.data.DataLoader(
        cls(root, train=True, transform=augment), batch_size=targs.batch_size, shuffle=True,
        num_workers=workers, pin_memory=device.type == 'cuda')


def reference_step(student, teacher, optimizer, x, y, hp, epoch):
    """mixkl.mixkl_step as the reference scripts wrote it: fp32, and a backward() FGSM step.

    That backward() fills every parameter's .grad too, for zero_grad to discard.
    The same RNG draws, the same loss (tests/test_benchmark.py checks it).
    """
    tau = mixkl.temperature(epoch, hp.tau0, hp.gamma, hp.tau_schedule)
    w_kl = mixkl.kl_weight(tau, hp.tau0, hp.lambda_kl_base)
    xm, ym, _ = mixkl.mixup(x, y, hp.num_classes, hp.mixup_alpha)
    delta0 = mixkl.random_start(xm, hp.epsilon, hp.delta_init).requires_grad_(True)
    logits0, feat0 = student(xm + delta0, return_features=True)
    mixkl.soft_cross_entropy(logits0, ym).backward(retain_graph=True)
    delta = (delta0.detach() + hp.alpha * delta0.grad.sign()).clamp(-hp.epsilon, hp.epsilon)
    delta = clamp(delta, -xm, 1 - xm)
    za, fa = student(xm + delta, return_features=True)
    zc = student(xm)
    with torch.no_grad():
        zt = teacher.model(xm + delta)
    loss = (mixkl.soft_cross_entropy(za, ym)
            + hp.lamda * mixkl.consistency_loss(za, zc, fa, feat0, xm, delta)
            + w_kl * mixkl.geometric_kl(za, zt, tau))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    loss, clean_ok, adv_ok = torch.stack([loss.detach(), mixkl.correct(zc, y),
                                          mixkl.correct(za, y)]).tolist()
    updated = teacher.maybe_update(student, clean_ok, adv_ok)
    return mixkl.StepResult(loss, int(adv_ok), len(y), updated)


def reference_steps(targs, hp, models, root, device, workers):
    loader = reference_loader(targs, root, device, workers)
    models.student.train()
    for _ in itertools.count():
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            check_finite(reference_step(models.student, models.teacher, models.optimizer, x, y,
                                        hp, epoch=0))
            yield len(y)


def time_interleaved(paths, warmup, timed, device):
    """Images/s and peak memory (MiB) of each path in ``paths`` (name: step generator).

    The paths take their steps in turn, one each, so that both meet the same
    machine: on a shared CPU the load drifts over minutes, and timing one path
    after the other would put that drift into their ratio. The first ``warmup``
    steps of each (with them the set-up: reading the files, starting workers)
    are not timed. On CUDA, a path's peak is that of its own steps, with both
    paths' weights and optimiser states resident. The reference's DataLoader
    workers keep loading during the project's steps, which would hide its data
    loading only if that took longer than a whole reference step.
    """
    seconds, images, peaks = ({name: 0 for name in paths} for _ in range(3))
    try:
        for _ in range(warmup):
            for steps in paths.values():
                next(steps)
        for _ in range(timed):
            for name, steps in paths.items():
                synchronize(device)
                reset_peak_memory(device)
                start = time.perf_counter()
                images[name] += next(steps)
                synchronize(device)
                seconds[name] += time.perf_counter() - start
                peaks[name] = max(peaks[name], peak_memory_mib(device))
    finally:
        for steps in paths.values():
            steps.close()  # stops the DataLoader workers before the evaluation
    return {name: images[name] / seconds[name] for name in paths}, peaks


# ---------------------------------------------------------------------------
# PGD-10 evaluation

class PinnedPrediction(torch.nn.Module):
    """``model`` with a large constant added to class 0's logit.

    It predicts class 0 whatever the input, so against labels 0 no image is ever
    broken and attack_pgd, which stops stepping an image once it is
    misclassified, runs all its steps on every image: the full cost, whatever
    the weights. (The constant saturates the softmax, so the input gradients
    are exact zeros, not denormals, which would slow a CPU down.)
    """

    def __init__(self, model, offset=1e4):
        super().__init__()
        self.model = model
        self.offset = offset

    def forward(self, x):
        logits = self.model(x)
        return torch.cat([logits[:, :1] + self.offset, logits[:, 1:]], dim=1)


def pgd_eval_rate(args, root, device):
    """Images per second of evaluate_batches under PGD-10, at full cost; and the PGD accuracy.

    A trained model evaluates faster: attack_pgd drops each image once it is
    misclassified (a robust CIFAR-10 model starts about 80% right and ends
    about 50%), and a barely trained one on random data drops most at once.
    """
    x, _ = load_cifar(args.dataset, root, train=False, download=False, quiet=True)
    x = x.to(device).float() / 255
    training.seed_everything(args.seed)
    model = PinnedPrediction(training.build_model(  # as the trainer builds it
        args.arch, args.dataset, args.width, device, cuda_default(device)))
    batches = [(X, torch.zeros(len(X), dtype=torch.long, device=device))
               for X in x.split(args.eval_batch_size)]
    attack = pgd_attack(PGD_EPSILON, PGD_ALPHA, PGD_ITERS, 1)
    # The backend settings of Trainer.end_epoch's evaluation.
    with attack_backend():
        if args.warmup:  # CUDA's lazy set-up and the first call of each kernel: not timed
            one_step = pgd_attack(PGD_EPSILON, PGD_ALPHA, 1, 1)
            evaluate_batches(model, {len(X): (X, y) for X, y in batches}.values(), one_step)
        synchronize(device)
        reset_peak_memory(device)
        start = time.perf_counter()
        correct, total = evaluate_batches(model, batches, attack)
        synchronize(device)
    return total / (time.perf_counter() - start), correct / total


# ---------------------------------------------------------------------------
# The runs

def run_benchmark(args, device, root):
    n_train = (args.warmup + args.steps) * args.batch_size  # one epoch: no reshuffle inside timing
    write_synthetic_cifar(root, args.dataset, n_train=n_train, n_test=args.eval_images,
                      seed=args.seed)
    cuda = device.type == 'cuda'
    print(f'{args.steps} timed steps per path after {args.warmup} warm-up, batch '
          f'{args.batch_size}, {args.arch} width {args.width}, {args.method}, {args.dataset}; '
          f'project path bf16 autocast: {"on" if args.amp else "off"}')

    project_args, project_hp = step_settings(args, args.amp)
    reference_args, reference_hp = step_settings(args, False)
    # build_models seeds: both paths start from the same weights.
    paths = {'project': project_steps(project_args, project_hp,
                                      build_models(project_args, device, cuda), root, device)}
    if args.method == 'mixkl':
        paths['reference'] = reference_steps(reference_args, reference_hp,
                                             build_models(reference_args, device, False), root,
                                             device, args.workers)
    rates, peaks = time_interleaved(paths, args.warmup, args.steps, device)
    del paths  # frees both paths' models before the evaluation's peak is measured
    eval_rate, pgd_acc = pgd_eval_rate(args, root, device)
    peaks['PGD-10 eval'] = peak_memory_mib(device)

    print(f'project path:   {rates["project"]:.2f} images/s  '
          f'(CifarLoader on {device.type}, autograd.grad FGSM)')
    if 'reference' in rates:
        print(f'reference path: {rates["reference"]:.2f} images/s  (torchvision + PIL + '
              f'DataLoader with {args.workers} workers, fp32, backward() FGSM)')
        print(f'ratio project/reference: {rates["project"] / rates["reference"]:.2f}x')
    print(f'PGD-10 eval:    {eval_rate:.2f} images/s  ({args.eval_images} images at full cost: '
          f'PGD accuracy {pgd_acc:.2f}, 1.00 = every image attacked for all 10 steps)')
    if cuda:
        print('peak memory:    ' + ', '.join(f'{name} {mib:.0f} MiB' for name, mib in peaks.items())
              + ' (torch.cuda.max_memory_allocated)')
    else:
        print(f'peak memory:    {peaks["PGD-10 eval"]:.0f} MiB peak RSS of this process, all '
              'phases (resource.getrusage; DataLoader workers not included)')
    print_projection(rates, eval_rate)


def print_projection(rates, eval_rate):
    """A full run's time from the rates: per epoch, 50,000 training images and PGD-10 on 10,000."""
    eval_s = TEST_IMAGES / eval_rate
    print(f'projected {EPOCHS} epochs of CIFAR-10 ({TRAIN_IMAGES} train images/epoch, '
          f'{TEST_IMAGES} test images PGD-10/epoch):')
    for name, rate in ((f'{name} path', rate) for name, rate in rates.items()):
        train_s = TRAIN_IMAGES / rate
        total_h = EPOCHS * (train_s + eval_s) / 3600
        print(f'  {name + ":":16s}{total_h:10.2f} h  (per epoch {train_s:.0f} s training '
              f'+ {eval_s:.0f} s evaluation)')


def wants_check(argv):
    """(whether --check is given, the other flags): with it, all of those are bf16_check.py's.

    --check is recognised only as written (no abbreviation, like every flag here),
    so that the same command line always runs the same script.
    """
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument('--check', action='store_true')
    known, rest = p.parse_known_args(argv)
    return known.check, rest


def benchmark(args, argv):
    device = resolve_device(args.device)
    if args.amp is None:
        args.amp = cuda_default(device)
    print_header(shlex.join(['benchmark.py', *argv]), device)
    with tempfile.TemporaryDirectory(prefix='mixkl-benchmark-') as root:
        run_benchmark(args, device, root)


def main(argv=None):
    start_script()
    argv = sys.argv[1:] if argv is None else list(argv)
    check, rest = wants_check(argv)
    if check:
        return bf16_check.main(rest, prog='benchmark.py --check')
    args = parse_args(argv)
    code = exit_status(lambda: benchmark(args, argv))
    if code:
        sys.exit(code)


if __name__ == '__main__':
    main()
