"""benchmark.py and bf16_check.py: they run end to end on CPU, print every figure, and compare
like with like.

The speed itself is not tested (it is a script, not a timed test); the runs
here are tiny: one step of batch 8 at width 8.
"""
import copy
import re
import resource
import statistics
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import benchmark
import bf16_check
import mixkl
import training
from conftest import ROOT, run_script
from preactresnet import PreActResNet18
from synthetic import write_synthetic_cifar
from utils import load_cifar

TINY = ['--device', 'cpu', '--batch-size', '8', '--width', '8', '--eval-images', '8']


def run_benchmark(*flags):
    result = run_script('benchmark.py', *TINY, *flags, cwd=ROOT, timeout=120)
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
    evaluation = figure(r'^PGD-10 eval: +([\d.]+) images/s', out)
    # 110 epochs, each 50,000 training images and PGD-10 on 10,000 test images, at those rates
    # (printed to two decimals, so within 1%).
    for name, rate in (('project', project), ('reference', reference)):
        hours = figure(rf'^  {name} path: +([\d.]+) h', out)
        assert hours == pytest.approx(110 * (50_000 / rate + 10_000 / evaluation) / 3600, rel=0.01)
        per_epoch = re.search(rf'^  {name} path: .*per epoch (\d+) s training \+ (\d+) s '
                              'evaluation', out, re.MULTILINE)
        assert float(per_epoch[1]) == pytest.approx(50_000 / rate, rel=0.01, abs=1)
        assert float(per_epoch[2]) == pytest.approx(10_000 / evaluation, rel=0.01, abs=1)
    assert figure(r'^peak memory: +(\d+) MiB peak RSS', out) > 0
    assert 'device:  ' in out and f'torch:   {torch.__version__}' in out
    assert 'command: python benchmark.py --device cpu' in out


@pytest.mark.parametrize('method,paths', [('mixkl', ['project', 'reference']),
                                          ('fgsm_rs', ['project'])])
def test_benchmark_times_the_steps_and_settings_it_is_given(capsys, monkeypatch, method, paths):
    settings, timed = [], []
    real_settings, real_time = benchmark.step_settings, benchmark.time_interleaved

    def step_settings(args, amp):
        settings.append(real_settings(args, amp))
        return settings[-1]

    def time_interleaved(steps, warmup, n, device):
        timed.append((list(steps), warmup, n))
        return real_time(steps, warmup, n, device)
    monkeypatch.setattr(benchmark, 'step_settings', step_settings)
    monkeypatch.setattr(benchmark, 'time_interleaved', time_interleaved)
    benchmark.main(['--device', 'cpu', '--batch-size', '4', '--width', '8', '--eval-images', '6',
                    '--steps', '2', '--warmup', '1', '--method', method, '--amp', '--seed', '5',
                    '--dataset', 'cifar100', '--arch', 'resnet18'])
    out = capsys.readouterr().out
    assert timed == [(paths, 1, 2)]
    # The project path in bf16 when asked, the reference path in fp32; both the flags' run.
    (project, project_hp), (reference, reference_hp) = settings
    assert (project_hp.amp, reference_hp.amp) == (True, False)
    for args, hp in settings:
        assert (args.batch_size, args.width, args.arch, args.method, args.seed, args.dataset,
                hp.num_classes) == (4, 8, 'resnet18', method, 5, 'cifar100', 100)
    assert '2 timed steps per path after 1 warm-up, batch 4, resnet18 width 8' in out
    assert 'PGD-10 eval:' in out and '(6 images at full cost' in out
    assert figure(r'PGD accuracy ([\d.]+)', out) == 1.0, 'no image broken: every step taken'
    # On CPU: this process's peak RSS (ru_maxrss, KiB on Linux) in MiB, printed to the nearest
    # MiB (so compared rounded as well); torch alone takes more than 100 MiB.
    peak = figure(r'^peak memory: +(\d+) MiB peak RSS', out)
    assert 100 < peak <= round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10)


