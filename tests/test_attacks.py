"""Attacks against known answers, and the evaluation scripts end to end."""
import argparse
import json
import logging
import os
import pickle
import re
import sys
from types import SimpleNamespace

import pyautoattack
import pytest
import torch
import torch.nn as nn

import checks
import evaluate
import utils
from cli import backend_switches_kept
from payloads import CreatesAFile
from preactresnet import PreActResNet18
from conftest import adversarially_trained_mlp, backend_flags, evaluate_in_process, run_script
from synthetic import write_synthetic_cifar
from utils import (InputError, NonFiniteLogits, attack_backend, attack_pgd, evaluate_batches,
                   load_model_weights, pgd_attack, sha256_file)

EPS = 8 / 255


def linear_problem(n=400, seed=0):
    """A two-class linear model and points far from the box edges (exact worst case known)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(2, 48, generator=g) * 0.1)
        model[1].bias.zero_()
    X = 0.1 + 0.8 * torch.rand(n, 3, 4, 4, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    return model.eval(), X, y


def exact_robust_count(model, X, y, eps):
    """For two classes the L-inf worst case moves the margin by eps * ||w_y - w_other||_1."""
    w, b = model[1].weight, model[1].bias
    sign = 1 - 2 * y.float()                       # +1 if y = 0, -1 if y = 1
    margin = sign * (X.flatten(1) @ (w[0] - w[1]) + b[0] - b[1])
    return (margin > eps * (w[0] - w[1]).abs().sum()).sum().item()


@pytest.mark.parametrize('loss', ['ce', 'cw'])
def test_pgd_finds_the_exact_worst_case_of_a_linear_model(loss):
    model, X, y = linear_problem()
    clean = (model(X).argmax(1) == y).sum().item()
    exact = exact_robust_count(model, X, y, EPS)
    assert 40 < exact < clean - 40, 'the problem should separate clean and robust accuracy'
    torch.manual_seed(0)
    correct, n = evaluate_batches(model, [(X, y)], pgd_attack(EPS, EPS / 4, 10, 1, loss))
    assert correct == exact


def test_too_few_steps_cannot_reach_the_worst_case():
    model, X, y = linear_problem()
    torch.manual_seed(0)
    weak, n = evaluate_batches(model, [(X, y)], pgd_attack(EPS, EPS / 20, 2, 1))
    assert weak > exact_robust_count(model, X, y, EPS)


def small_model(seed=0):
    torch.manual_seed(seed)
    model = PreActResNet18(10, width=8)
    model.train()
    with torch.no_grad():  # give BN non-trivial running statistics
        for _ in range(3):
            model(torch.rand(16, 3, 32, 32))
    return model


def test_perturbations_stay_in_the_ball_and_box_and_bn_statistics_are_untouched():
    model = small_model()
    X = torch.rand(16, 3, 32, 32)
    X[:4] = 0.0
    X[4:8] = 1.0
    y = torch.randint(0, 10, (16,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = []
    model.register_forward_pre_hook(lambda m, inputs: modes.append(m.training))
    seen = []
    def attack(m, X_, y_):
        delta = attack_pgd(m, X_, y_, EPS, 2 / 255, 5, 2)
        seen.append(delta)
        return delta
    evaluate_batches(model, [(X, y)], attack)
    delta = seen[0]
    assert delta.abs().max() <= EPS + 1e-7
    assert ((X + delta) >= 0).all() and ((X + delta) <= 1).all()
    assert modes and not any(modes), 'every forward ran in eval mode'
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize('pixel, weight, bias', [(0.0, 0.1, 5.0), (1.0, -0.1, 10.0)])
def test_every_pgd_step_stays_in_the_pixel_box_where_the_loss_points_out_of_it(pixel, weight,
                                                                               bias):
    """Class 0's logit is bias + weight * sum(x): the loss rises towards pixels below 0 (at 0)
    or above 1 (at 1), and every example stays correct, so each of the steps is taken."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2)).eval()
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[0] = weight
        model[1].bias.copy_(torch.tensor([bias, 0.0]))
    X, y = torch.full((4, 3, 4, 4), pixel), torch.zeros(4, dtype=torch.long)
    torch.manual_seed(0)
    delta = attack_pgd(model, X, y, EPS, 2 / 255, 3, 1)
    assert ((X + delta) >= 0).all() and ((X + delta) <= 1).all()
    assert (model(X + delta).argmax(1) == 0).all()


def own_labels(model, X):
    """Labels = the model's clean predictions, so clean accuracy is 100%."""
    model.eval()
    with torch.no_grad():
        return model(X).argmax(1)


def fooled(model, X, y, delta):
    with torch.no_grad():
        return model(X + delta).argmax(1) != y


def test_more_restarts_never_raise_robust_accuracy():
    model = small_model(2)
    X = torch.rand(64, 3, 32, 32)
    y = own_labels(model, X)
    broken = []
    for restarts in (1, 2, 4):
        torch.manual_seed(0)
        broken.append(fooled(model, X, y, attack_pgd(model, X, y, 4 / 255, 1 / 255, 2, restarts)))
    assert 0 < broken[0].sum() < 64
    assert (broken[0] <= broken[1]).all() and (broken[1] <= broken[2]).all()


def test_pgd50_breaks_everything_pgd10_breaks_with_the_same_seed():
    model = small_model(2)
    X = torch.rand(64, 3, 32, 32)
    y = own_labels(model, X)
    torch.manual_seed(0)
    pgd10 = fooled(model, X, y, attack_pgd(model, X, y, 4 / 255, 0.25 / 255, 10, 1))
    torch.manual_seed(0)
    pgd50 = fooled(model, X, y, attack_pgd(model, X, y, 4 / 255, 0.25 / 255, 50, 1))
    assert 0 < pgd10.sum() < 64
    assert (pgd10 <= pgd50).all() and pgd50.sum() > pgd10.sum()


def test_autoattack_is_at_most_pgd20_at_most_clean_on_an_adversarially_trained_model(tmp_path):
    model, X, y = adversarially_trained_mlp(16 / 255, 48)
    args = argparse.Namespace(attacks=['clean', 'pgd20', 'aa'], epsilon=16.0, alpha=2.0,
                              restarts=1, seed=0, batch_size=128)
    results = evaluate.evaluate_checkpoint(model, X, y, args, str(tmp_path / 'mlp'))
    clean, pgd20, aa = (results[k]['accuracy'] for k in ('clean', 'pgd20', 'aa'))
    assert clean > 0.6 and pgd20 > 0.2, 'the model should be somewhat robust'
    assert aa <= pgd20 < clean
    assert results['aa']['max_perturbation'] <= 16 / 255 + 1e-6
    log = (tmp_path / 'mlp_autoattack.log').read_text()
    assert 'apgd-t' in log.lower() and 'square' in log.lower()


