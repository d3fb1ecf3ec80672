"""How fast is a MIX-KL training step here, against a reference-style step?

Both training paths run in one process, on the same synthetic files in the CIFAR
python-pickle layout (utils.write_synthetic_cifar), from the same initial weights,
taking their steps in turn:

- project path: what Trainer.train_epoch does per step. CifarLoader batches (uint8
  data kept on the device, batched crop/flip), mixkl.mixkl_loss (bf16 autocast as
  training has it: on for CUDA, off on CPU, or as --amp / --no-amp say; on CUDA a
  channels_last model, cuDNN autotuning and TF32; FGSM gradient w.r.t. delta
  only), SGD step, one host sync and the conditional teacher update.
- reference path: the same MIX-KL loss and update, but the data goes through
  torchvision's CIFAR dataset, PIL transforms and a DataLoader, everything runs in
  fp32, and the FGSM step calls loss.backward(), which also computes every
  parameter's gradient only for zero_grad to throw it away.

Then PGD-10 evaluation (utils.evaluate_batches with utils.pgd_attack) of
--eval-images test images, and a projection to a 110-epoch CIFAR-10 run.
--check instead runs short trainings (the training script's Trainer) with bf16
autocast on and off, from each of --check-seeds seeds, on learnable synthetic
data, and prints the test accuracies.

    python benchmark.py                                   # on the GPU, defaults
    python benchmark.py --device cpu --steps 3 --warmup 1 --eval-images 128
    python benchmark.py --check
"""
import argparse
import contextlib
import io
import itertools
import math
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

import torch
from torchvision import datasets as tv_datasets
from torchvision import transforms

import mixkl
from preactresnet import PreActResNet18
from utils import (DATASETS, CifarLoader, HelpFormatter, InputError, clamp, cudnn_autotuning,
                   enable_fast_cuda, evaluate_batches, load_cifar, pgd_attack,
                   write_synthetic_cifar)

# One CIFAR-10 run as the paper trains it: the projection's yardstick.
EPOCHS, TRAIN_IMAGES, TEST_IMAGES = 110, 50_000, 10_000
PGD_EPSILON, PGD_ALPHA, PGD_ITERS = 8 / 255, 2 / 255, 10


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=HelpFormatter)
    p.add_argument('--steps', type=mixkl.positive_int, default=50, help='timed steps per path')
    p.add_argument('--warmup', type=int, default=5, help='untimed steps before the timed ones')
    p.add_argument('--batch-size', type=mixkl.positive_int, default=128)
    p.add_argument('--eval-images', type=mixkl.positive_int, default=1024,
                   help='test images attacked with PGD-10')
    p.add_argument('--eval-batch-size', type=mixkl.positive_int, default=512)
    p.add_argument('--width', type=mixkl.positive_int, default=64,
                   help='PreActResNet-18 base width')
    p.add_argument('--device', help='cuda, cuda:1, cpu ... (default: cuda when present)')
    p.add_argument('--dataset', choices=list(DATASETS), default='cifar10')
    p.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                   help="the project path's bf16 autocast (default: as training, on for CUDA, "
                        'off on CPU)')
    p.add_argument('--workers', type=int, default=2,
                   help="reference path's DataLoader workers (the fast-AT scripts use 2)")
    p.add_argument('--seed', type=int, default=0)
    c = p.add_argument_group('--check: does bf16 autocast change what is learnt?')
    c.add_argument('--check', action='store_true',
                   help='train with amp on and off, from each seed, and print test accuracies')
    c.add_argument('--check-seeds', type=mixkl.positive_int, default=3,
                   help='seeds --seed, --seed + 1, ...: their spread is the noise to compare with')
    c.add_argument('--check-epochs', type=mixkl.positive_int, default=8)
    c.add_argument('--check-lr-max', type=mixkl.number_in_range(float, 0, low_open=True),
                   default=0.02,
                   help="the runs' --lr-max: at the method's 0.1 some runs on this small set "
                        'collapse to a few classes, whatever the precision (BENCHMARKS.md)')
    c.add_argument('--check-width', type=mixkl.positive_int, default=16)
    c.add_argument('--check-train-images', type=mixkl.positive_int, default=2048)
    args = p.parse_args(argv)
    if args.warmup < 0 or args.workers < 0:
        p.error('--warmup and --workers must be >= 0')
    return args


# ---------------------------------------------------------------------------
# The machine

