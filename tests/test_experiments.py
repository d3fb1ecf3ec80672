"""The experiments: the baseline and the ablation flags, the overfitting alarm,
and the summary table (the curves: test_plots.py).

The end-to-end runs go through MIX_KL_CIFAR10.py on a tiny synthetic CIFAR-10;
the in-process tests show that each ablation flag really removes its loss term.
"""
import copy
import csv
import json
import os

import numpy as np
import pytest
import torch

import mixkl
import runs
import summarize as summarize_module
import training
from conftest import ROOT, run_script, table_rows, the_run_dir, write_results, write_run
from preactresnet import PreActResNet18
from synthetic import write_synthetic_cifar
from utils import DATASETS, load_model_weights, sha256_file

TINY_RUN = ['--epochs', '2', '--train-examples', '64', '--eval-examples', '32',
            '--batch-size', '32', '--width', '8', '--alarm-examples', '16']


# ---------------------------------------------------------------------------
# End to end: the baseline, FGSM-RS and every ablation train and save

@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return write_synthetic_cifar(str(tmp_path_factory.mktemp('data')), n_train=64, n_test=32,
                                 learnable=True)


def train(data_dir, out_dir, flags):
    """Run MIX_KL_CIFAR10.py on the tiny data; returns (run directory, config, metrics rows)."""
    result = run_script('MIX_KL_CIFAR10.py', '--data-dir', data_dir, '--out_dir', out_dir,
                        '--device', 'cpu', *TINY_RUN, *flags, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = the_run_dir(out_dir)
    with open(os.path.join(run_dir, 'config.json')) as f:
        config = json.load(f)
    with open(os.path.join(run_dir, 'metrics.csv'), newline='') as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return run_dir, config, rows


@pytest.fixture(scope='module')
def baseline(data_dir, tmp_path_factory):
    return train(data_dir, tmp_path_factory.mktemp('baseline'), [])


# flags, config entry it sets, epoch (1-based) whose training loss it must change
ABLATIONS = {
    'fgsm_rs': (['--method', 'fgsm_rs'], ('method', 'fgsm_rs'), 1),
    'no_mixup': (['--mixup-alpha', '0'], ('mixup_alpha', 0), 1),
    'no_kl': (['--lambda-kl-base', '0'], ('lambda_kl_base', 0), 1),
    'no_consistency': (['--lamda', '0'], ('lamda', 0), 1),
    'constant_tau': (['--tau-schedule', 'constant'], ('tau_schedule', 'constant'), 2),
    'zero_start': (['--delta-init', 'zero'], ('delta_init', 'zero'), 1),
}


# Flags of what an ablation removes: changing them must leave its run bitwise as it was.
# (which weights to compare, the flags)
IRRELEVANT = {
    'fgsm_rs': ('final_model.pth', ['--ema-value', '0.3', '--lamda', '3', '--mixup-alpha', '1']),
    'no_kl': ('student', ['--ema-value', '0.3']),  # the teacher changes, the student must not
    'no_consistency': ('final_model.pth', ['--con-reference', 'start']),
    'constant_tau': ('final_model.pth', ['--gamma', '0.5']),
}


STUDENT_COLUMNS = {'epoch', 'lr', 'train_loss', 'train_acc', 'tau', 'kl_weight', 'alarm_fgsm_acc',
                   'alarm_pgd_acc'}


def weights_of(run_dir, which):
    path = os.path.join(run_dir, which if which.endswith('.pth') else 'checkpoint.pth')
    state = torch.load(path, weights_only=True)
    return state if which.endswith('.pth') else state[which]


@pytest.mark.parametrize('name', ABLATIONS)
def test_ablation_trains_end_to_end(name, data_dir, baseline, tmp_path):
    flags, (key, value), changed_epoch = ABLATIONS[name]
    run_dir, config, rows = train(data_dir, tmp_path / 'run', flags)
    _, base_config, base_rows = baseline

    assert config[key] == value and base_config[key] != value
    assert [r['epoch'] for r in rows] == [1, 2]
    assert all(np.isfinite(r['train_loss']) for r in rows)
    for checkpoint in ('best_model.pth', 'final_model.pth'):
        model = load_model_weights(os.path.join(run_dir, checkpoint), 'cifar10')
        assert model.width == 8
    # Same seed, same data: the flag must reach the loss.
    epoch = changed_epoch - 1
    assert rows[epoch]['train_loss'] != base_rows[epoch]['train_loss']

    if name in IRRELEVANT:
        # The component is gone: the flags that only it reads change nothing.
        which, extra = IRRELEVANT[name]
        other_dir, _, other_rows = train(data_dir, tmp_path / 'other', flags + extra)
        a, b = weights_of(run_dir, which), weights_of(other_dir, which)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        # Every column but the times; without KL only the student's (the teacher differs).
        kept = STUDENT_COLUMNS if name == 'no_kl' else set(rows[0]) - {'seconds', 'eval_seconds'}
        assert [{k: r[k] for k in kept} for r in rows] == [{k: r[k] for k in kept}
                                                           for r in other_rows]
        if name == 'no_kl':
            assert [r['teacher_updates'] for r in rows] != [r['teacher_updates'] for r in other_rows]
    if name == 'fgsm_rs':
        assert config['alpha'] == 10 and base_config['alpha'] == 8
        assert all(r['teacher_updates'] == 0 for r in rows)
        assert same_state(weights_of(run_dir, 'student'), weights_of(run_dir, 'final_model.pth'))
    if name == 'no_kl':
        assert [r['kl_weight'] for r in rows] == [0, 0]
    if name == 'constant_tau':
        assert [r['tau'] for r in rows] == [2, 2]
        assert [r['kl_weight'] for r in rows] == [1, 1]
        assert [r['tau'] for r in base_rows] == [2, pytest.approx(1.98)]


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------
# In process: each flag removes exactly its component

def method_args(*flags):
    args, _ = training.parse_args('cifar10', ['--no-amp', *flags])
    return args


def small_batch(n=8):
    torch.manual_seed(1)
    return torch.rand(n, 3, 32, 32), torch.randint(0, 10, (n,))


def step_gradient(args, student, teacher, x, y):
    """The student's gradient in one mixkl_step (at lr 0), with the random draws fixed."""
    student = copy.deepcopy(student)  # BN running statistics must not carry over
    np.random.seed(0)
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(student.parameters(), lr=0)
    mixkl.mixkl_step(student, teacher, optimizer, x, y, training.hyperparameters(args), epoch=0)
    return torch.cat([p.grad.flatten() for p in student.parameters()])


def two_teachers(student):
    """The teacher of a fresh run, and one whose predictions differ."""
    teacher = mixkl.ConditionalEMA(student, 0.82)
    changed = mixkl.ConditionalEMA(student, 0.82)
    torch.manual_seed(2)
    with torch.no_grad():
        changed.model.linear.weight.add_(torch.randn_like(changed.model.linear.weight))
    return teacher, changed


@pytest.mark.parametrize('lambda_kl_base, teacher_matters', [('1', True), ('0', False)])
def test_kl_weight_zero_cuts_the_teacher_out(lambda_kl_base, teacher_matters):
    torch.manual_seed(0)
    student = PreActResNet18(10, width=8).train()
    args = method_args('--lambda-kl-base', lambda_kl_base)
    x, y = small_batch()
    # Fresh teachers for each step: a step may update its teacher.
    grad = step_gradient(args, student, two_teachers(student)[0], x, y)
    grad_other_teacher = step_gradient(args, student, two_teachers(student)[1], x, y)
    assert torch.equal(grad, grad_other_teacher) != teacher_matters


def probe_clean_forward(model):
    """Add a zero to the logits of the student's clean forward (the one without features).

    The zero is a leaf tensor: it receives a gradient exactly when the clean
    forward takes part in the loss. Returns it and the list of clean calls.
    """
    zero, calls = torch.zeros(1, 10, requires_grad=True), []

    def hook(module, args, kwargs, output):
        if kwargs.get('return_features'):
            return output
        calls.append(1)
        return output + zero

    model.register_forward_hook(hook, with_kwargs=True)
    return zero, calls


@pytest.mark.parametrize('lamda, clean_matters', [('12', True), ('0', False)])
def test_lamda_zero_cuts_the_clean_forward_out(lamda, clean_matters):
    torch.manual_seed(0)
    student = PreActResNet18(10, width=8).train()
    teacher = mixkl.ConditionalEMA(student, 0.82)
    zero, clean_calls = probe_clean_forward(student)
    x, y = small_batch()
    mixkl.mixkl_step(student, teacher, torch.optim.SGD(student.parameters(), lr=0), x, y,
                     training.hyperparameters(method_args('--lamda', lamda)), epoch=0)
    assert len(clean_calls) == 1, 'the clean forward runs either way: it decides teacher updates'
    reached = zero.grad is not None and zero.grad.abs().sum() > 0
    assert reached == clean_matters


def test_mixup_alpha_zero_keeps_images_and_one_hot_labels():
    x, y = small_batch()
    np.random.seed(0)
    xm, ym, lam = mixkl.mixup(x, y, 10, 0.0)
    assert torch.equal(xm, x) and lam == 1
    assert torch.equal(ym, torch.nn.functional.one_hot(y, 10).float())
    xm, ym, lam = mixkl.mixup(x, y, 10, 0.4)
    assert 0 < lam < 1 and not torch.equal(xm, x)
    assert (ym.max(1).values < 1).any()


def test_constant_tau_schedule_keeps_tau0():
    args = method_args('--tau-schedule', 'constant')
    hp = training.hyperparameters(args)
    taus = [mixkl.temperature(e, hp.tau0, hp.gamma, hp.tau_schedule) for e in range(110)]
    assert taus == [2.0] * 110
    assert {mixkl.kl_weight(t, hp.tau0, hp.lambda_kl_base) for t in taus} == {1.0}
    geometric = [mixkl.temperature(e, 2.0, 0.99) for e in (0, 1, 109)]
    assert geometric == pytest.approx([2.0, 1.98, 2.0 * 0.99 ** 109])


@pytest.mark.parametrize('delta_init', ['random', 'zero'])
def test_delta_init_zero_starts_the_fgsm_step_at_the_image(delta_init):
    torch.manual_seed(0)
    student = PreActResNet18(10, width=8).train()
    inputs = []
    student.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
    teacher = mixkl.ConditionalEMA(student, 0.82)
    hp = training.hyperparameters(method_args('--delta-init', delta_init, '--mixup-alpha', '0'))
    x, y = small_batch()
    mixkl.mixkl_step(student, teacher, torch.optim.SGD(student.parameters(), lr=0), x, y, hp, 0)
    start = inputs[0] - x  # the first forward is the FGSM step's
    if delta_init == 'zero':
        assert torch.equal(start, torch.zeros_like(x))
    else:
        inside = (x > 4 / 255) & (x < 1 - 4 / 255)  # where clipping to [0, 1] cannot bite
        assert torch.allclose(start[inside].abs(), torch.tensor(4 / 255), atol=1e-6)
    assert mixkl.random_start(x, 8 / 255, 'zero').abs().sum() == 0


# ---------------------------------------------------------------------------
# The catastrophic overfitting alarm

def history(fgsm, pgd):
    """Metrics rows with the given alarm accuracies (the other columns are filler)."""
    return [dict({k: 0.0 for k in runs.METRIC_FIELDS}, epoch=i + 1, alarm_fgsm_acc=f,
                 alarm_pgd_acc=p) for i, (f, p) in enumerate(zip(fgsm, pgd))]


def alarm_epochs(rows):
    """The epochs (1-based) after which the trainer's alarm fires."""
    return [n for n in range(1, len(rows) + 1)
            if runs.overfitting_alarm([r['alarm_fgsm_acc'] for r in rows[:n]],
                                       [r['alarm_pgd_acc'] for r in rows[:n]])]


def test_alarm_fires_when_pgd_collapses_while_fgsm_holds():
    # Catastrophic overfitting at epoch 5: PGD accuracy collapses, FGSM accuracy jumps.
    rows = history(fgsm=[0.40, 0.45, 0.48, 0.50, 0.85, 0.92],
                   pgd=[0.30, 0.34, 0.37, 0.39, 0.02, 0.00])
    assert alarm_epochs(rows) == [5, 6]


def test_alarm_is_silent_on_healthy_training():
    rows = history(fgsm=[0.40, 0.45, 0.48, 0.50, 0.49, 0.55],
                   pgd=[0.30, 0.34, 0.37, 0.39, 0.33, 0.41])
    assert alarm_epochs(rows) == []


@pytest.mark.parametrize('pgd_now, fgsm_now, fires', [
    (0.19, 0.50, True),   # PGD just below half its best (0.40), FGSM at half its best (0.50)
    (0.21, 0.90, False),  # PGD just above half its best
    (0.19, 0.49, False),  # FGSM just below half its best too: weaker, not masked
    (0.20, 0.50, False),  # PGD at exactly half its best: not below it
])
def test_the_alarm_fires_at_half_the_best_pgd_accuracy(pgd_now, fgsm_now, fires):
    rows = history(fgsm=[0.60, 1.00, fgsm_now], pgd=[0.30, 0.40, pgd_now])
    assert alarm_epochs(rows) == ([3] if fires else [])


def test_alarm_is_silent_when_fgsm_falls_too():
    # Both attacks succeed more: the model got weaker, not gradient-masked.
    rows = history(fgsm=[0.40, 0.45, 0.10], pgd=[0.30, 0.35, 0.05])
    assert alarm_epochs(rows) == []
    assert not runs.overfitting_alarm([], [])
    assert not runs.overfitting_alarm([0.0, 0.0], [0.0, 0.0])


# ---------------------------------------------------------------------------
# summarize.py

def summarize(*paths):
    """summarize.py as a user runs it."""
    result = run_script('summarize.py', *paths, cwd=ROOT)
    return result.returncode, result.stdout, result.stderr


def summarize_in_process(capsys, *paths):
    """summarize.main without a new interpreter (importing torch costs seconds)."""
    code = summarize_module.main([str(p) for p in paths])
    out, err = capsys.readouterr()
    return code, out, err


def test_summarize_table(tmp_path):
    # epoch: (seconds, eval seconds, clean, PGD); the best PGD is at epoch 2, not the last.
    base = write_run(tmp_path, 'base', [], [(50, 10, 0.60, 0.30), (50, 10, 0.70, 0.45),
                                            (50, 10, 0.75, 0.40)])
    ablation = write_run(tmp_path, 'no-kl', ['--lambda-kl-base', '0', '--no-amp', '--epochs', '3'],
                         [(30, 6, 0.50, 0.20)])
    fgsm = write_run(tmp_path, 'fgsm', ['--method', 'fgsm_rs', '--alpha', '8'],
                     [(20, 4, 0.80, 0.00)])
    eval_dir = tmp_path / 'eval'
    eval_dir.mkdir()
    write_results(eval_dir / 'results.json',
                  [(base / 'best_model.pth', sha256_file(base / 'best_model.pth'), 0.4123),
                   (base / 'final_model.pth', sha256_file(base / 'final_model.pth'), 0.3987)])
    # An evaluation inside the run directory, on 1000 images, found without being named.
    (ablation / 'eval').mkdir()
    write_results(ablation / 'eval' / 'results.json',
                  [(ablation / 'final_model.pth', sha256_file(ablation / 'final_model.pth'), 0.1)],
                  n=1000)

    code, out, err = summarize(base, ablation, fgsm, eval_dir)

    assert code == 0, err
    rows = table_rows(out)
    assert [r['run'] for r in rows] == ['base', 'no-kl', 'fgsm']
    assert rows[0] == {
        'run': 'base', 'dataset': 'cifar10', 'arch': 'preactresnet18', 'method': 'mixkl', 'changed flags': '(defaults)',
        'epochs': '3/110', 'best epoch': '2', 'best clean': '70.00%', 'best PGD': '45.00%',
        'final clean': '75.00%', 'final PGD': '40.00%', 'AA best': '41.23%',
        'AA final': '39.87%', 'checks warned': '0', 'minutes': '3.0'}
    assert rows[1]['changed flags'] == '--epochs 3 --lambda-kl-base 0 --no-amp'
    assert (rows[1]['epochs'], rows[1]['AA best'], rows[1]['AA final'], rows[1]['minutes']) == \
        ('1/3', '-', '10.00% (n=1000)', '0.6')
    # fgsm_rs's own default step is 10/255: 8 is a change; mixkl's 8 is not.
    assert (rows[2]['method'], rows[2]['changed flags']) == ('fgsm_rs', '--alpha 8')
    assert (rows[2]['best PGD'], rows[2]['final PGD']) == ('0.00%', '0.00%')


def test_an_autoattack_result_names_its_images_only_when_fewer_than_the_test_set():
    assert summarize_module.autoattack(dict(accuracy=0.4)) == '40.00%'  # n is not required
    assert summarize_module.autoattack(dict(accuracy=0.4, n=10000)) == '40.00%'
    assert summarize_module.autoattack(dict(accuracy=0.4, n=1000)) == '40.00% (n=1000)'
    assert summarize_module.autoattack(None) == '-'


def test_where_a_run_trained_and_found_its_data_is_not_a_changed_flag(tmp_path):
    run = write_run(tmp_path, 'run', ['--epochs', '3', '--device', 'cpu'], [(60, 0, 0.5, 0.25)],
                    resume='/r')
    config = runs.read_config(str(run))
    assert (config['device'], config['resume']) == ('cpu', '/r')
    assert summarize_module.changed_flags(config) == ['--epochs 3']


def test_steps_and_widths_that_follow_epsilon_and_the_architecture_are_not_changed_flags(
        tmp_path):
    run = write_run(tmp_path, 'run', ['--epsilon', '16'], [(60, 0, 0.5, 0.25)], arch='wrn34-10')
    config = runs.read_config(str(run))
    assert (config['width'], config['pgd_alpha']) == (10, 4)
    assert summarize_module.changed_flags(config) == ['--epsilon 16']


def test_a_run_named_with_a_trailing_slash_is_its_folders_name(tmp_path, capsys):
    run = write_run(tmp_path, 'run-a', [], [(60, 0, 0.5, 0.25)])
    code, out, err = summarize_in_process(capsys, f'{run}{os.sep}')
    assert code == 0, err
    assert [row['run'] for row in table_rows(out)] == ['run-a']


def test_summarize_shows_a_switch_by_its_flag_and_a_run_without_an_epoch_as_dashes(tmp_path,
                                                                                     capsys):
    started = write_run(tmp_path, 'started', ['--sync-bn', '--epochs', '5'], [])
    code, out, err = summarize_in_process(capsys, started)
    assert code == 0, err
    row, = table_rows(out)
    assert (row['changed flags'], row['epochs'], row['minutes']) == ('--epochs 5 --sync-bn', '0/5',
                                                                     '-')
    assert [row[k] for k in ('best epoch', 'best clean', 'best PGD', 'final clean',
                             'final PGD')] == ['-'] * 5


def test_summarize_needs_a_run_directory_not_only_evaluations(tmp_path, capsys):
    run = write_run(tmp_path, 'run', [], [(60, 0, 0.5, 0.25)])
    write_results(tmp_path / 'results.json', [(run / 'best_model.pth', '0' * 64, 0.3)])
    code, out, err = summarize_in_process(capsys, tmp_path / 'results.json')
    assert (code, out) == (2, '')
    assert err == 'error: no run directory among the arguments (a run directory holds ' \
                  'config.json)\n'


def test_summarize_counts_the_checks_that_warned(tmp_path, capsys):
    run = write_run(tmp_path, 'run', [], [(60, 0, 0.5, 0.25)])
    write_results(run / 'results.json', [(run / name, sha256_file(run / name), 0.3)
                                         for name in ('best_model.pth', 'final_model.pth')])
    report = json.loads((run / 'results.json').read_text())
    for entry, verdicts in zip(report['results'], (['warn', 'pass', 'warn'], ['warn'])):
        entry['checks'] = [dict(name=f'check {i}', verdict=v, numbers={}, meaning='.')
                           for i, v in enumerate(verdicts)]
    (run / 'results.json').write_text(json.dumps(report))
    # Only the final model evaluated yet: its warnings count all the same.
    final_only = write_run(tmp_path, 'final-only', [], [(60, 0, 0.5, 0.25)])
    write_results(final_only / 'results.json',
                  [(final_only / 'final_model.pth', sha256_file(final_only / 'final_model.pth'),
                    0.3)])
    report = json.loads((final_only / 'results.json').read_text())
    report['results'][0]['checks'] = [dict(name='check', verdict='warn', numbers={}, meaning='.')]
    (final_only / 'results.json').write_text(json.dumps(report))
    unevaluated = write_run(tmp_path, 'unevaluated', [], [(60, 0, 0.5, 0.25)])
    code, out, err = summarize_in_process(capsys, run, final_only, unevaluated)
    assert code == 0, err
    assert [r['checks warned'] for r in table_rows(out)] == ['3', '1', '-']


def test_summarize_ignores_evaluations_of_other_weights(tmp_path, capsys):
    run = write_run(tmp_path, 'run', [], [(60, 0, 0.5, 0.25)])
    # Evaluated, then best_model.pth was overwritten (training went on).
    write_results(tmp_path / 'results.json', [(run / 'best_model.pth', '0' * 64, 0.3)])
    code, out, err = summarize_in_process(capsys, run, tmp_path / 'results.json')
    assert code == 0, err
    assert table_rows(out)[0]['AA best'] == '-'
    assert 'changed after' in err


def test_summarize_finds_the_numbered_results_of_later_evaluations(tmp_path, capsys):
    # evaluate.py never overwrites results.json: a second evaluation writes results-2.json.
    run = write_run(tmp_path, 'run', [], [(60, 0, 0.5, 0.25)])
    digests = {name: sha256_file(run / name) for name in ('best_model.pth', 'final_model.pth')}
    (run / 'eval').mkdir()
    write_results(run / 'eval' / 'results.json',
                  [(run / 'best_model.pth', digests['best_model.pth'], 0.41)])
    write_results(run / 'eval' / 'results-2.json',
                  [(run / 'final_model.pth', digests['final_model.pth'], 0.39)])
    code, out, err = summarize_in_process(capsys, run)
    assert code == 0, err
    assert (table_rows(out)[0]['AA best'], table_rows(out)[0]['AA final']) == ('41.00%', '39.00%')
    # The same in a directory named on the command line.
    (run / 'eval').rename(tmp_path / 'elsewhere')
    code, out, err = summarize_in_process(capsys, run, tmp_path / 'elsewhere')
    assert code == 0, err
    assert (table_rows(out)[0]['AA best'], table_rows(out)[0]['AA final']) == ('41.00%', '39.00%')


def test_summarize_shows_the_dataset_and_the_architecture(tmp_path, capsys, monkeypatch):
    if 'tinyimagenet' not in DATASETS:  # the data side names it; only its flags matter here
        monkeypatch.setitem(DATASETS, 'tinyimagenet', dict(DATASETS['cifar10'], num_classes=200,
                                                           name='Tiny ImageNet'))
    old = write_run(tmp_path, 'old', [], [(60, 0, 0.5, 0.25)])
    config = json.loads((old / 'config.json').read_text())
    config.pop('arch', None)  # written before the trainer had --arch
    (old / 'config.json').write_text(json.dumps(config))
    wide = write_run(tmp_path, 'wide', [], [(60, 0, 0.5, 0.25)], arch='wrn34-10',
                     dataset='cifar100')
    tiny = write_run(tmp_path, 'tiny', [], [(60, 0, 0.5, 0.25)], arch='resnet18',
                     dataset='tinyimagenet')
    (wide / 'final_model.pth').write_bytes((wide / 'best_model.pth').read_bytes())
    # Evaluations with and without the arch entry; final_model.pth was not attacked again.
    write_results(tmp_path / 'results.json',
                  [(old / 'best_model.pth', sha256_file(old / 'best_model.pth'), 0.30),
                   (wide / 'best_model.pth', sha256_file(wide / 'best_model.pth'), 0.45),
                   (wide / 'final_model.pth', sha256_file(wide / 'final_model.pth'), 0.45)])
    report = json.loads((tmp_path / 'results.json').read_text())
    report['results'][1]['arch'] = report['results'][2]['arch'] = 'wrn34-10'
    report['results'][2]['same_as'] = report['results'][1]['checkpoint']
    (tmp_path / 'results.json').write_text(json.dumps(report))

    code, out, err = summarize_in_process(capsys, old, wide, tiny, tmp_path / 'results.json')

    assert code == 0, err
    rows = table_rows(out)
    assert list(rows[0])[:4] == ['run', 'dataset', 'arch', 'method']
    assert [(r['run'], r['dataset'], r['arch'], r['changed flags']) for r in rows] == [
        ('old', 'cifar10', 'preactresnet18', '(defaults)'),
        ('wide', 'cifar100', 'wrn34-10', '(defaults)'),
        ('tiny', 'tinyimagenet', 'resnet18', '(defaults)')]
    assert [(r['AA best'], r['AA final']) for r in rows] == [
        ('30.00%', '-'), ('45.00%', '45.00%'), ('-', '-')]


def test_summarize_reads_a_validation_run_and_prefers_the_evaluation_on_more_images(tmp_path,
                                                                                    capsys):
    run = write_run(tmp_path, 'val', ['--val-examples', '1000'],
                    [(60, 0, 0.5, 0.25), (60, 0, 0.6, 0.35), (60, 0, 0.7, 0.30)])
    # metrics.csv of a --val-examples run names its accuracies val_*.
    text = (run / 'metrics.csv').read_text().splitlines()
    text[0] = text[0].replace('test_', 'val_')
    (run / 'metrics.csv').write_text('\n'.join(text) + '\n')
    digest = sha256_file(run / 'best_model.pth')
    write_results(tmp_path / 'results.json', [(run / 'best_model.pth', digest, 0.2)], n=1000)
    write_results(tmp_path / 'results-2.json', [(run / 'best_model.pth', digest, 0.3)])
    code, out, err = summarize_in_process(capsys, run, tmp_path / 'results.json',
                                          tmp_path / 'results-2.json')
    assert code == 0, err
    row, = table_rows(out)
    assert (row['best epoch'], row['best clean'], row['best PGD'], row['final PGD']) == \
        ('2', '60.00%', '35.00%', '30.00%')
    assert row['AA best'] == '30.00%', 'the evaluation on 10000 images, not the one on 1000'


@pytest.mark.parametrize('problem, message', [
    ('missing', 'no such file or directory'),
    ('empty', 'neither a run directory (no config.json) nor an evaluation'),
    ('bad_json', 'config.json: not valid JSON'),
    ('not_a_config', 'config.json: not a JSON object of flags'),
    ('edited_config', "config.json: not the config.json of a training run (method 'mixk')"),
    ('deep_json', 'config.json: nested deeper than 32 levels'),
    ('nan_metrics', 'metrics.csv, line 2: not a finite number'),
    ('nan_results', 'results.json: not valid JSON (NaN is not a number'),
    ('big_results', 'results.json: the aa accuracy 1.5 is not a number in [0, 1]'),
    ('bad_column', "metrics.csv: no column test_pgd_acc"),
    ('bad_number', 'metrics.csv, line 2: not a number'),
    ('bad_results', 'results.json: not a results.json'),
    ('no_accuracy', 'results.json: not a results.json'),
])
def test_summarize_reports_bad_input_in_one_line(tmp_path, capsys, problem, message):
    run = write_run(tmp_path, 'run', [], [(60, 0, 0.5, 0.25)])
    extra = []
    if problem == 'missing':
        run = tmp_path / 'nope'
    elif problem == 'empty':
        run = tmp_path / 'empty'
        run.mkdir()
    elif problem == 'bad_json':
        (run / 'config.json').write_text('{"method": ')
    elif problem == 'not_a_config':
        (run / 'config.json').write_text('[1, 2]')
    elif problem == 'edited_config':
        config = json.loads((run / 'config.json').read_text())
        (run / 'config.json').write_text(json.dumps(dict(config, method='mixk')))
    elif problem == 'deep_json':
        (run / 'config.json').write_text('[' * 100000 + ']' * 100000)
    elif problem == 'nan_metrics':
        text = (run / 'metrics.csv').read_text().splitlines()
        (run / 'metrics.csv').write_text(text[0] + '\n' + text[1].replace('0.25', 'nan') + '\n')
    elif problem in ('nan_results', 'big_results'):
        write_results(run / 'results.json', [(run / 'best_model.pth', '0' * 64, 0.3)])
        (run / 'results.json').write_text((run / 'results.json').read_text().replace(
            '0.3', 'NaN' if problem == 'nan_results' else '1.5'))
    elif problem == 'bad_column':
        (run / 'metrics.csv').write_text('epoch,seconds,eval_seconds,test_clean_acc\n1,2,3,0.5\n')
    elif problem == 'bad_number':
        text = (run / 'metrics.csv').read_text().splitlines()
        (run / 'metrics.csv').write_text(text[0] + '\n' + text[1].replace('0.25', 'n/a') + '\n')
    elif problem == 'bad_results':
        (tmp_path / 'results.json').write_text('{"results": 3}')
        extra = [tmp_path / 'results.json']
    elif problem == 'no_accuracy':
        write_results(tmp_path / 'results.json', [(run / 'best_model.pth', '0' * 64, 0.3)])
        report = json.loads((tmp_path / 'results.json').read_text())
        del report['results'][0]['attacks']['aa']['accuracy']
        (tmp_path / 'results.json').write_text(json.dumps(report))
        extra = [tmp_path / 'results.json']
    code, out, err = summarize_in_process(capsys, run, *extra)
    assert len(err.strip().splitlines()) == 1 and err.startswith('error: ') and message in err
    assert code == 2 and 'nan' not in out.lower() and 'inf' not in out.lower()
    # A results.json named on its own is left out; the run is still shown without it.
    assert [r['run'] for r in table_rows(out)] == ['run'] if extra else out == ''


def spoil_results(run, what):
    path = run / 'results.json'
    write_results(path, [(run / 'best_model.pth', sha256_file(run / 'best_model.pth'), 0.4)])
    report = json.loads(path.read_text())
    entry = report['results'][0]
    if what == 'count':
        entry['attacks']['aa']['n'] = 'x'
    else:
        entry['checkpoint'] = 'a\u0000b'
    path.write_text(json.dumps(report))
    return path


def spoil_config(run, key, value):
    config = json.loads((run / 'config.json').read_text())
    config[key] = value
    (run / 'config.json').write_text(json.dumps(config))
    return run / 'config.json'


def spoil_metrics(run, column, value):
    text = (run / 'metrics.csv').read_text().splitlines()
    header, row = text[0].split(','), text[1].split(',')
    row[header.index(column)] = value
    (run / 'metrics.csv').write_text('\n'.join([text[0], ','.join(row), *text[2:]]) + '\n')
    return run / 'metrics.csv'


@pytest.mark.parametrize('spoil, message', [
    (lambda run: spoil_results(run, 'count'), 'the aa image count \'x\' is not a whole number'),
    (lambda run: spoil_results(run, 'path'), 'an entry whose checkpoint is not a path'),
    (lambda run: spoil_config(run, 'epsilon', '8'), 'not the config.json of a training run '
                                                    "(epsilon '8')"),
    (lambda run: spoil_config(run, 'arch', ['x']), "(arch ['x'])"),
    (lambda run: spoil_config(run, 'lr_max', 100), '(lr_max 100)'),
    (lambda run: spoil_metrics(run, 'test_clean_acc', '1e307'),
     'line 2: test_clean_acc not an accuracy in [0, 1]'),
    (lambda run: spoil_metrics(run, 'test_pgd_acc', '-0.5'),
     'line 2: test_pgd_acc not an accuracy in [0, 1]'),
], ids=['count', 'checkpoint', 'epsilon', 'arch', 'lr-max', 'huge accuracy', 'negative accuracy'])
def test_records_no_script_writes_leave_out_their_run_in_one_line(tmp_path, capsys, spoil,
                                                                   message):
    good = write_run(tmp_path, 'good', [], [(50, 10, 0.6, 0.3)])
    bad = write_run(tmp_path, 'bad', [], [(50, 10, 0.6, 0.3)])
    path = spoil(bad)
    code, out, err = summarize_in_process(capsys, good, bad)
    assert code == 2 and [row['run'] for row in table_rows(out)] == ['good']
    error, = err.strip().splitlines()
    assert error.startswith(f'error: {path}') and message in error, error
    assert 'nan%' not in out and 'inf%' not in out


def test_a_malformed_run_leaves_out_only_its_own_row(tmp_path, capsys):
    good = write_run(tmp_path, 'good', [], [(60, 0, 0.5, 0.25)])
    bad = write_run(tmp_path, 'bad', [], [(60, 0, 0.5, 0.25)])
    (bad / 'results.json').write_text('{"results": [{"checkpoint": "/r/best_model.pth", '
                                      '"attacks": {"aa": {"accuracy": 7}}}]}')
    code, out, err = summarize_in_process(capsys, good, bad)
    assert code == 2 and [r['run'] for r in table_rows(out)] == ['good']
    assert err.strip() == (f'error: {bad / "results.json"}: the aa accuracy 7 is not a number '
                           f'in [0, 1]; run {bad} left out')