def test_autoattack_shows_its_progress_on_stdout_and_keeps_its_numbers(tmp_path, capsys):
    # A 10-class linear model on 3x4x4 images labelled with its own predictions: about half
    # the points are robust, so all four attacks run, on 16 images in batches of 6 (3 s).
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 10))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(10, 48, generator=g) * 0.1)
        model[1].bias.zero_()
    X = 0.1 + 0.8 * torch.rand(16, 3, 4, 4, generator=g)
    y = own_labels(model, X)
    args = argparse.Namespace(attacks=['aa'], epsilon=8.0, alpha=2.0, restarts=1, seed=0,
                              batch_size=6)
    result = evaluate.evaluate_checkpoint(model, X, y, args, str(tmp_path / 'lin'))['aa']
    out = capsys.readouterr().out

    lines = [line.strip() for line in out.splitlines()]
    assert lines[0] == 'AutoAttack (standard): apgd-ce, apgd-t, fab-t, square'
    for i, name in enumerate(['APGD-CE', 'APGD-T', 'FAB-T', 'Square'], start=1):
        mine = [line for line in lines if line.startswith(f'AutoAttack {i}/4 {name}: ')]
        assert mine[0].endswith(': running')
        assert any(': batch 1/' in line and ' broken' in line for line in mine), mine
        assert mine[-1].endswith(' s so far)') and '% robust (' in mine[-1]
    # APGD-CE sees all 16 images: 3 batches, each reported as it ends.
    assert [line.split(': ')[1].split(',')[0] for line in lines
            if line.startswith('AutoAttack 1/4 APGD-CE: batch')] == ['batch 1/3', 'batch 2/3',
                                                                    'batch 3/3']
    assert f'AutoAttack: {100 * result["accuracy"]:.2f}% robust after all attacks' in lines
    assert 0 < result['correct'] < 16
    # The full log still goes to the file.
    log = (tmp_path / 'lin_autoattack.log').read_text()
    assert 'apgd-ce - 3/3 - ' in log and 'max Linf perturbation' in log

    # The same number as pyautoattack run by hand, with the same seed and batches.
    from pyautoattack import AutoAttack
    x_adv, _ = AutoAttack(model, norm='Linf', eps=8 / 255, version='standard', seed=0,
                          device=X.device).run_standard_evaluation(X, y, batch_size=6)
    assert evaluate_batches(model, [(x_adv, y)])[0] == result['correct']


@pytest.mark.parametrize('level,message,shown', [
    (logging.WARNING, 'it seems to be a randomized defense!', True),
    (logging.ERROR, 'too few classes', True),
    (logging.INFO, 'max Linf perturbation: 0.03137', False),
    (logging.DEBUG, 'clean accuracy: 50.00%', False),
    (logging.DEBUG, 'no robust datapoints left for apgd-t', True),
])
def test_autoattack_warnings_are_shown_as_they_are_and_other_messages_only_logged(
        level, message, shown):
    record = logging.LogRecord('autoattack', level, __file__, 1, message, None, None)
    line = evaluate.AutoAttackProgress().progress_line(record)
    assert line == (f'AutoAttack: {message}' if shown else None)


def test_autoattack_progress_lines_number_each_attack_by_its_place_in_the_version(capsys):
    echo = evaluate.AutoAttackProgress()
    messages = [
        ('using standard version including apgd-ce, apgd-t, fab-t, square.',
         'AutoAttack (standard): apgd-ce, apgd-t, fab-t, square'),
        ('initial accuracy: 80.00%', 'AutoAttack: 80.00% correct before attacking'),
        ('running apgd-t', 'AutoAttack 2/4 APGD-T: running'),
        ('apgd-t - 3/20 - 41 out of 500 successfully perturbed',
         'AutoAttack 2/4 APGD-T: batch 3/20, 41 of 500 broken'),
        ('robust accuracy after APGD-T: 41.00% (total time 12.34 s)',
         'AutoAttack 2/4 APGD-T: 41.00% robust (12.3 s so far)'),
        ('running square', 'AutoAttack 4/4 Square: running'),
        ('running apgd-dlr', 'AutoAttack APGD-DLR: running'),  # not in this version's list
        ('robust accuracy: 40.00%', 'AutoAttack: 40.00% robust after all attacks'),
    ]
    for message, _ in messages:
        echo.emit(logging.LogRecord('autoattack', logging.DEBUG, __file__, 1, message, None,
                                    None))
    assert capsys.readouterr().out.splitlines() == [f'    {line}' for _, line in messages]


def test_the_printed_table_is_markdown_a_column_per_checkpoint_a_row_per_attack(tmp_path,
                                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    def entry(checkpoint, clean, pgd, **more):
        return dict(checkpoint=str(tmp_path / checkpoint), **more, attacks=dict(
            clean=dict(accuracy=clean), pgd10=dict(accuracy=pgd)))
    report = dict(attacks=['clean', 'pgd10'], results=[
        entry('best.pth', 0.8, 0.5), entry('run/final.pth', 0.81234, 0.0,
                                           checks=[dict(name='x', verdict='warn')])])
    assert evaluate.format_table(report).splitlines() == [
        '| attack | best.pth | run/final.pth |',
        '|---|---|---|',
        f'| {evaluate.LABELS["clean"]} | 80.00% | 81.23% |',
        f'| {evaluate.LABELS["pgd10"]} | 50.00% | 0.00% |',
        '| checks | - | 1 warn: x |']


# ---------------------------------------------------------------------------
# Checkpoints

def save(obj, path):
    torch.save(obj, path)
    return str(path)


@pytest.mark.parametrize('prefix', ['module.', '_orig_mod.', 'module._orig_mod.'])
def test_checkpoints_saved_from_ddp_or_compile_load(tmp_path, prefix):
    model = PreActResNet18(10, width=8)
    prefixed = {prefix + k: v for k, v in model.state_dict().items()}
    loaded = load_model_weights(save(prefixed, tmp_path / 'saved.pth'), 'cifar10')
    assert loaded.width == 8
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                 model.state_dict().values()))


