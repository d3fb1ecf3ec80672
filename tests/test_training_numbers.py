"""Training's numbers recomputed independently: metrics.csv, best_model.pth, the held-out split.

A run is trained in process (``training.main``, as the scripts call it), recording
only where each per-epoch evaluation started: the random state, the model it was
given and the images. From those the test computes every accuracy metrics.csv
should hold with its own attack calls and its own reading of the data files, and
checks which checkpoint became best_model.pth. The evaluation script is then run
on the same checkpoints and images.
"""
import copy
import csv
import json
import os
import pickle

import numpy as np
import pytest
import torch

import mixkl
import runs
import summarize
import training
from conftest import load_weights, run_script, same_weights, the_run_dir
from synthetic import write_synthetic_cifar
from utils import NonFiniteLogits, attack_fgsm, attack_pgd

EPS = 8 / 255
# Explicit steps, unlike the defaults: the training step (0.5/255) is far weaker than the
# per-epoch evaluation's (2/255), so using one for the other changes the numbers.
RUN_FLAGS = ['--epochs', '3', '--seed', '0', '--lr-max', '0.05', '--batch-size', '32',
             '--width', '8', '--alarm-examples', '64', '--eval-batch-size', '64',
             '--epsilon', '8', '--alpha', '0.5', '--pgd-alpha', '2', '--pgd-iters', '10',
             '--no-augment', '--ema-value', '1', '--device', 'cpu']


def cifar_split(data_dir, train):
    """(images float in [0, 1], labels) read straight from the pickles the test wrote."""
    folder = os.path.join(data_dir, 'cifar-10-batches-py')
    names = [f'data_batch_{i}' for i in range(1, 6)] if train else ['test_batch']
    batches = [pickle.load(open(os.path.join(folder, name), 'rb')) for name in names]
    data = np.concatenate([b['data'] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([b['labels'] for b in batches])
    return torch.from_numpy(data).float() / 255, torch.from_numpy(labels).long()


def train_in_process(argv, status=0):
    """training.main as MIX_KL_CIFAR10.py calls it; fails unless it exits with ``status``."""
    with pytest.raises(SystemExit) as exit_info:
        training.main('cifar10', [str(a) for a in argv])
    assert exit_info.value.code == status


def accuracy(model, X, y, attack=None):
    model.eval()
    if attack is not None:
        X = X + attack(model, X, y)
    with torch.no_grad():
        return (model(X).argmax(1) == y).float().mean().item()


def pgd(epsilon, alpha, iters):
    return lambda m, X, y: attack_pgd(m, X, y, epsilon, alpha, iters, 1)


def model_of(state):
    model = training.build_model('preactresnet18', 'cifar10', 8, 'cpu', False)
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope='module')
def recorded_run(tmp_path_factory):
    """A 3-epoch MIX-KL run with, per epoch, what its evaluation started from.

    Each record: the torch random state when the evaluation began and when the
    overfitting alarm began (right after it), the model evaluated (the teacher),
    its images, and the student after that epoch (checkpoint.pth, read when the
    next evaluation starts, or at the end).
    """
    work = tmp_path_factory.mktemp('recorded')
    data = write_synthetic_cifar(str(work / 'data'), 'cifar10', n_train=256, n_test=64, seed=2,
                                 learnable=True)
    records, real = [], training.evaluate_robustness
    steps, real_step = [], mixkl.STEPS['mixkl']

    def recording_step(student, teacher, optimizer, x, y, hp, epoch):
        result = real_step(student, teacher, optimizer, x, y, hp, epoch)
        steps.append((epoch, result))
        return result

    def recording(model, batches, *args, **kwargs):
        batches = list(batches)
        out = work / 'out'
        if records:  # the checkpoint of the epoch before holds that epoch's student
            checkpoint = load_weights(os.path.join(the_run_dir(out), 'checkpoint.pth'))
            records[-1]['student'] = checkpoint['student']
        record = dict(rng=torch.get_rng_state(), model=copy.deepcopy(model.state_dict()),
                      batches=[(X.clone(), y.clone()) for X, y in batches])
        result = real(model, batches, *args, **kwargs)
        record['alarm_rng'] = torch.get_rng_state()
        records.append(record)
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, 'evaluate_robustness', recording)
        patch.setitem(mixkl.STEPS, 'mixkl', recording_step)
        train_in_process(['--data-dir', data, '--out_dir', work / 'out', *RUN_FLAGS])
    run_dir = the_run_dir(work / 'out')
    records[-1]['student'] = load_weights(os.path.join(run_dir, 'checkpoint.pth'))['student']
    with open(os.path.join(run_dir, 'metrics.csv'), newline='') as f:
        rows = list(csv.DictReader(f))
    for record, epoch in zip(records, range(len(records))):
        record['steps'] = [result for e, result in steps if e == epoch]
    return data, run_dir, rows, records, work