def test_benchmark_check_runs_bf16_check_with_both_precisions_for_each_seed(capsys, monkeypatch):
    trainers, evaluated = [], []  # each run's trainer; each model the check evaluated

    def check_run(*args):
        trainers.append(real_check_run(*args))
        return trainers[-1]

    def evaluate_robustness(model, *args):
        evaluated.append(model)
        return real_evaluate_robustness(model, *args)
    real_check_run, real_evaluate_robustness = bf16_check.check_run, bf16_check.evaluate_robustness
    monkeypatch.setattr(bf16_check, 'check_run', check_run)
    monkeypatch.setattr(bf16_check, 'evaluate_robustness', evaluate_robustness)
    # In this process: a second interpreter would pay torch's import again.
    benchmark.main([*TINY, '--check', '--check-epochs', '1', '--check-width', '8',
                    '--check-train-images', '16', '--check-seeds', '2', '--seed', '3',
                    '--check-lr-max', '0.03'])
    out = capsys.readouterr().out
    assert re.search(r'^check: 1 epochs, lr 0.03, batch 8, width 8, .* seeds 3\.\.4$', out,
                     re.MULTILINE)
    # Each run trained from its own seed, in its precision; its student is evaluated and its
    # teacher reported from the training's own last evaluation.
    printed = [(int(seed), amp == 'on ') for seed, amp in
               re.findall(r'^seed (\d+) amp (on |off): ', out, re.MULTILINE)]
    assert printed == [(3, True), (3, False), (4, True), (4, False)]
    assert [(t.args.seed, t.args.amp) for t in trainers] == printed
    assert {(t.args.epochs, t.args.width, t.args.lr_max, t.args.batch_size,
             t.args.eval_batch_size) for t in trainers} == {(1, 8, 0.03, 8, 512)}
    # --check-train-images 16 and --eval-images 8: the synthetic data each run trains on.
    assert {(len(t.train_loader.labels), len(t.eval_loader.labels)) for t in trainers} == {(16, 8)}
    assert len(evaluated) == 4 and all(m is t.student for m, t in zip(evaluated, trainers))
    for t in trainers:
        amp = 'on ' if t.args.amp else 'off'
        teacher = figure(rf'^seed {t.args.seed} amp {amp}: .*teacher clean ([\d.]+)', out)
        assert teacher == round(t.history[-1]['test_clean_acc'], 4)
    for amp in ('on ', 'off'):
        for model in ('student', 'teacher'):
            runs = [figure(rf'^seed {seed} amp {amp}: .*{model} clean ([\d.]+)', out)
                    for seed in (3, 4)]
            assert all(0 <= accuracy <= 1 for accuracy in runs)
            mean = figure(rf'^mean amp {amp}: .*{model} clean ([\d.]+) \(sd', out)
            assert mean == pytest.approx(sum(runs) / 2, abs=1e-4)
            sd = figure(rf'^mean amp {amp}: .*{model} clean [\d.]+ \(sd ([\d.]+)\)', out)
            assert sd == pytest.approx(statistics.stdev(runs), abs=1e-4)
    assert 'command: python bf16_check.py --device cpu' in out


def test_reference_step_is_the_project_step_with_another_fgsm_step():
    """Same RNG draws, same batch: the same loss, parameter gradients and teacher.

    So the reference path differs from the project path only where it is meant
    to (data pipeline, precision, how the FGSM gradient is computed).
    """
    hp = training.hyperparameters(training.parse_args('cifar10', ['--no-amp'])[0])
    torch.manual_seed(0)
    model = PreActResNet18(10, 8)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    results, teacher_inputs = [], []
    for step in (mixkl.mixkl_step, benchmark.reference_step):
        student = copy.deepcopy(model).train()
        teacher = mixkl.ConditionalEMA(student, hp.ema_value)
        seen = []  # the images the teacher is given: xm + delta, in both steps
        teacher.model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
        teacher_inputs.append(seen)
        optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
        np.random.seed(1)
        torch.manual_seed(1)
        result = step(student, teacher, optimizer, x, y, hp, epoch=3)
        results.append((result, [p.grad for p in student.parameters()], teacher.model.state_dict()))
    (project, project_grads, project_teacher), (reference, reference_grads, reference_teacher) = \
        results
    assert reference.loss == pytest.approx(project.loss, rel=1e-6)
    (project_seen,), (reference_seen,) = teacher_inputs
    torch.testing.assert_close(reference_seen, project_seen)
    assert (reference.correct, reference.teacher_updated) == (project.correct,
                                                               project.teacher_updated)
    for ours, theirs in zip(project_grads, reference_grads):
        torch.testing.assert_close(theirs, ours)
    for k in project_teacher:
        torch.testing.assert_close(reference_teacher[k], project_teacher[k])