@pytest.mark.parametrize('content,width,message', [
    (None, None, 'no such file'),
    ([1, 2, 3], None, 'does not hold a state_dict'),
    ('wrapped', None, 'does not hold a state_dict'),  # another code base's checkpoint
    ('with-epoch', None, 'does not hold a state_dict'),
    ('0-d head', None, 'is not a preactresnet18 checkpoint'),
    ({}, None, 'does not hold a state_dict'),
    ('cifar100', None, 'is a 100-class model; test_cifar10.py evaluates 10-class models'),
    ('width8', 16, 'has width 8, not --width 16'),
    ('width8', 4, 'has width 8, not --width 4'),
    ('5-class', None, 'is a 5-class model; test_cifar10.py evaluates 10-class models'),
    ('linear', None, 'is not a checkpoint of preactresnet18, resnet18, wrn34-10'),
    ('truncated', None, 'not a loadable PyTorch weights file'),
    ('resumable', None, 'is a resumable training checkpoint'),
    ('extra-key', None, 'does not fit preactresnet18 of width 8 for 32x32 images'),
    # 10^6 x 3 x 3 x 3 in one stored element: a 36 TB model from a 2 kB file
    ('expanded', None, r'conv1.weight hold\(s\) less data than their shape'),
    ('0-d', None, 'is not a preactresnet18 checkpoint'),
    ('nan', None, r'1 tensor\(s\) hold NaN or inf \(conv1.weight\); these weights are unusable'),
    ('inf', None, r'2 tensor\(s\) hold NaN or inf \(layer4.1.bn2.running_var, linear.weight\)'),
])
def test_bad_checkpoints_give_clear_errors(tmp_path, content, width, message):
    path = tmp_path / 'model.pth'
    state = PreActResNet18(10, width=8).state_dict()
    if content in ('cifar100', '5-class'):
        save(PreActResNet18(100 if content == 'cifar100' else 5, width=8).state_dict(), path)
    elif content == 'width8':
        save(state, path)
    elif content == 'linear':
        save(nn.Linear(3, 2).state_dict(), path)
    elif content == 'truncated':
        save(state, path)
        path.write_bytes(path.read_bytes()[:1000])
    elif content == 'resumable':
        save({'student': state, 'teacher': state, 'epoch': 3}, path)
    elif content == 'wrapped':
        save({'state_dict': state, 'epoch': 5}, path)
    elif content == 'with-epoch':
        save({**state, 'epoch': 3}, path)
    elif content == '0-d head':
        save({**state, 'linear.weight': torch.tensor(1.0)}, path)
    elif content == 'expanded':
        save({**state, 'conv1.weight': torch.zeros(1).expand(10 ** 6, 3, 3, 3)}, path)
    elif content == '0-d':
        save({**state, 'conv1.weight': torch.tensor(1.0)}, path)
    elif content == 'extra-key':
        save({**state, 'layer5.weight': torch.zeros(1)}, path)
    elif content == 'nan':
        state['conv1.weight'][0, 0, 0, 0] = float('nan')
        save(state, path)
    elif content == 'inf':
        state['linear.weight'][3, 7] = float('-inf')
        state['layer4.1.bn2.running_var'][0] = float('inf')
        save(state, path)
    elif content is not None:
        save(content, path)
    with pytest.raises(InputError, match=message):
        load_model_weights(str(path), 'cifar10', None, width, 'test_cifar10.py')


def spoiled(state, how):
    """``state`` with one tensor of a kind, or one value, that no training writes."""
    state = dict(state)
    if how == 'ambiguous keys':
        state['module.linear.bias'] = state['linear.bias'] + 1
    elif how in ('beyond the weight limit', 'beyond minus the weight limit'):
        state['linear.weight'] = state['linear.weight'].clone()
        state['linear.weight'][0, 0] = 2e8 if how == 'beyond the weight limit' else -2e8
    elif how == 'negative running variance':
        state['layer2.0.bn1.running_var'] = state['layer2.0.bn1.running_var'].clone()
        state['layer2.0.bn1.running_var'][3] = -0.5
    elif how == 'float counter':
        key = 'layer1.0.bn1.num_batches_tracked'
        state[key] = state[key].double()
    else:
        state['linear.weight'] = {
            'complex': lambda v: v.to(torch.complex64), 'bool': lambda v: v > 0,
            'integer': lambda v: v.to(torch.int64), 'sparse': lambda v: v.to_sparse(),
            'meta': lambda v: torch.empty_like(v, device='meta'),
            'quantized': lambda v: torch.quantize_per_tensor(v, 0.1, 0, torch.qint8),
        }[how](state['linear.weight'])
    return state


@pytest.mark.filterwarnings('ignore::UserWarning')  # torch on sparse and quantized tensors
@pytest.mark.parametrize('how,message', [
    ('ambiguous keys', "the keys 'linear.bias' and 'module.linear.bias' both name 'linear.bias' "
                       'once the module./_orig_mod. prefixes are dropped'),
    ('beyond the weight limit', r'1 tensor\(s\) hold values beyond 1e\+08 in absolute value, '
                                r'where training stops a run as diverged \(linear.weight\)'),
    ('beyond minus the weight limit', r'beyond 1e\+08 in absolute value, where training stops'),
    ('negative running variance', r'are BatchNorm running variances with negative values '
                                  r'\(layer2.0.bn1.running_var\)'),
    ('complex', r'are not real floating point or integer tensors \(linear.weight \(complex64\)\)'),
    ('bool', r'are not real floating point or integer tensors \(linear.weight \(bool\)\)'),
    ('integer', r'are integers where the model has floating point values, or the reverse '
                r'\(linear.weight\)'),
    ('float counter', r'or the reverse \(layer1.0.bn1.num_batches_tracked\)'),
    ('sparse', r'are sparse, quantized or meta tensors \(linear.weight\)'),
    ('meta', r'are sparse, quantized or meta tensors \(linear.weight\)'),
    ('quantized', r'are sparse, quantized or meta tensors \(linear.weight\)'),
])
def test_a_checkpoint_no_training_writes_is_refused_naming_the_tensor(tmp_path, how, message):
    """Checked as training checks its own weights, and more: kinds, BN variances, unique keys."""
    path = save(spoiled(PreActResNet18(10, width=8).state_dict(), how), tmp_path / 'model.pth')
    with pytest.raises(InputError, match=f'^{path}: .*{message}'):
        load_model_weights(path, 'cifar10', None, None, 'test_cifar10.py')


def test_a_weight_of_exactly_the_limit_training_allows_loads(tmp_path):
    state = PreActResNet18(10, width=8).state_dict()
    state['linear.weight'][0, 0] = utils.WEIGHT_LIMIT
    model = load_model_weights(save(state, tmp_path / 'model.pth'), 'cifar10')
    assert model.state_dict()['linear.weight'][0, 0] == utils.WEIGHT_LIMIT


def test_a_checkpoint_is_fitted_to_the_architecture_on_the_meta_device_first(tmp_path,
                                                                            monkeypatch):
    """A file that does not fit (a small file naming a huge width, say) costs no memory
    before it is refused."""
    built, build = [], utils.build_model

    def recorded(*args, **kwargs):
        built.append(torch.empty(0).device.type)
        return build(*args, **kwargs)
    monkeypatch.setattr(utils, 'build_model', recorded)
    state = PreActResNet18(10, width=8).state_dict()
    load_model_weights(save(state, tmp_path / 'model.pth'), 'cifar10')
    assert built[0] == 'meta'
    built.clear()
    with pytest.raises(InputError, match='does not fit'):
        load_model_weights(save({**state, 'layer5.weight': torch.zeros(1)},
                                tmp_path / 'extra.pth'), 'cifar10')
    assert built == ['meta']


def test_a_batchnorm_variance_of_exactly_0_loads(tmp_path):
    """A channel whose activations were constant: a variance training writes."""
    state = PreActResNet18(10, width=8).state_dict()
    state['layer2.0.bn1.running_var'][3] = 0.0
    model = load_model_weights(save(state, tmp_path / 'model.pth'), 'cifar10')
    assert torch.equal(model.state_dict()['layer2.0.bn1.running_var'],
                       state['layer2.0.bn1.running_var'])