def test_the_training_columns_add_up_the_steps_of_each_epoch(recorded_run):
    _, _, rows, records, _ = recorded_run
    for row, record in zip(rows, records):
        results = record['steps']
        assert len(results) == 8, '256 images in batches of 32'
        loss = correct = n = 0
        for result in results:  # summed in the order the trainer sums them
            loss, correct, n = loss + result.loss * result.n, correct + result.correct, n + result.n
        assert (float(row['train_loss']), float(row['train_acc'])) == (loss / n, correct / n)
        assert int(row['teacher_updates']) == sum(r.teacher_updated for r in results)
    assert len({row['train_acc'] for row in rows}) > 1


def test_the_temperature_and_kl_weight_columns_follow_the_schedule_of_each_epoch(recorded_run):
    _, run_dir, rows, _, _ = recorded_run
    config = json.load(open(os.path.join(run_dir, 'config.json')))
    tau0, gamma, base = config['tau0'], config['gamma'], config['lambda_kl_base']
    assert gamma < 1 and len(rows) == 3
    for epoch, row in enumerate(rows):
        tau = mixkl.temperature(epoch, tau0, gamma, config['tau_schedule'])
        assert float(row['tau']) == pytest.approx(tau, rel=1e-9)
        assert float(row['kl_weight']) == pytest.approx(mixkl.kl_weight(tau, tau0, base),
                                                        rel=1e-9)


def test_the_per_epoch_evaluation_is_pgd_with_the_pgd_alpha_on_the_test_images(recorded_run):
    data, run_dir, rows, records, _ = recorded_run
    X, y = cifar_split(data, train=False)
    assert len(rows) == len(records) == 3
    differs = 0
    for row, record in zip(rows, records):
        # The images evaluated are the test set's pixels / 255, in order, in one batch.
        (X_seen, y_seen), = record['batches']
        assert torch.equal(X_seen, X) and torch.equal(y_seen, y)
        model = model_of(record['model'])
        assert float(row['test_clean_acc']) == accuracy(model, X, y)
        torch.set_rng_state(record['rng'])
        assert float(row['test_pgd_acc']) == accuracy(model, X, y, pgd(EPS, 2 / 255, 10))
        torch.set_rng_state(record['rng'])
        differs += float(row['test_pgd_acc']) != accuracy(model, X, y, pgd(EPS, 0.5 / 255, 10))
    assert differs, 'the training step would have given other numbers'


def test_best_model_is_the_teacher_of_the_epoch_with_the_best_pgd_accuracy(recorded_run):
    _, run_dir, rows, records, _ = recorded_run
    pgd_accs = [float(row['test_pgd_acc']) for row in rows]
    best = pgd_accs.index(max(pgd_accs))  # the first epoch reaching the best
    assert best < len(rows) - 1, 'the run is chosen so that the best epoch is not the last'
    assert same_weights(os.path.join(run_dir, 'best_model.pth'), records[best]['model'])
    assert same_weights(os.path.join(run_dir, 'final_model.pth'), records[-1]['model'])
    assert not same_weights(os.path.join(run_dir, 'best_model.pth'), records[-1]['model'])
    checkpoint = load_weights(os.path.join(run_dir, 'checkpoint.pth'))
    assert same_weights(checkpoint['teacher'], records[-1]['model'])
    assert checkpoint['best_pgd'] == max(pgd_accs)


