"""The experimental grid: every architecture, every method and Tiny-ImageNet, end to end on CPU.

Model tests check shapes, features and how a checkpoint names its architecture;
the end-to-end tests train with the real scripts on tiny synthetic data in the
exact on-disk layouts, then evaluate what they saved with the real test scripts.
"""
import argparse
import csv
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import flags
import mixkl
import models
import runs
import training
from conftest import run_script, same_weights, the_run_dir
from synthetic import write_synthetic_cifar, write_synthetic_tiny_imagenet
from data import load_dataset
from utils import InputError, attack_pgd, load_model_weights

SMALL = {'preactresnet18': 8, 'resnet18': 8, 'wrn34-10': 1}  # --width of a quick CPU model


# ---------------------------------------------------------------------------
# The architectures

@pytest.mark.parametrize('size', [32, 64])
@pytest.mark.parametrize('arch', list(models.ARCHS))
def test_each_architecture_maps_images_to_logits_and_its_features(arch, size):
    width = SMALL[arch]
    torch.manual_seed(0)
    model = models.build_model(arch, 7, width, size).eval()
    x = torch.rand(3, 3, size, size)
    logits, features = model(x, return_features=True)
    # A 4x4 (WideResNet: 8x8) pool: one vector per 32x32 image, a 2x2 grid per 64x64 one.
    per_position = {'preactresnet18': 8 * width, 'resnet18': 8 * width, 'wrn34-10': 64 * width}
    assert logits.shape == (3, 7)
    assert features.shape == (3, per_position[arch] * (size // 32) ** 2)
    assert torch.equal(model(x), logits)
    head = model.fc if arch == 'wrn34-10' else model.linear
    torch.testing.assert_close(head(features), logits)
    if arch == 'preactresnet18':
        assert (features < 0).any(), 'PreActResNet-18: no ReLU after the last block'
    else:
        assert (features >= 0).all(), 'after the last ReLU (WideResNet: its final BN-ReLU)'


# Each network re-typed as plain functions of its state_dict, from the papers (He et al. 2016,
# both variants; Zagoruyko & Komodakis 2016 as RobustBench names it), eval mode.

def reference_forward(arch, sd, x, normalization=None):
    """(logits, features) as the published network computes them from the weights ``sd``."""
    def conv(x, name, stride=1, padding=1):
        return F.conv2d(x, sd[f'{name}.weight'], stride=stride, padding=padding)

    def bn(x, name):
        return F.batch_norm(x, sd[f'{name}.running_mean'], sd[f'{name}.running_var'],
                            sd[f'{name}.weight'], sd[f'{name}.bias'], False, 0.0, 1e-5)

    def preact_block(x, p, stride, projection):
        out = F.relu(bn(x, f'{p}.bn1'))
        shortcut = conv(out, f'{p}.shortcut.0', stride, 0) if projection else x
        out = conv(out, f'{p}.conv1', stride)
        return conv(F.relu(bn(out, f'{p}.bn2')), f'{p}.conv2') + shortcut

    def basic_block(x, p, stride, projection):
        out = F.relu(bn(conv(x, f'{p}.conv1', stride), f'{p}.bn1'))
        out = bn(conv(out, f'{p}.conv2'), f'{p}.bn2')
        shortcut = bn(conv(x, f'{p}.shortcut.0', stride, 0), f'{p}.shortcut.1') \
            if projection else x
        return F.relu(out + shortcut)

    def wide_block(x, p, stride, projection):
        out = F.relu(bn(x, f'{p}.bn1'))
        shortcut = conv(out, f'{p}.convShortcut', stride, 0) if projection else x
        out = conv(F.relu(bn(conv(out, f'{p}.conv1', stride), f'{p}.bn2')), f'{p}.conv2')
        return out + shortcut

    if normalization is not None:
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in normalization)
        x = (x - mean) / std
    if arch == 'wrn34-10':
        out = conv(x, 'conv1')
        for stage, stride in ((1, 1), (2, 2), (3, 2)):
            for i in range(5):
                out = wide_block(out, f'block{stage}.layer.{i}', stride if i == 0 else 1, i == 0)
        features = F.avg_pool2d(F.relu(bn(out, 'bn1')), 8).flatten(1)
        return F.linear(features, sd['fc.weight'], sd['fc.bias']), features
    block = preact_block if arch == 'preactresnet18' else basic_block
    out = conv(x, 'conv1') if arch == 'preactresnet18' else F.relu(bn(conv(x, 'conv1'), 'bn1'))
    for stage in range(1, 5):
        for i in range(2):
            first = i == 0 and stage > 1
            out = block(out, f'layer{stage}.{i}', 2 if first else 1, first)
    features = F.avg_pool2d(out, 4).flatten(1)
    return F.linear(features, sd['linear.weight'], sd['linear.bias']), features


@pytest.mark.parametrize('arch, size', [(a, s) for a in models.ARCHS for s in (32, 64)])
def test_each_network_computes_the_published_forward(arch, size):
    torch.manual_seed(1)
    normalization = models.NORMALIZATION['tinyimagenet'] if size == 64 else None
    # WideResNet at widen factor 2: its first block widens 16 to 32 channels (a projection).
    width = 2 if arch == 'wrn34-10' else SMALL[arch]
    model = models.build_model(arch, 5, width, size, normalization).eval()
    # Every BatchNorm far from the identity, so that each one's place shows in the output.
    state = {k: (v.uniform_(0.5, 2.0) if k.endswith(('running_var', '.weight')) and v.dim() == 1
                 else v.uniform_(-0.5, 0.5) if k.endswith(('running_mean', '.bias')) else v)
             for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        logits, features = model(x, return_features=True)
        expected_logits, expected_features = reference_forward(arch, state, x, normalization)
    torch.testing.assert_close(features, expected_features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-5)


def test_the_full_size_networks_have_their_published_sizes():
    def parameters(arch):
        return sum(p.numel() for p in models.build_model(arch, 10).parameters())
    assert parameters('resnet18') == 11_173_962
    assert parameters('wrn34-10') == 46_160_474
    assert parameters('preactresnet18') == 11_171_146


@pytest.mark.parametrize('arch', list(models.ARCHS))
def test_a_checkpoint_names_its_architecture_and_width(arch, tmp_path):
    torch.manual_seed(0)
    model = models.build_model(arch, 10, SMALL[arch])
    path = tmp_path / 'model.pth'
    torch.save(model.state_dict(), path)
    assert models.detect_arch(model.state_dict()) == arch
    loaded = load_model_weights(str(path), 'cifar10')
    assert (loaded.arch, loaded.width, type(loaded)) == (arch, SMALL[arch], type(model))
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0)
    other = next(a for a in models.ARCHS if a != arch)
    with pytest.raises(InputError, match=f'not a {other} checkpoint|does not fit {other}'):
        load_model_weights(str(path), 'cifar10', arch=other)


def test_wide_resnet_convolutions_start_he_normal_by_their_fan_out():
    """std sqrt(2 / (out channels x k x k)), the usual WideResNet initialisation; each
    convolution here has at least 400 weights, so its std is within 15% of that."""
    torch.manual_seed(0)
    model = models.build_model('wrn34-10', 10, width=1)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 33 and min(c.weight.numel() for c in convs) >= 400
    for conv in convs:
        out_channels, _, k, _ = conv.weight.shape
        assert conv.weight.std().item() == pytest.approx((2 / (out_channels * k * k)) ** 0.5,
                                                         rel=0.15), conv
    assert not model.fc.bias.any()


def test_tiny_imagenet_models_normalise_inside_and_keep_it_out_of_the_state_dict(tmp_path):
    torch.manual_seed(0)
    plain = models.build_model('preactresnet18', 200, 4, 64).eval()
    normalised = models.build_model('preactresnet18', 200, 4, 64, models.NORMALIZATION[
        'tinyimagenet']).eval()
    normalised.load_state_dict(plain.state_dict())
    assert normalised.state_dict().keys() == plain.state_dict().keys()
    x = torch.rand(2, 3, 64, 64)
    # ImageNet's mean and std per RGB channel, as the authors' Tiny-ImageNet loader used them.
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(normalised(x), plain((x - mean) / std))
    path = tmp_path / 'tiny.pth'
    torch.save(plain.state_dict(), path)
    loaded = load_model_weights(str(path), 'tinyimagenet').eval()
    torch.testing.assert_close(loaded(x), normalised(x), rtol=0, atol=0)
    trained = training.build_model('preactresnet18', 'tinyimagenet', 4, torch.device('cpu'),
                                   False).eval()  # what training builds normalises too
    trained.load_state_dict(plain.state_dict())
    torch.testing.assert_close(trained(x), normalised(x), rtol=0, atol=0)
    with pytest.raises(InputError, match='200-class model; .* evaluates 10-class models'):
        load_model_weights(str(path), 'cifar10', script='test_cifar10.py')


@pytest.mark.parametrize('arch', list(models.ARCHS))
def test_one_mixkl_step_trains_each_architecture(arch):
    args, _ = training.parse_args('cifar10', ['--no-amp', '--arch', arch])
    hp = training.hyperparameters(args)
    torch.manual_seed(0)
    student = models.build_model(arch, 10, SMALL[arch]).train()
    teacher = mixkl.ConditionalEMA(student, hp.ema_value, hp.ema_decay_max)
    before = {k: v.clone() for k, v in student.named_parameters()}
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    result = mixkl.mixkl_step(student, teacher, optimizer, x, y, hp, epoch=0)
    assert np.isfinite(result.loss) and result.n == 8
    assert all(torch.isfinite(p.grad).all() for p in student.parameters())
    unchanged = [k for k, p in student.named_parameters() if torch.equal(p, before[k])]
    assert unchanged == [], 'every weight takes part in the step'
    assert teacher.updates == result.teacher_updated


# ---------------------------------------------------------------------------
# End to end, CIFAR-10: each architecture with MIX-KL, each new baseline

TINY_RUN = ['--epochs', '2', '--train-examples', '48', '--eval-examples', '16',
            '--batch-size', '16', '--alarm-examples', '8', '--eval-batch-size', '16',
            '--device', 'cpu']


@pytest.fixture(scope='module')
def cifar_dir(tmp_path_factory):
    return write_synthetic_cifar(str(tmp_path_factory.mktemp('data')), n_train=64, n_test=16,
                                 learnable=True)


# The evaluation's settings, given explicitly: radius 8/255, PGD step 2/255, seed 0.
EVAL_FLAGS = ['--n_ex', '16', '--attacks', 'clean,pgd10', '--epsilon', '8', '--alpha', '2',
              '--restarts', '1', '--seed', '0', '--device', 'cpu', '--no-checks']


def train_and_evaluate(script, test_script, data_dir, tmp_path, flags, outputs=None):
    """Train with the real script, then attack what it saved; (run dir, config, metrics, results).

    ``outputs``, a list, receives the two scripts' stdout.
    """
    out = tmp_path / 'runs'
    result = run_script(script, '--data-dir', data_dir, '--out_dir', out, *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = the_run_dir(out)
    with open(os.path.join(run_dir, 'config.json')) as f:
        config = json.load(f)
    with open(os.path.join(run_dir, 'metrics.csv'), newline='') as f:
        rows = list(csv.DictReader(f))
    evaluation = run_script(test_script, '--model_path', run_dir, '--out_dir', tmp_path / 'eval',
                            '--data-dir', data_dir, *EVAL_FLAGS, cwd=tmp_path)
    assert evaluation.returncode == 0, evaluation.stdout + evaluation.stderr
    with open(tmp_path / 'eval' / 'results.json') as f:
        report = json.load(f)
    if outputs is not None:
        outputs += [result.stdout, evaluation.stdout]
    return run_dir, config, rows, report


def pgd10_correct(model, X, y):
    """PGD-10 (8/255, step 2/255) of EVAL_FLAGS, from the random starts seed 0 gives."""
    torch.manual_seed(0)
    delta = attack_pgd(model.eval(), X, y, 8 / 255, 2 / 255, 10, 1)
    with torch.no_grad():
        return (model(X + delta).argmax(1) == y).sum().item()


GRID = [('resnet18', 'mixkl'), ('wrn34-10', 'mixkl'), ('preactresnet18', 'n_fgsm'),
        ('preactresnet18', 'pgd_at')]


@pytest.mark.parametrize('arch, method', GRID)
def test_every_architecture_and_method_trains_and_evaluates_end_to_end(arch, method, cifar_dir,
                                                                        tmp_path):
    argv = ['--arch', arch, '--method', method, '--width', str(SMALL[arch]), *TINY_RUN]
    if method == 'pgd_at':
        argv += ['--attack-iters', '3']
    run_dir, config, rows, report = train_and_evaluate('MIX_KL_CIFAR10.py', 'test_cifar10.py',
                                                       cifar_dir, tmp_path, argv)
    assert (config['arch'], config['method'], config['width']) == (arch, method, SMALL[arch])
    assert config['alpha'] == flags.default_alpha(method, 8)
    assert [row['epoch'] for row in rows] == ['1', '2']
    assert all(np.isfinite(float(row['train_loss'])) for row in rows)
    # MIX-KL saves its teacher, an average of the student; the baselines the student itself.
    student = torch.load(os.path.join(run_dir, 'checkpoint.pth'), weights_only=True)['student']
    saved = torch.load(os.path.join(run_dir, 'final_model.pth'), weights_only=True)
    assert same_weights(saved, student) == (method != 'mixkl')
    if method != 'mixkl':
        assert all(row['teacher_updates'] == '0' for row in rows)
    entry = report['results'][0]
    assert (entry['arch'], entry['width']) == (arch, SMALL[arch]), 'read from the checkpoint'
    # The per-epoch evaluation saw the same model and images as test_cifar10.py.
    best = max(rows, key=lambda row: float(row['test_pgd_acc']))
    assert entry['attacks']['clean']['accuracy'] == float(best['test_clean_acc'])
    # Its PGD-10 is the attack of EVAL_FLAGS on those images, recomputed here.
    x, y = load_dataset('cifar10', cifar_dir, train=False)
    model = load_model_weights(entry['checkpoint'], 'cifar10')
    correct = pgd10_correct(model, x[:16].float() / 255, y[:16])
    assert entry['attacks']['pgd10']['correct'] == correct


def test_validation_split_is_held_out_and_picks_the_best_model(cifar_dir, tmp_path):
    flags = [*TINY_RUN, '--width', '8', '--val-examples', '12', '--lr-schedule', 'cyclic',
             '--lr-peak', '1']
    run_dir, config, rows, _ = train_and_evaluate('MIX_KL_CIFAR10.py', 'test_cifar10.py',
                                                  cifar_dir, tmp_path, flags)
    assert config['best_model_chosen_on'].startswith('12 held-out training images')
    assert 'test_pgd_acc' not in rows[0], 'the test set is not looked at while training'
    with open(os.path.join(run_dir, 'train.log')) as f:
        assert '48 training images, 12 validation images' in f.read()
    # best_model.pth is the model of the epoch with the best validation PGD accuracy:
    # its clean accuracy on the held-out images (the last 12 of the 64) is that epoch's
    # (--train-examples 48 then takes the first 48 of the other 52).
    best = max(rows, key=lambda row: float(row['val_pgd_acc']))
    x, y = load_dataset('cifar10', cifar_dir, train=True)
    model = load_model_weights(os.path.join(run_dir, 'best_model.pth'), 'cifar10').eval()
    with torch.no_grad():
        correct = (model(x[-12:].float() / 255).argmax(1) == y[-12:]).sum().item() / 12
    assert correct == float(best['val_clean_acc'])
    # The cyclic schedule's momentum, as CyclicLR cycles it, in the saved optimiser: with the
    # peak at the very end (--lr-peak 1) the run ends at lr 0.1 and momentum 0.8.
    checkpoint = torch.load(os.path.join(run_dir, 'checkpoint.pth'), weights_only=True)
    group = checkpoint['optimizer']['param_groups'][0]
    assert (group['lr'], group['momentum']) == (pytest.approx(0.1), pytest.approx(0.8))


def test_a_checkpoint_from_before_the_new_flags_resumes_as_it_was_trained(tmp_path):
    old_args = vars(training.parse_args('cifar10', ['--lr-schedule', 'cyclic'])[0])
    for flag in ('arch', 'val_examples', 'lr_peak', 'momentum_min', 'ema_decay_max',
                 'con_reference', 'augment', 'attack_iters'):
        del old_args[flag]
    path = tmp_path / 'checkpoint.pth'
    torch.save({'format': runs.CHECKPOINT_FORMAT, 'args': old_args, 'student': {},
                'teacher': {}, 'teacher_updates': 0, 'optimizer': {}, 'scheduler': {},
                'epoch': 1, 'step': 0, 'stats': {}, 'best_pgd': 0.1, 'history': [],
                'rng': {}}, path)
    args, parser = training.parse_args('cifar10', ['--resume', str(path)])
    merged, _, _ = training.read_resume_checkpoint(args, parser)
    assert (merged.arch, merged.val_examples, merged.augment) == ('preactresnet18', 0, True)
    assert merged.momentum_min == merged.momentum, 'no momentum cycling where there was none'
    assert (merged.ema_decay_max, merged.con_reference, merged.lr_peak) == (0.999, 'clean', 0.5)


# ---------------------------------------------------------------------------
# Tiny-ImageNet-200: from the folder layout of JPEGs through both scripts

AUTHORS_TINY_DEFAULTS = dict(batch_size=64, lr_max=0.2, lamda=42.0, mixup_alpha=1.0,
                             ema_value=0.55, ema_decay_max=0.55, con_reference='start',
                             lr_schedule='cyclic', epochs=110, augment=False)


@pytest.mark.parametrize('arch, width', [('preactresnet18', 64), ('resnet18', 64),
                                         ('wrn34-10', 10)])
def test_each_architecture_has_its_own_default_width(arch, width):
    """64 channels for the ResNets, the widen factor 10 of WideResNet-34-10."""
    args, _ = training.parse_args('cifar10', ['--arch', arch])
    assert args.width == width
    assert training.parse_args('cifar10', ['--arch', arch, '--width', '2'])[0].width == 2


def test_tiny_imagenet_defaults_are_the_authors():
    args, _ = training.parse_args('tinyimagenet', [])
    assert {k: getattr(args, k) for k in AUTHORS_TINY_DEFAULTS} == AUTHORS_TINY_DEFAULTS
    assert args.lr_peak == pytest.approx(20 / 110), 'the peak at epoch 20 of 110'
    assert (args.epsilon, args.alpha, args.momentum, args.momentum_min) == (8, 8, 0.9, 0.8)
    hp = training.hyperparameters(argparse.Namespace(**{**vars(args), 'amp': False}))
    assert hp.num_classes == 200


def test_a_tiny_imagenet_resume_compares_only_the_flags_written():
    """Its own defaults (batch 64, ...) are not flags the user wrote: a run trained with
    --batch-size 16 resumes with --resume alone."""
    assert flags.given_flags('tinyimagenet', ['--resume', 'run']) == {'resume'}
    assert flags.given_flags('tinyimagenet', ['--resume', 'run', '--batch-size', '16']) == \
        {'resume', 'batch_size'}


def test_tiny_imagenet_trains_and_evaluates_from_its_folder_layout(tmp_path):
    data = write_synthetic_tiny_imagenet(str(tmp_path / 'data'), num_classes=3, per_class=8,
                                         n_val=8, learnable=True)
    flags = ['--epochs', '2', '--width', '8', '--alarm-examples', '8', '--device', 'cpu',
             '--eval-batch-size', '8']
    outputs = []
    run_dir, config, rows, report = train_and_evaluate(
        'MIX_KL_TinyImageNet.py', 'test_tinyimagenet.py', data, tmp_path, flags, outputs)
    assert {k: config[k] for k in AUTHORS_TINY_DEFAULTS if k != 'epochs'} == \
        {k: v for k, v in AUTHORS_TINY_DEFAULTS.items() if k != 'epochs'}
    assert config['dataset'] == 'tinyimagenet' and len(rows) == 2
    entry = report['results'][0]
    assert report['dataset'] == 'tinyimagenet' and report['n_examples'] == 8
    assert (entry['arch'], entry['num_classes']) == ('preactresnet18', 200)
    model = load_model_weights(os.path.join(run_dir, 'final_model.pth'), 'tinyimagenet')
    assert model.linear.in_features == 4 * 8 * 8, 'a 2x2 grid of pooled features per image'
    # Training decoded each split once; the evaluation read the val cache training made,
    # decoding nothing, and saw the same images: its clean accuracy is training's.
    training_out, evaluation_out = outputs
    assert '24 training images, 8 val images' in training_out, 'the labelled val/ folder'
    assert training_out.count('note: decoding the Tiny-ImageNet-200') == 2
    assert 'decoding' not in evaluation_out
    best = max(rows, key=lambda row: float(row['test_pgd_acc']))
    assert entry['attacks']['clean']['accuracy'] == float(best['test_clean_acc'])


def test_tiny_imagenet_scripts_report_a_missing_folder_in_one_line(tmp_path):
    checkpoint = tmp_path / 'model.pth'
    torch.save(models.build_model('preactresnet18', 200, 4, 64).state_dict(), checkpoint)
    for script in ('MIX_KL_TinyImageNet.py', 'test_tinyimagenet.py'):
        extra = ['--model_path', checkpoint] if script.startswith('test') else []
        result = run_script(script, '--data-dir', tmp_path / 'nowhere', '--out_dir',
                            tmp_path / 'out', '--device', 'cpu', *extra, cwd=tmp_path)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and 'tiny-imagenet-200' in lines[0], result.stderr


def test_the_tiny_imagenet_step_uses_its_consistency_reference(monkeypatch):
    args, _ = training.parse_args('tinyimagenet', ['--no-amp'])
    hp = training.hyperparameters(args)
    seen = []
    consistency = mixkl.consistency_loss
    monkeypatch.setattr(mixkl, 'consistency_loss',
                        lambda *a: seen.append(a[6]) or consistency(*a))
    torch.manual_seed(0)
    student = training.build_model('preactresnet18', 'tinyimagenet', 4, 'cpu', False).train()
    teacher = mixkl.ConditionalEMA(student, hp.ema_value, hp.ema_decay_max)
    assert teacher.max_decay == 0.55
    x, y = torch.rand(4, 3, 64, 64), torch.randint(0, 200, (4,))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    mixkl.mixkl_step(student, teacher, optimizer, x, y, hp, epoch=0)
    assert seen[0] is not None and seen[0].abs().max() <= 4 / 255 + 1e-7, 'delta0: half radius'
    assert F.one_hot(y, 200).shape[1] == hp.num_classes
