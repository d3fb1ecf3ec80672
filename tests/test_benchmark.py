"""benchmark.py: it runs end to end on CPU, prints every figure, and compares like with like.

The speed itself is not tested (it is a script, not a timed test); the runs
here are tiny: one step of batch 8 at width 8.
"""
import copy
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import benchmark
import mixkl
from preactresnet import PreActResNet18
from utils import load_cifar, write_synthetic_cifar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--device', 'cpu', '--batch-size', '8', '--width', '8', '--eval-images', '8']


def run_benchmark(*flags):
    result = subprocess.run([sys.executable, 'benchmark.py', *TINY, *flags], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def figure(pattern, out):
    match = re.search(pattern, out, re.MULTILINE)
    assert match, f'{pattern!r} not in output:\n{out}'
    return float(match.group(1))


def test_benchmark_prints_both_paths_eval_memory_and_projection():
    out = run_benchmark('--steps', '1', '--warmup', '0')
    project = figure(r'^project path: +([\d.]+) images/s', out)
    reference = figure(r'^reference path: +([\d.]+) images/s', out)
    ratio = figure(r'^ratio project/reference: ([\d.]+)x', out)
    assert project > 0 and reference > 0
    assert abs(ratio - project / reference) <= 0.01 + 0.01 * ratio  # printed to 2 decimals
    assert figure(r'^PGD-10 eval: +([\d.]+) images/s', out) > 0
    assert figure(r'^  project path: +([\d.]+) h', out) > 0
    assert figure(r'^  reference path: +([\d.]+) h', out) > 0
    assert figure(r'^peak memory: +(\d+) MiB peak RSS', out) > 0
    assert 'device:  ' in out and f'torch:   {torch.__version__}' in out
    assert 'command: python benchmark.py --device cpu' in out


def test_check_mode_prints_both_precisions_for_each_seed_and_their_means(capsys):
    # In this process: a second interpreter would pay torch's import again.
    benchmark.main([*TINY, '--check', '--check-epochs', '1', '--check-width', '8',
                    '--check-train-images', '16', '--check-seeds', '2', '--seed', '3'])
    out = capsys.readouterr().out
    for amp in ('on ', 'off'):
        for model in ('student', 'teacher'):
            runs = [figure(rf'^seed {seed} amp {amp}: .*{model} clean ([\d.]+)', out)
                    for seed in (3, 4)]
            assert all(0 <= accuracy <= 1 for accuracy in runs)
            mean = figure(rf'^mean amp {amp}: .*{model} clean ([\d.]+) \(sd', out)
            assert mean == pytest.approx(sum(runs) / 2, abs=1e-4)
    assert 'command: python benchmark.py --device cpu' in out


def test_reference_loss_is_the_project_loss_with_another_fgsm_step():
    """Same RNG draws, same batch: the same loss and the same parameter gradients.

    So the reference path differs from the project path only where it is meant
    to (data pipeline, precision, how the FGSM gradient is computed).
    """
    args = mixkl.parse_args('cifar10', ['--width', '8'])[0]
    torch.manual_seed(0)
    student = PreActResNet18(10, 8)
    teacher = mixkl.ConditionalEMA(student, args.ema_value)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    results = []
    for loss_fn, model in ((mixkl.mixkl_loss, student),
                           (benchmark.reference_mixkl_loss, copy.deepcopy(student))):
        np.random.seed(1)
        torch.manual_seed(1)
        model.train()
        loss, _, _ = loss_fn(args, model, teacher, x, y, 2.0, 1.0, 10)
        model.zero_grad(set_to_none=True)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (project_loss, project_grads), (reference_loss, reference_grads) = results
    torch.testing.assert_close(reference_loss, project_loss)
    for ours, theirs in zip(project_grads, reference_grads):
        torch.testing.assert_close(theirs, ours)


def test_torchvision_reads_the_files_load_cifar_reads(tmp_path):
    root = str(tmp_path)
    write_synthetic_cifar(root, 'cifar100', n_train=20, n_test=5, seed=3)
    x, y = load_cifar('cifar100', root, train=True, download=False, quiet=True)
    dataset = benchmark.UncheckedCIFAR100(root, train=True)
    assert np.array_equal(dataset.data, x.permute(0, 2, 3, 1).numpy())
    assert dataset.targets == y.tolist()