def test_the_alarm_columns_are_fgsm_and_pgd_of_the_student_on_the_first_training_images(
        recorded_run):
    data, _, rows, records, _ = recorded_run
    X, y = cifar_split(data, train=True)
    X, y = X[:64], y[:64]  # --alarm-examples 64
    differs = 0
    for row, record in zip(rows, records):
        student = model_of(record['student'])
        fgsm = accuracy(student, X, y, lambda m, X_, y_: attack_fgsm(m, X_, y_, EPS))
        torch.set_rng_state(record['alarm_rng'])
        pgd_acc = accuracy(student, X, y, pgd(EPS, 2 / 255, 10))
        assert (float(row['alarm_fgsm_acc']), float(row['alarm_pgd_acc'])) == (fgsm, pgd_acc)
        differs += fgsm != pgd_acc
    assert differs, 'the columns could not be told apart'


def test_the_evaluation_script_reproduces_the_runs_numbers(recorded_run):
    data, run_dir, rows, records, work = recorded_run
    result = run_script('test_cifar10.py', '--model_path', run_dir, '--data-dir', data,
                        '--out_dir', work / 'eval', '--n_ex', 64, '--attacks', 'clean,pgd10',
                        '--epsilon', 8, '--alpha', 2, '--restarts', 1, '--seed', 0,
                        '--device', 'cpu', '--no-checks', cwd=work)
    assert result.returncode == 0, result.stderr
    report = json.load(open(work / 'eval' / 'results.json'))
    X, y = cifar_split(data, train=False)
    pgd_accs = [float(row['test_pgd_acc']) for row in rows]
    best = pgd_accs.index(max(pgd_accs))
    for entry, epoch in zip(report['results'], (best, len(rows) - 1)):
        model = model_of(load_weights(entry['checkpoint']))
        assert entry['attacks']['clean']['accuracy'] == float(rows[epoch]['test_clean_acc'])
        torch.manual_seed(0)
        assert entry['attacks']['pgd10']['accuracy'] == accuracy(model, X, y, pgd(EPS, 2 / 255, 10))


def test_the_first_epoch_reaching_the_best_pgd_accuracy_gives_best_model(tmp_path, monkeypatch):
    """Ties keep the earlier epoch, as summarize.py reads metrics.csv."""
    write_synthetic_cifar(str(tmp_path / 'data'), 'cifar10', n_train=32, n_test=16, seed=2)
    scripted = iter([(0.5, 0.2), (0.6, 0.3), (0.7, 0.3)])  # (clean, PGD) after epochs 1-3
    evaluated = []

    def scripted_evaluation(model, batches, *args, **kwargs):
        evaluated.append(copy.deepcopy(model.state_dict()))
        return next(scripted)
    monkeypatch.setattr(training, 'evaluate_robustness', scripted_evaluation)
    train_in_process(['--data-dir', tmp_path / 'data', '--out_dir', tmp_path / 'out',
                      '--epochs', 3, '--batch-size', 16, '--width', 8, '--alarm-examples', 8,
                      '--device', 'cpu'])
    run_dir = the_run_dir(tmp_path / 'out')
    rows = list(csv.DictReader(open(os.path.join(run_dir, 'metrics.csv'))))
    assert [(float(r['test_clean_acc']), float(r['test_pgd_acc'])) for r in rows] == \
        [(0.5, 0.2), (0.6, 0.3), (0.7, 0.3)]
    assert same_weights(os.path.join(run_dir, 'best_model.pth'), evaluated[1])
    assert not same_weights(evaluated[1], evaluated[2])
    assert same_weights(os.path.join(run_dir, 'final_model.pth'), evaluated[2])
    row = dict(zip(summarize.HEADER, summarize.summary_row(runs.read_run(run_dir, []))))
    assert (row['best epoch'], row['best PGD'], row['final clean']) == ('2', '30.00%', '70.00%')