def test_both_steps_count_the_examples_their_adversarial_images_leave_correct():
    """Without mixup, labelled by the network itself: every clean image is correct, and a
    step of 32/255 breaks some. The reference step counts those left, as the project's does."""
    args = training.parse_args('cifar10', ['--no-amp', '--mixup-alpha', '0', '--epsilon', '32',
                                           '--alpha', '32'])[0]
    hp = training.hyperparameters(args)
    torch.manual_seed(0)
    model = PreActResNet18(10, 8).train()
    x = torch.rand(16, 3, 32, 32)
    y = model(x).argmax(1)
    counts = []
    for step in (mixkl.mixkl_step, benchmark.reference_step):
        student = copy.deepcopy(model).train()
        teacher = mixkl.ConditionalEMA(student, hp.ema_value)
        optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
        torch.manual_seed(1)
        counts.append(step(student, teacher, optimizer, x, y, hp, epoch=3).correct)
    assert counts[0] == counts[1] < 16


def test_torchvision_reads_the_files_load_cifar_reads(tmp_path):
    root = str(tmp_path)
    write_synthetic_cifar(root, 'cifar100', n_train=20, n_test=5, seed=3)
    x, y = load_cifar('cifar100', root, train=True, download=False, quiet=True)
    dataset = benchmark.UncheckedCIFAR100(root, train=True)
    assert np.array_equal(dataset.data, x.permute(0, 2, 3, 1).numpy())
    assert dataset.targets == y.tolist()