def describe_device(device):
    if device.type == 'cuda':
        return f'{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})'
    model = platform.processor() or 'unknown CPU'
    try:
        with open('/proc/cpuinfo') as f:
            model = next(line.split(':', 1)[1].strip() for line in f
                         if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return f'{model}, {os.cpu_count()} cores, torch using {torch.get_num_threads()} threads'


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
    flags = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    enable_fast_cuda()
    try:
        yield
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = flags


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

def training_args(args, amp):
    """The project's own training flags and defaults (eps, alpha, lamda, tau0, ...)."""
    argv = ['--batch-size', str(args.batch_size), '--width', str(args.width),
            '--seed', str(args.seed), '--amp' if amp else '--no-amp']
    return mixkl.parse_args(args.dataset, argv)[0]


def build_models(targs, device, channels_last):
    """Student, teacher and optimiser from the seed: both paths start from the same weights."""
    mixkl.seed_everything(targs.seed)
    student = PreActResNet18(DATASETS[targs.dataset]['num_classes'], targs.width).to(device)
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
    return SimpleNamespace(
        student=student, teacher=mixkl.ConditionalEMA(student, targs.ema_value),
        optimizer=torch.optim.SGD(student.parameters(), lr=targs.lr_max,
                                  momentum=targs.momentum, weight_decay=targs.weight_decay))


def update(models, loss, clean_logits, adv_logits, y):
    """SGD step, then Trainer._record_step's single host sync and teacher decision.

    The LR scheduler's step (a few Python operations) is left out.
    """
    models.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    models.optimizer.step()
    loss_value, adv_ok, clean_ok = torch.stack(
        [loss.detach(), (adv_logits.argmax(1) == y).sum().float(),
         (clean_logits.argmax(1) == y).sum().float()]).tolist()
    if not math.isfinite(loss_value):
        raise RuntimeError(f'non-finite loss ({loss_value}) in the benchmark')
    if models.teacher.wants_update(clean_ok, adv_ok):
        models.teacher.update(models.student)


def first_epoch_schedule(targs):
    tau = mixkl.temperature(0, targs.tau0, targs.gamma, targs.tau_schedule)
    return tau, mixkl.kl_weight(tau, targs.tau0, targs.lambda_kl_base)


# ---------------------------------------------------------------------------
# The two training paths, each a generator yielding after every step

def project_steps(targs, models, root, device):
    """Trainer.train_epoch's step, over and over."""
    x, y = load_cifar(targs.dataset, root, train=True, download=False, quiet=True)
    loader = CifarLoader(x, y, targs.batch_size, device, train=True, seed=targs.seed)
    tau, w_kl = first_epoch_schedule(targs)
    num_classes = DATASETS[targs.dataset]['num_classes']
    models.student.train()
    for epoch in itertools.count():
        for x, y in loader.batches(epoch):
            with project_cuda_flags(device):
                loss, clean_logits, adv_logits = mixkl.mixkl_loss(
                    targs, models.student, models.teacher, x, y, tau, w_kl, num_classes)
                update(models, loss, clean_logits, adv_logits, y)
            yield len(y)


def reference_loader(targs, root, device, workers):
    augment = transforms.Compose([transforms.RandomCrop(32, padding=4),
                                  transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    cls = UncheckedCIFAR10 if targs.dataset == 'cifar10' else UncheckedCIFAR100
    return torch.utils.data.DataLoader(
        cls(root, train=True, transform=augment), batch_size=targs.batch_size, shuffle=True,
        num_workers=workers, pin_memory=device.type == 'cuda')


def reference_fgsm_step(model, xm, ym, delta0, epsilon, alpha):
    """mixkl.fgsm_step as the reference wrote it: backward() fills every parameter's .grad too."""
    delta0 = delta0.requires_grad_(True)
    logits0, features0 = model(xm + delta0, return_features=True)
    mixkl.soft_cross_entropy(logits0, ym).backward(retain_graph=True)
    delta = (delta0.detach() + alpha * delta0.grad.sign()).clamp(-epsilon, epsilon)
    return clamp(delta, -xm, 1 - xm), features0


def reference_mixkl_loss(args, student, teacher, x, y, tau, w_kl, num_classes):
    """mixkl.mixkl_loss in fp32 with reference_fgsm_step; the same RNG draws, the same value.

    Written for the default flags, under which both the consistency and the KL
    term are on (tests/test_benchmark.py checks it against mixkl_loss).
    """
    epsilon, alpha = args.epsilon / 255, args.alpha / 255
    xm, ym, _ = mixkl.mixup(x, y, num_classes, args.mixup_alpha)
    delta0 = mixkl.random_start(xm, epsilon, args.delta_init)
    delta, features0 = reference_fgsm_step(student, xm, ym, delta0, epsilon, alpha)
    adv_logits, adv_features = student(xm + delta, return_features=True)
    clean_logits = student(xm)
    with torch.no_grad():
        teacher_logits = teacher.model(xm + delta)
    loss = (mixkl.soft_cross_entropy(adv_logits, ym)
            + args.lamda * mixkl.consistency_loss(adv_logits, clean_logits, adv_features,
                                                  features0, xm, delta)
            + w_kl * mixkl.geometric_kl(adv_logits, teacher_logits, tau))
    return loss, clean_logits, adv_logits


def reference_steps(targs, models, root, device, workers):
    loader = reference_loader(targs, root, device, workers)
    tau, w_kl = first_epoch_schedule(targs)
    num_classes = DATASETS[targs.dataset]['num_classes']
    models.student.train()
    for _ in itertools.count():
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss, clean_logits, adv_logits = reference_mixkl_loss(
                targs, models.student, models.teacher, x, y, tau, w_kl, num_classes)
            update(models, loss, clean_logits, adv_logits, y)
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
    mixkl.seed_everything(args.seed)
    model = PreActResNet18(DATASETS[args.dataset]['num_classes'], args.width).to(device)
    if device.type == 'cuda':
        model = model.to(memory_format=torch.channels_last)  # as Trainer builds it
    model = PinnedPrediction(model)
    batches = [(X, torch.zeros(len(X), dtype=torch.long, device=device))
               for X in x.split(args.eval_batch_size)]
    attack = pgd_attack(PGD_EPSILON, PGD_ALPHA, PGD_ITERS, 1)
    # Trainer's settings, and as in Trainer.end_epoch no cuDNN autotuning.
    with project_cuda_flags(device), cudnn_autotuning(False):
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

def print_header(command, device):
    print(f'command: python {command}')
    print(f'device:  {describe_device(device)}')
    print(f'torch:   {torch.__version__}, Python {platform.python_version()}')


def run_benchmark(args, device, root):
    n_train = (args.warmup + args.steps) * args.batch_size  # one epoch: no reshuffle inside timing
    write_synthetic_cifar(root, args.dataset, n_train=n_train, n_test=args.eval_images,
                      seed=args.seed)
    cuda = device.type == 'cuda'
    print(f'{args.steps} timed steps per path after {args.warmup} warm-up, batch '
          f'{args.batch_size}, width {args.width}, {args.dataset}; project path bf16 autocast: '
          f'{"on" if args.amp else "off"}')

    project_args = training_args(args, args.amp)
    reference_args = training_args(args, False)
    # build_models seeds: both paths start from the same weights.
    paths = {
        'project': project_steps(project_args, build_models(project_args, device, cuda),
                                 root, device),
        'reference': reference_steps(reference_args, build_models(reference_args, device, False),
                                     root, device, args.workers),
    }
    rates, peaks = time_interleaved(paths, args.warmup, args.steps, device)
    del paths  # frees both paths' models before the evaluation's peak is measured
    eval_rate, pgd_acc = pgd_eval_rate(args, root, device)
    peaks['PGD-10 eval'] = peak_memory_mib(device)

    print(f'project path:   {rates["project"]:.2f} images/s  '
          f'(CifarLoader on {device.type}, autograd.grad FGSM)')
    print(f'reference path: {rates["reference"]:.2f} images/s  (torchvision + PIL + DataLoader '
          f'with {args.workers} workers, fp32, backward() FGSM)')
    print(f'ratio project/reference: {rates["project"] / rates["reference"]:.2f}x')
    print(f'PGD-10 eval:    {eval_rate:.2f} images/s  ({args.eval_images} images at full cost: '
          f'PGD accuracy {pgd_acc:.2f}, 1.00 = every image attacked for all 10 steps)')
    if cuda:
        print('peak memory:    ' + ', '.join(f'{name} {mib:.0f} MiB' for name, mib in peaks.items())
              + ' (torch.cuda.max_memory_allocated)')
    else:
        print(f'peak memory:    {peaks["PGD-10 eval"]:.0f} MiB peak RSS of this process, all '
              'phases (resource.getrusage; DataLoader workers not included)')
    print_projection(rates['project'], rates['reference'], eval_rate)


def print_projection(project_rate, reference_rate, eval_rate):
    """A full run's time from the rates: per epoch, 50,000 training images and PGD-10 on 10,000."""
    eval_s = TEST_IMAGES / eval_rate
    print(f'projected {EPOCHS} epochs of CIFAR-10 ({TRAIN_IMAGES} train images/epoch, '
          f'{TEST_IMAGES} test images PGD-10/epoch):')
    for name, rate in (('project path', project_rate), ('reference path', reference_rate)):
        train_s = TRAIN_IMAGES / rate
        total_h = EPOCHS * (train_s + eval_s) / 3600
        print(f'  {name + ":":16s}{total_h:10.2f} h  (per epoch {train_s:.0f} s training '
              f'+ {eval_s:.0f} s evaluation)')


def run_check(args, device, root):
    """From each seed, a short training run with amp on and one with amp off; test accuracies.

    The runs are the training script's own (Trainer: schedules, teacher,
    evaluation), on learnable synthetic data. The two runs from one seed start
    from the same weights and draw the same batches and random numbers; the
    seeds' spread shows how far apart runs that differ in nothing that matters
    end up. The student is what bf16 trains; the teacher is what MIX-KL reports.
    """
    write_synthetic_cifar(root, args.dataset, n_train=args.check_train_images,
                          n_test=args.eval_images, seed=args.seed, learnable=True)
    print(f'check: {args.check_epochs} epochs, lr {args.check_lr_max}, batch {args.batch_size}, '
          f'width {args.check_width}, '
          f'learnable synthetic {args.dataset}, {args.check_train_images} train / '
          f'{args.eval_images} test images, seeds {args.seed}..{args.seed + args.check_seeds - 1}')
    results = {True: [], False: []}
    for seed in range(args.seed, args.seed + args.check_seeds):
        for amp in (True, False):
            start = time.perf_counter()
            trainer = check_run(args, device, root, seed, amp)
            student = mixkl.evaluate_robustness(trainer.student, trainer.test_loader.batches(),
                                                PGD_EPSILON, PGD_ALPHA, PGD_ITERS)
            last = trainer.history[-1]  # the teacher's evaluation after the last epoch
            accuracies = [*student, last['test_clean_acc'], last['test_pgd_acc']]
            results[amp].append(accuracies)
            print(f'seed {seed} amp {"on " if amp else "off"}: {check_figures(accuracies)}  '
                  f'({time.perf_counter() - start:.0f} s)', flush=True)
    for amp in (True, False):
        runs = list(zip(*results[amp]))
        print(f'mean amp {"on " if amp else "off"}: '
              f'{check_figures([statistics.mean(r) for r in runs], [spread(r) for r in runs])}')


def check_run(args, device, root, seed, amp):
    """One run of the training script, without its printed log lines."""
    argv = ['--data-dir', root, '--out_dir', os.path.join(root, 'runs'), '--device', str(device),
            '--epochs', str(args.check_epochs), '--batch-size', str(args.batch_size),
            '--eval-batch-size', str(args.eval_batch_size), '--width', str(args.check_width),
            '--lr-max', str(args.check_lr_max), '--alarm-examples', '64', '--seed', str(seed),
            '--amp' if amp else '--no-amp']
    targs, parser = mixkl.parse_args(args.dataset, argv)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = mixkl.Trainer(targs, parser)
        trainer.fit()
    return trainer


def check_figures(accuracies, sds=None):
    """Test accuracies (student clean, PGD-10, teacher clean, PGD-10) as one line of text."""
    text = [f'{a:.4f}' + (f' (sd {sd:.4f})' if sds else '')
            for a, sd in zip(accuracies, sds or accuracies)]
    return (f'student clean {text[0]}, PGD-10 {text[1]}; '
            f'teacher clean {text[2]}, PGD-10 {text[3]}')


def spread(values):
    """Sample standard deviation; 0 for a single value."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv=None):
    args = parse_args(argv)
    command = shlex.join(sys.argv if argv is None else ['benchmark.py', *argv])
    try:
        device = mixkl.resolve_device(args.device)
    except InputError as e:
        sys.exit(f'error: {e}')
    if args.amp is None:
        args.amp = mixkl.amp_default(device)
    print_header(command, device)
    with tempfile.TemporaryDirectory(prefix='mixkl-benchmark-') as root:
        (run_check if args.check else run_benchmark)(args, device, root)


if __name__ == '__main__':
    main()