def test_a_best_of_0_pgd_accuracy_is_a_best_model_and_nan_logits_later_a_divergence(
        tmp_path, monkeypatch, capsys):
    """NaN or inf logits of weights still finite stop the run as diverged (status 1),
    keeping what the epochs before saved, its 0.0 best included."""
    write_synthetic_cifar(str(tmp_path / 'data'), 'cifar10', n_train=32, n_test=16, seed=2)
    evaluated = []

    def scripted_evaluation(model, batches, *args, **kwargs):
        if evaluated:
            raise NonFiniteLogits('the model gives NaN or inf logits')
        evaluated.append(copy.deepcopy(model.state_dict()))
        return 0.25, 0.0
    monkeypatch.setattr(training, 'evaluate_robustness', scripted_evaluation)
    train_in_process(['--data-dir', tmp_path / 'data', '--out_dir', tmp_path / 'out',
                      '--epochs', 2, '--batch-size', 16, '--width', 8, '--alarm-examples', 8,
                      '--device', 'cpu'], status=1)
    run_dir = the_run_dir(tmp_path / 'out')
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        'error: the run diverged: the model gives NaN or inf logits (the evaluation after '
        f'epoch 2). Kept in {run_dir}, from before it diverged: checkpoint.pth, best_model.pth.')
    assert same_weights(os.path.join(run_dir, 'best_model.pth'), evaluated[0])
    assert load_weights(os.path.join(run_dir, 'checkpoint.pth'))['epoch'] == 1


# ---------------------------------------------------------------------------
# --val-examples: the held-out images never reach training

def write_two_tone_cifar(root, n_train, n_test, held_out):
    """CIFAR-10 files whose training images are dark (pixels <= 63) but for the last
    ``held_out``, which are bright (pixels >= 224). Test images are dark too."""
    write_synthetic_cifar(root, 'cifar10', n_train=n_train, n_test=n_test, seed=4)
    folder = os.path.join(root, 'cifar-10-batches-py')
    names = [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']
    seen = 0
    for name in names:
        path = os.path.join(folder, name)
        batch = pickle.load(open(path, 'rb'))
        data = batch['data'] // 4  # 0..63
        if name != 'test_batch':
            rows = np.arange(seen, seen + len(data))
            bright = rows >= n_train - held_out
            data[bright] = 224 + data[bright] // 2  # 224..255
            seen += len(data)
        batch['data'] = data
        pickle.dump(batch, open(path, 'wb'), protocol=2)
    return root


def test_held_out_images_never_reach_a_training_step(tmp_path):
    data = write_two_tone_cifar(str(tmp_path / 'data'), n_train=100, n_test=16, held_out=12)
    forwards = []  # (train mode?, largest input pixel) of every forward of a whole network

    def record(module, inputs):
        if type(module).__name__ == 'PreActResNet':
            forwards.append((module.training, inputs[0].max().item()))
    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        train_in_process(['--data-dir', data, '--out_dir', tmp_path / 'out', '--epochs', '1',
                          '--val-examples', 12, '--batch-size', 16, '--width', 8,
                          '--alarm-examples', 8, '--eval-batch-size', 16, '--alpha', 8,
                          '--pgd-alpha', 2, '--device', 'cpu'])
    finally:
        handle.remove()
    # Training forwards: mixed dark images plus at most 8/255 stay below 72/255; an image
    # holding half a bright one or more would pass 104/255.
    training_inputs = [largest for train_mode, largest in forwards if train_mode]
    assert len(training_inputs) == 3 * 6, "the student's three forwards in each of 6 steps"
    assert max(training_inputs) < 72 / 255
    # The per-epoch evaluation did see the held-out (bright) images, and only it.
    assert max(largest for train_mode, largest in forwards if not train_mode) >= 216 / 255
    run_dir = the_run_dir(tmp_path / 'out')
    log = open(os.path.join(run_dir, 'train.log')).read()
    assert '88 training images, 12 validation images' in log
    row, = list(csv.DictReader(open(os.path.join(run_dir, 'metrics.csv'))))
    X, y = cifar_split(data, train=True)
    model = training.build_model('preactresnet18', 'cifar10', 8, 'cpu', False)
    model.load_state_dict(load_weights(os.path.join(run_dir, 'best_model.pth')))
    assert float(row['val_clean_acc']) == accuracy(model, X[-12:], y[-12:])