@pytest.mark.parametrize('argv,message', [
    (['--chec'], 'unrecognized arguments: --chec'),  # never taken for --check, nor ignored
    (['--check', '--steps', '2'],
     'benchmark.py --check: error: unrecognized arguments: --steps 2'),
    (['--check', '--amp'], 'benchmark.py --check: error: unrecognized arguments: --amp'),
    (['--check-epochs', '1'], 'unrecognized arguments: --check-epochs 1'),
    (['--check', '--dataset', 'tinyimagenet'], "argument --dataset: invalid choice: 'tinyimagenet'"),
    (['--eval-images', '0'], 'argument --eval-images: 0 must be >= 1'),
    (['--check', '--train-images', '0'], 'argument --train-images/--check-train-images: 0 must'),
])
def test_benchmark_and_its_check_refuse_each_others_flags_in_one_line(capsys, monkeypatch,
                                                                       argv, message):
    def ran(*args):
        raise AssertionError('a refused command line ran')
    monkeypatch.setattr(benchmark, 'run_benchmark', ran)
    monkeypatch.setattr(bf16_check, 'run_check', ran)
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(['--device', 'cpu', *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    error, = [line for line in err.splitlines() if 'error' in line]
    assert message in error


def test_the_synthetic_images_the_benchmark_writes_count_its_warmup_steps_too(capsys):
    # 1,000,000 images at most: 100 warmup + 9,900 timed steps of 100 just fit.
    args = benchmark.parse_args(['--warmup', '100', '--steps', '9900', '--batch-size', '100'])
    assert (args.warmup + args.steps) * args.batch_size == benchmark.MAX_SYNTHETIC_IMAGES
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(['--warmup', '101', '--steps', '9900', '--batch-size', '100'])
    assert exit_info.value.code == 2
    assert '--warmup 101 and --steps 9900 of --batch-size 100 would need more than 1,000,000 ' \
        'synthetic training images' in capsys.readouterr().err


def test_bf16_check_offers_only_the_datasets_it_can_run(capsys):
    with pytest.raises(SystemExit):
        bf16_check.parse_args(['--help'])
    assert '{cifar10,cifar100}' in capsys.readouterr().out


@pytest.mark.parametrize('amp', [True, False])
def test_each_check_run_is_the_training_script_with_the_checks_settings(tmp_path, monkeypatch,
                                                                        amp):
    made = []

    class Recorded:
        def __init__(self, args, parser):
            made.append(args)

        def fit(self):
            return 0
    monkeypatch.setattr(training, 'Trainer', Recorded)
    args = bf16_check.parse_args(['--dataset', 'cifar100', '--epochs', '2', '--batch-size', '8',
                                  '--eval-batch-size', '4', '--width', '8', '--lr-max', '0.03'])
    bf16_check.check_run(args, torch.device('cpu'), str(tmp_path), 7, amp)
    a, = made
    assert (a.dataset, a.epochs, a.batch_size, a.eval_batch_size, a.width, a.lr_max, a.seed,
            a.amp, a.data_dir, a.device) == ('cifar100', 2, 8, 4, 8, 0.03, 7, amp,
                                             str(tmp_path), 'cpu')
    assert a.out_dir == str(tmp_path / 'runs'), 'in the folder the check removes'


def test_the_check_reports_each_runs_student_and_its_teacher_after_the_last_epoch(
        tmp_path, monkeypatch, capsys):
    def run(args, device, root, seed, amp):
        last = dict(test_clean_acc=0.5 + seed / 100 + 0.1 * amp, test_pgd_acc=0.25)
        return SimpleNamespace(student=None, eval_loader=SimpleNamespace(batches=lambda: []),
                               history=[dict(test_clean_acc=0.1, test_pgd_acc=0.05), last])
    monkeypatch.setattr(bf16_check, 'check_run', run)
    attacks, written = [], []
    monkeypatch.setattr(bf16_check, 'evaluate_robustness',
                        lambda *args: attacks.append(args[2:]) or (0.75, 0.375))
    monkeypatch.setattr(bf16_check, 'write_synthetic_cifar',
                        lambda root, dataset, **kwargs: written.append((dataset, kwargs)))
    bf16_check.run_check(bf16_check.parse_args(['--seeds', '2', '--seed', '3', '--train-images',
                                                '16', '--eval-images', '8']),
                         torch.device('cpu'), str(tmp_path))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split('  (')[0] for line in lines if line.startswith('seed 3')] == [
        'seed 3 amp on : student clean 0.7500, PGD-10 0.3750; teacher clean 0.6300, PGD-10 0.2500',
        'seed 3 amp off: student clean 0.7500, PGD-10 0.3750; teacher clean 0.5300, PGD-10 0.2500']
    assert 'mean amp off: student clean 0.7500 (sd 0.0000), PGD-10 0.3750 (sd 0.0000); ' \
           'teacher clean 0.5350 (sd 0.0071), PGD-10 0.2500 (sd 0.0000)' in lines
    # The student's PGD-10 is the teacher's: 8/255, step 2/255; on data a network can learn.
    assert attacks == [(8 / 255, 2 / 255, 10)] * 4
    assert written == [('cifar10', dict(n_train=16, n_test=8, seed=3, learnable=True))]


def stubbed_benchmark(monkeypatch, made):
    """run_benchmark with its data, models, steps and timings stood in for; ``made`` records
    the synthetic data it writes, the models it builds and the settings it runs."""
    monkeypatch.setattr(benchmark, 'write_synthetic_cifar',
                        lambda root, dataset, **kwargs: made.append(('data', dataset, kwargs)))
    monkeypatch.setattr(benchmark, 'build_models', lambda targs, device, channels_last:
                        made.append(('models', targs.amp, channels_last)))
    monkeypatch.setattr(benchmark, 'project_steps', lambda *args: 'project')
    monkeypatch.setattr(benchmark, 'reference_steps', lambda *args: 'reference')
    monkeypatch.setattr(benchmark, 'time_interleaved', lambda paths, warmup, n, device: (
        {name: 100.0 for name in paths}, {name: 1.0 for name in paths}))
    monkeypatch.setattr(benchmark, 'pgd_eval_rate', lambda *args: (1000.0, 1.0))
    monkeypatch.setattr(benchmark, 'peak_memory_mib', lambda device: 2.0)


def test_the_benchmark_writes_its_warmup_and_timed_steps_images_and_builds_as_cuda_trains(
        tmp_path, monkeypatch, capsys):
    made = []
    stubbed_benchmark(monkeypatch, made)
    args = benchmark.parse_args(['--warmup', '3', '--steps', '2', '--batch-size', '4',
                                 '--eval-images', '6', '--seed', '7', '--amp'])
    benchmark.run_benchmark(args, torch.device('cuda'), str(tmp_path))
    assert made == [('data', 'cifar10', dict(n_train=20, n_test=6, seed=7)),
                    ('models', True, True), ('models', False, False)]


@pytest.mark.parametrize('flags, amp', [([], True), (['--no-amp'], False)])
def test_the_benchmarks_project_path_is_bf16_on_cuda_unless_told_otherwise(
        monkeypatch, capsys, flags, amp):
    made = []
    stubbed_benchmark(monkeypatch, made)
    monkeypatch.setattr(benchmark, 'resolve_device', lambda name: torch.device('cuda'))
    monkeypatch.setattr(benchmark, 'print_header', lambda *args: None)
    benchmark.main(['--steps', '1', *flags])
    assert made[1] == ('models', amp, True)


def test_each_path_is_timed_and_its_peak_memory_taken_over_its_own_steps(monkeypatch):
    clock, memory, closed = [0.0], [0], []
    monkeypatch.setattr(benchmark, 'synchronize', lambda device: None)
    monkeypatch.setattr(benchmark, 'reset_peak_memory', lambda device: memory.__setitem__(0, 0))
    monkeypatch.setattr(benchmark, 'peak_memory_mib', lambda device: memory[0])
    monkeypatch.setattr(benchmark.time, 'perf_counter', lambda: clock[0])

    def steps(name, seconds, peaks):  # peaks: of the warm-up step, then of each timed one
        try:
            for peak in peaks:
                clock[0] += seconds
                memory[0] = max(memory[0], peak)
                yield 4
        finally:
            closed.append(name)
    paths = {'project': steps('project', 1.0, [500, 50, 100, 60]),
             'reference': steps('reference', 2.0, [10, 300, 200, 250])}
    rates, peaks = benchmark.time_interleaved(paths, 1, 3, SimpleNamespace(type='cuda'))
    assert rates == {'project': 4.0, 'reference': 2.0}
    assert peaks == {'project': 100, 'reference': 300}
    assert closed == ['project', 'reference']


def test_the_defaults_of_the_benchmark_and_its_check():
    # Those BENCHMARKS.md reports, and the trainer's evaluation batch.
    a = benchmark.parse_args([])
    assert (a.steps, a.warmup, a.batch_size, a.eval_images, a.eval_batch_size, a.width) == \
        (50, 5, 128, 1024, 512, 64)
    c = bf16_check.parse_args([])
    assert (c.seeds, c.epochs, c.lr_max, c.width, c.train_images, c.eval_images,
            c.batch_size) == (3, 8, 0.02, 16, 2048, 1024, 128)


def test_the_timed_evaluation_is_pgd10_in_eval_batches(tmp_path, monkeypatch):
    write_synthetic_cifar(str(tmp_path), 'cifar10', n_train=4, n_test=6, seed=0)
    seen = []
    monkeypatch.setattr(benchmark, 'pgd_attack', lambda *args: args)
    monkeypatch.setattr(benchmark, 'evaluate_batches', lambda model, batches, attack: seen.append(
        ([len(X) for X, _ in batches], attack)) or (6, 6))
    args = benchmark.parse_args(['--eval-images', '6', '--eval-batch-size', '4', '--width', '8',
                                 '--warmup', '0'])
    benchmark.pgd_eval_rate(args, str(tmp_path), torch.device('cpu'))
    assert seen == [([4, 2], (8 / 255, 2 / 255, 10, 1))]  # one restart, as training evaluates


def test_the_project_path_draws_its_batches_as_the_trainer_does(tmp_path, monkeypatch):
    write_synthetic_cifar(str(tmp_path), 'cifar10', n_train=8, n_test=4, seed=0)
    made = []

    class Made(Exception):
        pass

    def loader(x, y, batch_size, device, **kwargs):
        made.append((len(x), batch_size, kwargs))
        raise Made  # nothing to time here: the loader's settings are the point
    monkeypatch.setattr(benchmark, 'CifarLoader', loader)
    targs = SimpleNamespace(dataset='cifar10', batch_size=4, seed=7, method='mixkl')
    with pytest.raises(Made):
        next(benchmark.project_steps(targs, None, None, str(tmp_path), torch.device('cpu')))
    assert made == [(8, 4, dict(train=True, seed=7))]  # shuffled, cropped and flipped