def test_half_bfloat16_and_double_precision_weights_load_as_float(tmp_path):
    state = PreActResNet18(10, width=8).state_dict()
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        path = save({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
                    tmp_path / 'model.pth')
        model = load_model_weights(path, 'cifar10')
        assert all(torch.equal(v, state[k].to(dtype).float()) if v.is_floating_point()
                   else torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_checkpoint_with_a_code_payload_is_refused_without_running_it(tmp_path):
    victim = tmp_path / 'created-by-payload'
    path = save({'conv1.weight': torch.zeros(1), 'x': CreatesAFile(str(victim))},
                tmp_path / 'evil.pth')
    with pytest.raises(InputError, match='not a loadable PyTorch weights file'):
        load_model_weights(path, 'cifar10')
    assert not victim.exists()


# ---------------------------------------------------------------------------
# The scripts

def first_test_images(data_dir, dataset, n):
    """The first n test images / 255 and their labels, read straight from the pickle."""
    folder, name, key = {'cifar10': ('cifar-10-batches-py', 'test_batch', 'labels'),
                         'cifar100': ('cifar-100-python', 'test', 'fine_labels')}[dataset]
    with open(os.path.join(data_dir, folder, name), 'rb') as f:
        batch = pickle.load(f)
    X = torch.from_numpy(batch['data'][:n].reshape(-1, 3, 32, 32)).float() / 255
    return X, torch.tensor(batch[key][:n])


@pytest.mark.parametrize('dataset,classes,attacks', [
    ('cifar10', 10, 'clean,pgd10,pgd20,pgd50,cw20,aa'),
    ('cifar100', 100, 'clean,pgd10,cw20'),
])
def test_evaluation_scripts_write_results_json(tmp_path, dataset, classes, attacks):
    write_synthetic_cifar(str(tmp_path / 'data'), dataset, n_train=10, n_test=40)
    # An untrained network answers nearly one class; with this seed the CIFAR-10 one gets an
    # image right that PGD breaks, so AutoAttack's first attack breaks it too and the rest
    # have nothing left to attack (seconds, not a minute of FAB and Square).
    torch.manual_seed(19)
    model = PreActResNet18(classes, width=8).eval()
    checkpoint = save(model.state_dict(), tmp_path / 'best_model.pth')
    script = 'test_cifar10.py' if dataset == 'cifar10' else 'test_cifar100.py'
    proc = run_script(script, '--model_path', checkpoint, '--out_dir', 'out', '--data-dir', 'data',
                      '--n_ex', '8', '--attacks', attacks, '--epsilon', '6', '--alpha', '0.5',
                      '--restarts', '2', '--seed', '3', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / 'out' / 'results.json').read_text())
    assert report['dataset'] == dataset and report['n_examples'] == 8 and report['seed'] == 3
    assert report['epsilon'] == pytest.approx(6 / 255)
    entry, = report['results']
    assert entry['checkpoint'] == checkpoint and entry['sha256'] == sha256_file(checkpoint)
    assert (entry['arch'], entry['width'], entry['num_classes']) == ('preactresnet18', 8, classes)
    assert report['epsilon_255'] == 6 and report['attacks'] == attacks.split(',')
    assert list(entry['attacks']) == attacks.split(',')
    # Every number recomputed here from the same weights and the pickle's pixels, with the
    # flags' settings: radius 6/255, step 0.5/255, 2 restarts, the RNG seeded with 3.
    X, y = first_test_images(tmp_path / 'data', dataset, 8)
    for name, result in entry['attacks'].items():
        if name == 'aa':
            continue
        attack = None
        if name != 'clean':
            loss, iters = evaluate.ATTACKS[name]
            attack = pgd_attack(6 / 255, 0.5 / 255, iters, 2, loss)
            assert (result['iterations'], result['step_size_255'], result['restarts'],
                    result['epsilon_255'], result['loss']) == (iters, 0.5, 2, 6, loss)
        torch.manual_seed(3)
        assert result['correct'] == evaluate_batches(model, [(X, y)], attack)[0], name
        assert result['n'] == 8 and result['accuracy'] == result['correct'] / 8
    if 'aa' in entry['attacks']:
        aa = entry['attacks']['aa']
        assert aa['epsilon_255'] == pytest.approx(6) and aa['max_perturbation'] <= 6 / 255 + 1e-6
        # Its own log holds the same numbers: clean accuracy first, AutoAttack's at the end.
        log = (tmp_path / 'out' / 'best_model_autoattack.log').read_text()
        clean = entry['attacks']['clean']['accuracy']
        assert f'initial accuracy: {100 * clean:.2f}%' in log
        assert f'robust accuracy: {100 * aa["accuracy"]:.2f}%' in log
        assert 'AutoAttack 1/4 APGD-CE: batch 1/1' in proc.stdout
    # The printed table: one row per attack, its accuracy as results.json has it.
    for name, result in entry['attacks'].items():
        row = f'| {evaluate.LABELS[name]} | {100 * result["accuracy"]:.2f}% |'
        assert row in proc.stdout.splitlines(), row
    assert '| attack |' in proc.stdout


def test_evaluation_script_refuses_a_mismatched_checkpoint_before_evaluating(tmp_path):
    write_synthetic_cifar(str(tmp_path / 'data'), 'cifar10', n_train=10, n_test=10)
    good = save(PreActResNet18(10, width=8).state_dict(), tmp_path / 'good.pth')
    bad = save(PreActResNet18(100, width=8).state_dict(), tmp_path / 'bad.pth')
    proc = run_script('test_cifar10.py', '--model_path', good, bad, '--out_dir', 'out',
                      '--data-dir', 'data', '--n_ex', '4', cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ('error: ' + bad + ' is a 100-class model; test_cifar10.py '
                                   'evaluates 10-class models')
    assert not (tmp_path / 'out' / 'results.json').exists()


def test_unknown_attack_is_an_argument_error(tmp_path):
    proc = run_script('test_cifar10.py', '--model_path', 'x.pth', '--attacks', 'pgd10,fgsm',
                      cwd=tmp_path)
    assert proc.returncode == 2 and 'unknown attack fgsm' in proc.stderr


# ---------------------------------------------------------------------------
# Bad input to the evaluation: one line, exit status 2, before any attack

def model_and_data(tmp_path):
    """A width-8 CIFAR-10 checkpoint and a synthetic CIFAR-10 with 10 test images."""
    write_synthetic_cifar(str(tmp_path / 'data'), 'cifar10', n_train=10, n_test=10)
    torch.manual_seed(0)
    return save(PreActResNet18(10, width=8).state_dict(), tmp_path / 'model.pth')


def test_the_checks_take_the_evaluations_radius_seed_batch_size_and_examples(tmp_path, capsys,
                                                                          monkeypatch):
    checkpoint = model_and_data(tmp_path)
    seen = []

    def recording(model, x, y, epsilon, seed, batch_size, settings, messages):
        seen.append((len(y), epsilon, seed, batch_size, settings.examples, messages))
        return []
    monkeypatch.setattr(checks, 'run_checks', recording)
    code, out, err = evaluate_in_process(capsys, '--model_path', checkpoint, '--out_dir',
                                         tmp_path / 'out', '--data-dir', tmp_path / 'data',
                                         '--n_ex', 6, '--attacks', 'clean', '--seed', 5,
                                         '--batch_size', 3, '--epsilon', 6,
                                         '--checks-examples', 4)
    assert code == 0, err
    assert seen == [(6, 6 / 255, 5, 3, 4, None)]


@pytest.mark.parametrize('flags', [(True, False, True), (False, True, False)])
def test_attacks_run_in_full_fp32_and_each_backend_setting_is_as_it_was_after(flags):
    backends = torch.backends
    with backend_switches_kept():  # the test's own changes undone after it
        backends.cudnn.benchmark, backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32 = \
            flags
        with attack_backend():
            assert backend_flags() == (False, False, False)
        assert backend_flags() == flags


def test_the_test_script_attacks_and_checks_in_full_fp32_and_puts_the_backend_back(
        tmp_path, capsys, monkeypatch, backend_flags_on):
    """TF32 (10 mantissa bits) and cuDNN autotuning off in every forward; as before after."""
    checkpoint = model_and_data(tmp_path)
    seen, load = [], evaluate.load_model_weights

    def loading(*args):
        model = load(*args)
        model.register_forward_pre_hook(lambda module, inputs: seen.append(backend_flags()))
        return model
    monkeypatch.setattr(evaluate, 'load_model_weights', loading)
    code, out, err = evaluate_in_process(capsys, '--model_path', checkpoint, '--out_dir',
                                         tmp_path / 'out', '--data-dir', tmp_path / 'data',
                                         '--n_ex', 4, '--attacks', 'clean,pgd10',
                                         '--checks-examples', 4)
    assert code == 0, err
    assert len(seen) > 20 and set(seen) == {(False, False, False)}
    assert backend_flags() == (True, True, True)


def test_nan_logits_under_attack_are_one_line_naming_the_checkpoint(tmp_path, capsys,
                                                                    monkeypatch):
    checkpoint = model_and_data(tmp_path)

    def attacked(*args, **kwargs):
        raise NonFiniteLogits('the model gives NaN or inf logits on attacked examples')
    monkeypatch.setattr(evaluate, 'evaluate_checkpoint', attacked)
    code, out, err = evaluate_in_process(capsys, '--model_path', checkpoint, '--out_dir',
                                         tmp_path / 'out', '--data-dir', tmp_path / 'data',
                                         '--n_ex', 4, '--attacks', 'clean')
    assert (code, err) == (2, f'error: {checkpoint}: the model gives NaN or inf logits on '
                              'attacked examples\n')


def test_each_attacks_console_line_gives_its_accuracy_in_percent(capsys):
    model, X, y = linear_problem(n=8)
    results = evaluate.evaluate_checkpoint(model, X, y, evaluate.parse_args(
        'cifar10', ['--model_path', 'm', '--attacks', 'clean,pgd10']), 'unused')
    lines = capsys.readouterr().out.splitlines()
    assert [line.split('%')[0].split() for line in lines] == [
        [label, f'{100 * results[name]["accuracy"]:.2f}']
        for name, label in (('clean', 'clean'), ('pgd10', 'PGD-10'))]


def test_the_test_scripts_defaults_are_the_papers_protocol():
    args = evaluate.parse_args('cifar10', ['--model_path', 'm.pth'])
    assert (args.n_ex, args.attacks, args.restarts, args.seed, args.epsilon, args.alpha,
            args.checks, args.checks_examples) == (
        10000, ['clean', 'pgd10', 'pgd20', 'pgd50', 'cw20', 'aa'], 1, 0, 8.0, 2.0, True, 500)
    # README's batches and folder.
    assert (args.batch_size, args.out_dir) == (500, './output/')
    for dataset in ('cifar10', 'cifar100', 'tinyimagenet'):  # where training looks too
        assert evaluate.parse_args(dataset, ['--model_path', 'm']).data_dir == f'{dataset}-data'


@pytest.mark.parametrize('flags, message', [
    (['--width', '16'], 'has width 8, not --width 16'),
    (['--arch', 'resnet18'], 'does not fit resnet18 of width 8 for 32x32 images'),
])
def test_the_scripts_arch_and_width_are_checked_against_the_checkpoint(tmp_path, capsys, flags,
                                                                       message):
    checkpoint = model_and_data(tmp_path)
    code, out, err = evaluate_in_process(capsys, '--model_path', checkpoint, '--data-dir',
                                         tmp_path / 'data', '--out_dir', tmp_path / 'out',
                                         '--n_ex', '4', '--attacks', 'clean', *flags)
    assert code == 2 and message in err, err


def test_a_run_directory_without_saved_models_is_refused(tmp_path, capsys):
    model_and_data(tmp_path)
    (tmp_path / 'run').mkdir()
    code, out, err = evaluate_in_process(capsys, '--model_path', tmp_path / 'run', '--data-dir',
                                         tmp_path / 'data', '--out_dir', tmp_path / 'out')
    assert (code, err) == (2, f'error: {tmp_path / "run"}: no best_model.pth or final_model.pth '
                              'in this directory\n')


def test_results_json_records_the_command_that_made_it(tmp_path, capsys, monkeypatch):
    checkpoint = model_and_data(tmp_path)
    argv = ['--model_path', str(checkpoint), '--data-dir', str(tmp_path / 'data'), '--out_dir',
            str(tmp_path / 'out'), '--n_ex', '4', '--attacks', 'clean', '--device', 'cpu']
    monkeypatch.setattr(sys, 'argv', ['/somewhere/test_cifar10.py', *argv])
    code, out, err = evaluate_in_process(capsys, *argv)
    assert code == 0, err
    report = json.loads((tmp_path / 'out' / 'results.json').read_text())
    assert report['command'] == ' '.join(['test_cifar10.py', *argv])
    assert (report['device'], report['torch']) == ('cpu', torch.__version__)


@pytest.mark.parametrize('where', ['a file', 'inside a file', 'read-only'])
def test_an_out_dir_that_cannot_be_written_is_refused_before_the_first_attack(
        tmp_path, capsys, where):
    checkpoint = model_and_data(tmp_path)
    (tmp_path / 'file').write_text('not a directory')
    # sysfs takes no new files, even from root (for whom chmod would not stop a write)
    out_dir = {'a file': tmp_path / 'file', 'inside a file': tmp_path / 'file' / 'out',
               'read-only': '/sys'}[where]
    if where == 'read-only' and not os.path.isdir('/sys'):
        pytest.skip('no /sys on this system')
    code, out, err = evaluate_in_process(capsys, '--model_path', checkpoint, '--out_dir', out_dir,
                                         '--data-dir', tmp_path / 'data', '--n_ex', '4',
                                         '--attacks', 'clean')
    assert code == 2 and out == '', 'nothing was evaluated'
    expected = (f'error: --out_dir {out_dir} is a file, not a directory' if where == 'a file'
                else f'error: --out_dir {out_dir}: cannot write there (')
    assert err.startswith(expected) and len(err.splitlines()) == 1


def autoattack_writing(describe):
    """A stand-in for run_autoattack (AutoAttack takes minutes): its log holds
    ``describe(model, args)``; no image is left correct."""
    def run_autoattack(model, x, y, epsilon, args, log_path):
        with open(log_path, 'w') as f:
            f.write(describe(model, args))
        return 0, {}
    return run_autoattack


def test_a_second_evaluation_into_the_same_out_dir_keeps_the_first(tmp_path, capsys,
                                                                   monkeypatch):
    checkpoint = model_and_data(tmp_path)
    out_dir = tmp_path / 'out'
    monkeypatch.setattr(evaluate, 'run_autoattack',
                        autoattack_writing(lambda model, args: f'seed {args.seed}'))
    for seed, name in enumerate(['results.json', 'results-2.json', 'results-3.json']):
        code, out, err = evaluate_in_process(capsys, '--model_path', checkpoint, '--out_dir',
                                             out_dir, '--data-dir', tmp_path / 'data',
                                             '--n_ex', '4', '--attacks', 'clean,aa',
                                             '--seed', seed)
        assert code == 0, err
        assert out.rstrip().endswith(f'results: {out_dir / name}')
    for seed, suffix in enumerate(['', '-2', '-3']):
        report = json.loads((out_dir / f'results{suffix}.json').read_text())
        assert report['seed'] == seed and list(report['results'][0]['attacks']) == ['clean', 'aa']
        assert (out_dir / f'model{suffix}_autoattack.log').read_text() == f'seed {seed}'


def test_two_runs_checkpoints_of_one_name_keep_an_autoattack_log_each(tmp_path, capsys,
                                                                      monkeypatch):
    checkpoint = model_and_data(tmp_path)
    runs = [tmp_path / 'run-a', tmp_path / 'run-b']
    for seed, run in enumerate(runs, start=1):
        run.mkdir()
        torch.manual_seed(seed)  # weights of their own: each is attacked
        save(PreActResNet18(10, width=8).state_dict(), run / 'best_model.pth')
    out_dir = tmp_path / 'out'
    monkeypatch.setattr(evaluate, 'run_autoattack', autoattack_writing(
        lambda model, args: f'{model.linear.weight.sum().item()!r} seed {args.seed}'))
    for seed in (0, 1):  # a second call into the same --out_dir keeps the first's logs
        code, out, err = evaluate_in_process(
            capsys, '--model_path', *[run / 'best_model.pth' for run in runs], checkpoint,
            '--out_dir', out_dir, '--data-dir', tmp_path / 'data', '--n_ex', '4', '--attacks',
            'aa', '--seed', seed, '--no-checks')
        assert code == 0, err
    logs = {name: (out_dir / name).read_text() for name in (
        'best_model_autoattack.log', 'best_model_2_autoattack.log', 'model_autoattack.log',
        'best_model-2_autoattack.log', 'best_model_2-2_autoattack.log', 'model-2_autoattack.log')}
    assert len(set(logs.values())) == 6, 'six logs, none overwritten'
    assert sorted(os.listdir(out_dir)) == sorted([*logs, 'results.json', 'results-2.json'])


def test_a_checkpoint_named_again_by_a_symlink_or_a_relative_path_is_evaluated_once(
        tmp_path, capsys, monkeypatch):
    model, other, link = tmp_path / 'model.pth', tmp_path / 'other.pth', tmp_path / 'link.pth'
    model.write_bytes(b'weights')
    other.write_bytes(b'other weights')
    link.symlink_to(model)
    monkeypatch.chdir(tmp_path)
    given = [str(model), 'model.pth', str(link), str(other)]
    assert evaluate.distinct_paths(given) == [str(model), str(other)]
    notes = capsys.readouterr().out.splitlines()
    assert notes == [f'note: {path} is named more than once; it is evaluated once'
                     for path in ('model.pth', str(link))]


@pytest.mark.parametrize('case', ['same bytes', 'different weights', 'same path twice'])
def test_each_distinct_checkpoint_is_attacked_once(tmp_path, capsys, monkeypatch, case):
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    best, final = run_dir / 'best_model.pth', run_dir / 'final_model.pth'
    best.write_bytes(open(model_and_data(tmp_path), 'rb').read())
    if case == 'different weights':
        torch.manual_seed(1)
        save(PreActResNet18(10, width=8).state_dict(), final)
    else:
        final.write_bytes(best.read_bytes())  # the best epoch was the last
    out_dir = tmp_path / 'out'
    attacked = []
    real_run_attack = evaluate.run_attack

    def counting_run_attack(model, name, x, y, args, log_path):
        attacked.append((os.path.basename(log_path), name))
        return real_run_attack(model, name, x, y, args, log_path)

    def fake_autoattack(model, x, y, epsilon, args, log_path):
        # Saved after every attack: the PGD number is on disk before AutoAttack starts.
        report = json.loads((out_dir / 'results.json').read_text())
        assert list(report['results'][-1]['attacks']) == ['clean', 'pgd10']
        with open(log_path, 'w') as f:
            f.write('log')
        return 1, {}
    monkeypatch.setattr(evaluate, 'run_attack', counting_run_attack)
    monkeypatch.setattr(evaluate, 'run_autoattack', fake_autoattack)
    given = [best, best] if case == 'same path twice' else [run_dir]
    code, out, err = evaluate_in_process(capsys, '--model_path', *given, '--out_dir', out_dir,
                                         '--data-dir', tmp_path / 'data', '--n_ex', '4',
                                         '--attacks', 'clean,pgd10,aa')
    assert code == 0, err
    report = json.loads((out_dir / 'results.json').read_text())
    entries = report['results']
    once = [(f'{n}_autoattack.log', a) for n in ['best_model'] for a in ('clean', 'pgd10', 'aa')]
    if case == 'same path twice':
        assert attacked == once
        assert [e['checkpoint'] for e in entries] == [str(best)]
        assert 'is named more than once; it is evaluated once' in out
        return
    assert [e['checkpoint'] for e in entries] == [str(best), str(final)]
    assert all(e['sha256'] == sha256_file(e['checkpoint']) for e in entries)
    header = next(line for line in out.splitlines() if line.startswith('| attack |'))
    assert header == f'| attack | {os.path.relpath(best)} | {os.path.relpath(final)} |'
    logs = sorted(p.name for p in out_dir.iterdir() if p.name.endswith('.log'))
    if case == 'same bytes':
        assert attacked == once
        assert entries[1]['same_as'] == str(best) and 'same_as' not in entries[0]
        assert entries[1]['attacks'] == entries[0]['attacks'] and entries[0]['attacks']
        assert f'{final}: same file content as {os.path.relpath(best)}: not attacked again' in out
        row = next(line for line in out.splitlines() if line.startswith('| PGD-10 |'))
        assert row.split('|')[2] == row.split('|')[3]
        assert logs == ['best_model_autoattack.log']
    else:
        assert attacked == once + [('final_model_autoattack.log', a)
                                   for a in ('clean', 'pgd10', 'aa')]
        assert entries[0]['sha256'] != entries[1]['sha256']
        assert 'same_as' not in entries[0] and 'same_as' not in entries[1]
        assert 'not attacked again' not in out
        assert logs == ['best_model_autoattack.log', 'final_model_autoattack.log']


def test_n_ex_beyond_the_test_set_evaluates_and_reports_the_images_there_are(tmp_path, capsys):
    checkpoint = model_and_data(tmp_path)  # 10 test images
    code, out, err = evaluate_in_process(capsys, '--model_path', checkpoint, '--out_dir',
                                         tmp_path / 'out', '--data-dir', tmp_path / 'data',
                                         '--n_ex', '1000', '--attacks', 'clean')
    assert code == 0, err
    assert 'note: --n_ex 1000 but the test set has 10 images; using all' in out
    report = json.loads((tmp_path / 'out' / 'results.json').read_text())
    assert report['n_examples'] == report['results'][0]['attacks']['clean']['n'] == 10


def test_a_missing_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    checkpoint = model_and_data(tmp_path)
    missing = tmp_path / 'missing.pth'
    code, out, err = evaluate_in_process(capsys, '--model_path', checkpoint, missing,
                                         '--out_dir', tmp_path / 'out', '--data-dir',
                                         tmp_path / 'data', '--n_ex', '4', '--attacks', 'clean')
    assert code == 2 and out == ''
    assert err == f'error: {missing}: no such file\n'


def test_a_checkpoint_whose_weights_are_not_finite_is_refused_in_one_line(tmp_path, capsys):
    checkpoint = model_and_data(tmp_path)
    state = torch.load(checkpoint, weights_only=True)
    state['layer1.0.conv1.weight'].view(-1)[5] = float('nan')
    torch.save(state, checkpoint)
    code, out, err = evaluate_in_process(capsys, '--model_path', checkpoint, '--out_dir',
                                         tmp_path / 'out', '--data-dir', tmp_path / 'data',
                                         '--n_ex', '4', '--attacks', 'clean')
    assert code == 2 and out == ''
    assert err == (f'error: {checkpoint}: 1 tensor(s) hold NaN or inf (layer1.0.conv1.weight); '
                   'these weights are unusable\n')
    assert not (tmp_path / 'out' / 'results.json').exists()


@pytest.mark.parametrize('flag,value,message', [
    ('--epsilon', 'nan', "'nan' is not a finite number"),
    ('--alpha', 'inf', "'inf' is not a finite number"),
    ('--alpha', '0', '0.0 must be > 0'),  # PGD would be its random start alone
    ('--alpha', '256', '256.0 must be <= 255'),
    ('--epsilon', '-1', '-1.0 must be >= 0'),
    ('--restarts', '0', '0 must be >= 1'),  # no restart: every attack would be no attack
    ('--batch_size', '0', '0 must be >= 1'),
    ('--n_ex', '0', '0 must be >= 1'),
    ('--checks-examples', '0', '0 must be >= 1'),
])
def test_attack_settings_out_of_range_are_refused_in_one_argparse_line(capsys, flag, value,
                                                                       message):
    code, out, err = evaluate_in_process(capsys, '--model_path', 'model.pth', flag, value)
    errors = [line for line in err.splitlines() if 'error' in line]
    assert code == 2 and len(errors) == 1
    assert re.search(f'error: argument {flag}(/[-a-z_]+)?: {re.escape(message)}$', errors[0])


@pytest.mark.parametrize('returned, refused', [
    ('moved by epsilon', False),
    ('moved past epsilon', True),
    ('a pixel below 0', True),
    ('a pixel above 1', True),
])
def test_autoattack_points_outside_the_threat_model_are_refused(tmp_path, monkeypatch, returned,
                                                                refused):
    model, X, y = linear_problem(n=8)
    X[0, 0, 0, 0], X[1, 0, 0, 1] = 0.001, 0.999  # pixels within epsilon of the box's edges
    below, above = X.clone(), X.clone()
    below[0, 0, 0, 0], above[1, 0, 0, 1] = -0.001, 1.001  # each moved by 0.002 < epsilon
    points = {'moved by epsilon': (X + EPS).clamp(0, 1),
              'moved past epsilon': (X + 1.01 * EPS).clamp(0, 1),  # inside [0, 1]
              'a pixel below 0': below, 'a pixel above 1': above}[returned]

    made = []

    class ReturnsThePoints:  # AutoAttack's interface
        def __init__(self, model, norm, eps, version, seed, device):
            made.append(dict(norm=norm, eps=eps, version=version, seed=seed, device=device))
            self.epsilon, self.attacks_to_run = eps, []
            self.apgd = self.apgd_targeted = self.fab = self.square = argparse.Namespace(
                n_iter=1, n_restarts=1, n_target_classes=1, n_queries=1, eps=eps)

        def run_standard_evaluation(self, x, y, batch_size):
            made.append(dict(batch_size=batch_size))
            logging.getLogger('auto-attack').info('robust accuracy: 50.00%')
            return points, y
    monkeypatch.setattr(pyautoattack, 'AutoAttack', ReturnsThePoints)
    args = argparse.Namespace(seed=3, batch_size=8)
    (tmp_path / 'aa.log').write_text('robust accuracy: 90.00% (an earlier evaluation)\n')
    run = lambda: evaluate.run_autoattack(model, X, y, EPS, args, str(tmp_path / 'aa.log'))
    if refused:
        with pytest.raises(RuntimeError, match='AutoAttack returned points outside the threat'):
            run()
    else:
        correct, settings = run()
        assert correct == evaluate_batches(model, [(points, y)])[0]
        assert settings['max_perturbation'] == pytest.approx(EPS)
        assert settings['log'] == 'aa.log', 'results.json names the log beside it'
        log = (tmp_path / 'aa.log').read_text()
        assert 'robust accuracy: 50.00%' in log and 'earlier' not in log, 'this evaluation only'
        assert made == [dict(norm='Linf', eps=EPS, version='standard', seed=3,
                             device=X.device), dict(batch_size=8)]


# ---------------------------------------------------------------------------
# No accuracy from NaN logits

class NaNAwayFrom(nn.Module):
    """A linear model that gives NaN logits on any input other than ``clean``."""

    def __init__(self, model, clean):
        super().__init__()
        self.model, self.clean = model, clean

    def forward(self, x):
        logits = self.model(x)
        away = (x != self.clean[:len(x)]).flatten(1).any(1) if len(x) == len(self.clean) \
            else torch.ones(len(x), dtype=torch.bool)
        return torch.where(away[:, None], torch.full_like(logits, float('nan')), logits)


class InfInOneClass(nn.Module):
    """``model`` with an inf logit for class 0 of the first ``n`` examples: the others finite."""

    def __init__(self, model, n):
        super().__init__()
        self.model, self.n = model, n

    def forward(self, x):
        logits = self.model(x).clone()
        logits[:self.n, 0] = float('inf')
        return logits


def test_an_accuracy_is_never_counted_from_nan_logits():
    model, X, y = linear_problem(n=40)
    with pytest.raises(NonFiniteLogits, match='^40 of 40 examples get NaN or inf logits'):
        evaluate_batches(NaNAwayFrom(model, X + 1), [(X, y)])
    with pytest.raises(NonFiniteLogits, match='^3 of 40 examples get NaN or inf logits'):
        evaluate_batches(InfInOneClass(model, 3), [(X, y)])
    nan_under_attack = NaNAwayFrom(model, X)
    assert evaluate_batches(nan_under_attack, [(X, y)])[1] == 40, 'clean logits are finite'
    with pytest.raises(NonFiniteLogits, match='NaN or inf logits on examples under attack'):
        attack_pgd(nan_under_attack, X, y, EPS, EPS / 4, 10, 1)
    with pytest.raises(NonFiniteLogits, match='attacked examples get NaN or inf logits'):
        evaluate_batches(nan_under_attack, [(X, y)], lambda m, X, y: torch.full_like(X, EPS))


def test_the_clean_logits_check_counts_the_images_with_any_nan_or_inf_logit():
    model, X, y = linear_problem(n=8)
    evaluate.check_clean_logits({'d': model}, ['m.pth'], ['d'], X, torch.device('cpu'))
    network = PreActResNet18(10, width=8).train()  # as load_model_weights returns it
    before = [b.clone() for b in network.buffers()]
    evaluate.check_clean_logits({'d': network}, ['m.pth'], ['d'], torch.rand(4, 3, 32, 32),
                                torch.device('cpu'))
    assert all(torch.equal(a, b) for a, b in zip(before, network.buffers())), 'in eval mode'
    with pytest.raises(InputError, match='^m.pth: the model gives NaN or inf logits on 3 of '
                                         'the first 8 test images'):
        evaluate.check_clean_logits({'d': InfInOneClass(model, 3)}, ['m.pth'], ['d'], X,
                                    torch.device('cpu'))
    # A model held by several checkpoints is named by the first of them.
    with pytest.raises(InputError, match='^b.pth: the model gives NaN or inf logits on 3 of'):
        evaluate.check_clean_logits({'g': model, 'd': InfInOneClass(model, 3)},
                                    ['a.pth', 'b.pth', 'c.pth'], ['g', 'd', 'd'], X,
                                    torch.device('cpu'))


def overflowing_checkpoint(tmp_path):
    """Finite weights within the limit whose activations overflow fp32: inf, then NaN, logits."""
    checkpoint = model_and_data(tmp_path)
    state = torch.load(checkpoint, weights_only=True)
    for key in state:
        if key.endswith('bn1.weight') or key.endswith('bn2.weight'):
            state[key].fill_(1e7)
    torch.save(state, checkpoint)
    return checkpoint


@pytest.mark.parametrize('after_a_good_one', [False, True])
def test_a_model_with_nan_clean_logits_stops_before_any_attack(tmp_path, capsys,
                                                               after_a_good_one):
    checkpoint = overflowing_checkpoint(tmp_path)
    good = [save(PreActResNet18(10, width=8).state_dict(), tmp_path / 'good.pth')] \
        if after_a_good_one else []
    code, out, err = evaluate_in_process(capsys, '--model_path', *good, checkpoint, '--out_dir',
                                         tmp_path / 'out', '--data-dir', tmp_path / 'data',
                                         '--n_ex', '6', '--batch_size', '4')
    assert code == 2 and 'results go to' not in out and '%' not in out, 'no attack ran'
    assert err == (f'error: {checkpoint}: the model gives NaN or inf logits on 4 of the first 4 '
                   'test images, unattacked; nothing was evaluated\n')
    assert not (tmp_path / 'out' / 'results.json').exists()


@pytest.mark.parametrize('text, message', [
    ('', 'unknown attack (none given); choose from '),
    (' , ,', 'unknown attack (none given); choose from '),
    ('pgd10,pgd7,fgsm', 'unknown attack pgd7, fgsm; choose from '),
])
def test_an_attack_list_naming_no_known_attack_is_refused(text, message):
    with pytest.raises(argparse.ArgumentTypeError) as error:
        evaluate.attack_list(text)
    assert str(error.value) == message + ','.join(evaluate.ATTACKS)


def test_results_name_a_checkpoint_given_by_a_relative_path_by_its_absolute_one(
        tmp_path, capsys, monkeypatch):
    checkpoint = model_and_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, out, err = evaluate_in_process(capsys, '--model_path', 'model.pth', '--out_dir', 'out',
                                         '--data-dir', 'data', '--n_ex', '4', '--attacks', 'clean')
    assert code == 0, err
    entry, = json.loads((tmp_path / 'out' / 'results.json').read_text())['results']
    assert entry['checkpoint'] == str(checkpoint) and os.path.isabs(entry['checkpoint'])


def test_a_repeated_attack_name_runs_once(tmp_path, capsys):
    assert evaluate.attack_list('pgd10, clean,pgd10,clean') == ['pgd10', 'clean']
    checkpoint = model_and_data(tmp_path)
    code, out, err = evaluate_in_process(capsys, '--model_path', checkpoint, '--out_dir',
                                         tmp_path / 'out', '--data-dir', tmp_path / 'data',
                                         '--n_ex', '4', '--attacks', 'clean,clean,clean')
    assert code == 0, err
    report = json.loads((tmp_path / 'out' / 'results.json').read_text())
    assert report['attacks'] == ['clean'] and list(report['results'][0]['attacks']) == ['clean']
    assert len([line for line in out.splitlines() if line.startswith('| clean |')]) == 1


def test_each_attack_has_its_name_in_the_printed_table(tmp_path):
    attacks = ['clean', 'pgd10', 'pgd20', 'pgd50', 'cw20', 'aa']
    report = dict(attacks=attacks, results=[dict(checkpoint=str(tmp_path / 'm.pth'), attacks={
        name: dict(accuracy=(9 - i) / 10) for i, name in enumerate(attacks)})])
    assert evaluate.format_table(report).splitlines()[2:] == [
        '| clean | 90.00% |', '| PGD-10 | 80.00% |', '| PGD-20 | 70.00% |', '| PGD-50 | 60.00% |',
        '| C&W-20 | 50.00% |', '| AutoAttack | 40.00% |']


def test_a_checkpoint_that_cannot_be_read_is_bad_input(tmp_path, monkeypatch):
    path = tmp_path / 'model.pth'
    path.write_bytes(b'weights')

    def unreadable(p):
        raise PermissionError(13, 'Permission denied', p)
    monkeypatch.setattr(evaluate, 'sha256_file', unreadable)
    with pytest.raises(InputError, match=re.escape(f'{path}: cannot be read (Permission denied)')):
        evaluate.checkpoint_digest(str(path))


def test_model_path_needs_at_least_one_checkpoint(capsys):
    code, out, err = evaluate_in_process(capsys, '--model_path', '--n_ex', '4')
    errors = [line for line in err.splitlines() if 'error' in line]
    assert code == 2 and len(errors) == 1 and 'argument --model_path' in errors[0], err


def test_each_attack_records_the_seconds_it_took(monkeypatch):
    model, X, y = linear_problem(n=4)
    clock = iter([100.0, 103.5])
    monkeypatch.setattr(evaluate, 'time', SimpleNamespace(time=lambda: next(clock)))
    args = argparse.Namespace(seed=0, epsilon=8.0, alpha=2.0, restarts=1, batch_size=4)
    assert evaluate.run_attack(model, 'clean', X, y, args, None)['seconds'] == 3.5


def test_n_ex_of_the_whole_test_set_needs_no_note(tmp_path, capsys):
    checkpoint = model_and_data(tmp_path)  # 10 test images
    code, out, err = evaluate_in_process(capsys, '--model_path', checkpoint, '--out_dir',
                                         tmp_path / 'out', '--data-dir', tmp_path / 'data',
                                         '--n_ex', '10', '--attacks', 'clean')
    assert code == 0 and 'note: --n_ex' not in out + err, out + err
