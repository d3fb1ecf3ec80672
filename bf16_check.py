"""Does bf16 autocast change what MIX-KL learns? Short runs with --amp and --no-amp, several seeds.

The runs are the training script's own (training.Trainer: schedules, teacher,
per-epoch evaluation), on learnable synthetic data in the CIFAR layout. The two
runs from one seed start from the same weights and draw the same batches and
random numbers; the seeds' spread shows how far apart runs that differ in
nothing that matters end up. The student is what bf16 trains; the teacher is
what MIX-KL reports.

    python bf16_check.py                  # also: python benchmark.py --check
    python bf16_check.py --device cpu --seeds 2 --epochs 2
"""
import argparse
import contextlib
import io
import os
import shlex
import statistics
import sys
import tempfile
import time

import training
from cli import (HelpFormatter, device_flag, exit_status, image_count, network_width,
                 number_in_range, positive_int, print_header, resolve_device, seed_int,
                 start_script)
from synthetic import write_synthetic_cifar
from utils import evaluate_robustness

PGD_EPSILON, PGD_ALPHA, PGD_ITERS = 8 / 255, 2 / 255, 10


def parse_args(argv=None, prog=None):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split('\n')[0],
                                formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument('--seeds', '--check-seeds', type=positive_int, default=3,
                   help='seeds --seed, --seed + 1, ...: their spread is the noise to compare with')
    p.add_argument('--seed', type=seed_int, default=0)
    p.add_argument('--epochs', '--check-epochs', type=positive_int, default=8)
    p.add_argument('--lr-max', '--check-lr-max', default=0.02,
                   type=number_in_range(float, 0, 10, low_open=True),
                   help="the runs' --lr-max: at the method's 0.1 some runs on this small set "
                        'collapse to a few classes, whatever the precision (BENCHMARKS.md)')
    p.add_argument('--width', '--check-width', type=network_width, default=16,
                   help='PreActResNet-18 base width')
    p.add_argument('--train-images', '--check-train-images', type=image_count, default=2048)
    p.add_argument('--eval-images', type=image_count, default=1024)
    p.add_argument('--batch-size', type=positive_int, default=128)
    p.add_argument('--eval-batch-size', type=positive_int, default=512)
    # The check trains on synthetic data in the CIFAR layout; Tiny-ImageNet is not offered.
    p.add_argument('--dataset', choices=['cifar10', 'cifar100'], default='cifar10')
    p.add_argument('--device', type=device_flag,
                   help='cuda, cuda:1, cpu ... (default: cuda when present)')
    return p.parse_args(argv)


def run_check(args, device, root):
    """From each seed, a short training run with amp on and one with amp off; test accuracies.

    The runs are the training script's own (Trainer: schedules, teacher,
    evaluation), on learnable synthetic data. The two runs from one seed start
    from the same weights and draw the same batches and random numbers; the
    seeds' spread shows how far apart runs that differ in nothing that matters
    end up. The student is what bf16 trains; the teacher is what MIX-KL reports.
    """
    write_synthetic_cifar(root, args.dataset, n_train=args.train_images,
                          n_test=args.eval_images, seed=args.seed, learnable=True)
    print(f'check: {args.epochs} epochs, lr {args.lr_max}, batch {args.batch_size}, '
          f'width {args.width}, '
          f'learnable synthetic {args.dataset}, {args.train_images} train / '
          f'{args.eval_images} test images, seeds {args.seed}..{args.seed + args.seeds - 1}')
    results = {True: [], False: []}
    for seed in range(args.seed, args.seed + args.seeds):
        for amp in (True, False):
            start = time.perf_counter()
            trainer = check_run(args, device, root, seed, amp)
            student = evaluate_robustness(trainer.student, trainer.eval_loader.batches(),
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
            '--epochs', str(args.epochs), '--batch-size', str(args.batch_size),
            '--eval-batch-size', str(args.eval_batch_size), '--width', str(args.width),
            '--lr-max', str(args.lr_max), '--alarm-examples', '64', '--seed', str(seed),
            '--amp' if amp else '--no-amp']
    targs, parser = training.parse_args(args.dataset, argv)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = training.Trainer(targs, parser)
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


def check(args, argv):
    device = resolve_device(args.device)
    print_header(shlex.join(['bf16_check.py', *argv]), device)
    with tempfile.TemporaryDirectory(prefix='mixkl-bf16-check-') as root:
        run_check(args, device, root)


def main(argv=None, prog=None):
    """``prog``: the name in usage and error lines (benchmark.py --check runs this too)."""
    start_script()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv, prog)
    code = exit_status(lambda: check(args, argv))
    if code:
        sys.exit(code)


if __name__ == '__main__':
    main()
