"""flags.py and cli.py: every default as METHOD.md states it, each range at its edges,
what a resume keeps and what it may change."""
import pytest

import base
import cli
import flags
from utils import InputError

# METHOD.md's defaults (CIFAR-10 and CIFAR-100 alike), flag by flag.
METHOD_DEFAULTS = dict(
    method='mixkl', arch='preactresnet18', width=64, epochs=110, batch_size=128,
    lr_schedule='multistep', lr_max=0.1, lr_peak=0.5, momentum=0.9, momentum_min=0.8,
    weight_decay=5e-4, epsilon=8.0, alpha=8.0, attack_iters=10, augment=True,
    delta_init='random', mixup_alpha=0.4, lamda=12.0, tau0=2.0, gamma=0.99,
    tau_schedule='geometric', lambda_kl_base=1.0, ema_value=0.82, ema_decay_max=0.999,
    con_reference='clean', pgd_iters=10, pgd_alpha=2.0, seed=0, val_examples=0,
    train_examples=None, eval_examples=None, resume=None, sync_bn=False, eval_batch_size=512,
    alarm_examples=512)


@pytest.mark.parametrize('dataset', ['cifar10', 'cifar100'])
def test_every_default_is_the_one_method_md_gives(dataset):
    args, _ = flags.parse_args(dataset, [])
    assert {k: getattr(args, k) for k in METHOD_DEFAULTS} == METHOD_DEFAULTS
    assert args.data_dir == f'{dataset}-data' and args.dataset == dataset
    assert args.out_dir == './output/'  # README's folder


def test_tiny_imagenet_defaults_are_the_authors_tiny_imagenet_script():
    # METHOD.md, Tiny-ImageNet-200: written out by hand, not read from flags.py.
    tiny = dict(METHOD_DEFAULTS, batch_size=64, lr_max=0.2, lamda=42.0, mixup_alpha=1.0,
                ema_value=0.55, ema_decay_max=0.55, con_reference='start',
                lr_schedule='cyclic', lr_peak=20 / 110, augment=False)
    args, _ = flags.parse_args('tinyimagenet', [])
    assert {k: getattr(args, k) for k in tiny} == tiny
    assert args.dataset == 'tinyimagenet'


# (flag, values accepted at the edges of its range, values just past them)
EDGES = [
    ('--epsilon', ['0', '255'], ['-0.5', '255.5']),
    ('--alpha', ['0', '255'], ['-1', '256']),
    ('--pgd-alpha', ['0', '255'], ['-1', '256']),
    ('--lr-max', ['1e-9', '10'], ['0', '10.5']),
    ('--lr-peak', ['1e-9', '1'], ['0', '1.01']),
    ('--momentum', ['0', '1'], ['-0.1', '1.01']),
    ('--weight-decay', ['0', '1'], ['-1e-9', '1.5']),
    ('--gamma', ['1e-9', '1'], ['0', '1.01']),
    ('--tau0', ['1e-9', '1000'], ['0', '-1']),
    ('--ema-value', ['1e-9', '1'], ['0', '1.01']),
    ('--ema-decay-max', ['0', '1'], ['-0.1', '1.01']),
    ('--mixup-alpha', ['0', '5'], ['-0.1']),
    ('--lamda', ['0', '100'], ['-1']),
    ('--lambda-kl-base', ['0', '3'], ['-1']),
    ('--epochs', ['1'], ['0', '-1', '1.5']),
    ('--batch-size', ['1'], ['0']),
    ('--pgd-iters', ['1'], ['0']),
    ('--train-examples', ['1'], ['0', '-1']),
    ('--eval-examples', ['1'], ['0', '-1']),
    ('--eval-batch-size', ['1'], ['0']),
    ('--alarm-examples', ['1'], ['0']),
    ('--momentum-min', ['0', '1'], ['-0.1', '1.01']),
    ('--attack-iters', ['1'], ['0']),
    ('--val-examples', ['0', '7'], ['-1']),
    ('--width', ['1', '1024'], ['0', '1025']),
    ('--seed', ['0', str(2 ** 31 - 1)], ['-1', str(2 ** 31)]),
]


@pytest.mark.parametrize('flag, accepted, refused', EDGES, ids=[e[0] for e in EDGES])
def test_each_range_takes_its_edges_and_refuses_past_them(flag, accepted, refused):
    dest = flag[2:].replace('-', '_')
    for value in accepted:
        args, _ = flags.parse_args('cifar10', [flag, value], strict=True)
        assert getattr(args, dest) == float(value)
    for value in [*refused, 'nan', 'inf', '-inf']:
        with pytest.raises(InputError, match=f'argument {flag}'):
            flags.parse_args('cifar10', [flag, value], strict=True)


def test_the_cyclic_momentum_may_stay_constant_but_never_rise():
    cyclic = ['--lr-schedule', 'cyclic', '--momentum', '0.85']
    args, _ = flags.parse_args('cifar10', [*cyclic, '--momentum-min', '0.85'], strict=True)
    assert (args.momentum, args.momentum_min) == (0.85, 0.85)
    assert flags.parse_args('cifar10', cyclic, strict=True)[0].momentum_min == 0.8
    with pytest.raises(InputError, match='--momentum 0.75: the cyclic schedule'):
        flags.parse_args('cifar10', ['--lr-schedule', 'cyclic', '--momentum', '0.75'],
                         strict=True)  # --momentum-min 0.8 would be a rise
    # The multistep schedule keeps the momentum constant: --momentum-min plays no part.
    assert flags.parse_args('cifar10', ['--momentum', '0.5'], strict=True)[0].momentum == 0.5


def resumed(saved_argv, argv, dataset='cifar10'):
    saved = vars(flags.parse_args(dataset, saved_argv)[0])
    args, parser = flags.parse_args(dataset, ['--resume', 'run', *argv])
    return flags.resumed_args(args, parser.given_flags, saved, 'run')


# Flags added after the first runs were saved: those runs' config.json lack them.
LATER_FLAGS = ('arch', 'val_examples', 'lr_peak', 'augment', 'ema_decay_max', 'con_reference',
               'attack_iters', 'momentum_min')


def test_a_resume_keeps_the_runs_flags_and_takes_only_where_and_how_it_runs():
    merged = resumed(['--epsilon', '16', '--lr-max', '0.05', '--seed', '3', '--data-dir', 'a'],
                     ['--data-dir', 'b', '--out_dir', 'o', '--no-amp', '--device', 'cpu'])
    assert (merged.epsilon, merged.alpha, merged.pgd_alpha, merged.lr_max, merged.seed) == \
        (16, 16, 4, 0.05, 3)
    assert (merged.data_dir, merged.out_dir, merged.amp, merged.device, merged.resume) == \
        ('b', 'o', False, 'cpu', 'run')
    # Flags that came later keep the run's own values (not what runs from before them had).
    merged = resumed(['--arch', 'resnet18', '--val-examples', '10', '--lr-peak', '0.3',
                      '--no-augment', '--ema-decay-max', '0.5', '--con-reference', 'start',
                      '--attack-iters', '3', '--lr-schedule', 'cyclic', '--momentum-min', '0.7'],
                     [])
    assert [getattr(merged, key) for key in LATER_FLAGS] == \
        ['resnet18', 10, 0.3, False, 0.5, 'start', 3, 0.7]
    # A run saved before those flags existed was trained as the reference scripts train:
    # PreActResNet-18, no held-out images, crops and flips, the clean consistency reference,
    # PGD-10 per epoch, the constant momentum, the teacher's decay up to 0.999.
    older = vars(flags.parse_args('cifar10', ['--momentum', '0.85'])[0])
    for key in LATER_FLAGS:
        del older[key]
    merged = flags.resumed_args(flags.parse_args('cifar10', ['--resume', 'run'])[0], {'resume'},
                                older, 'run')
    assert [getattr(merged, key) for key in LATER_FLAGS] == \
        ['preactresnet18', 0, 0.5, True, 0.999, 'clean', 10, 0.85]
    # The same value written again is no change.
    assert resumed(['--lr-max', '0.05'], ['--lr-max', '0.05']).lr_max == 0.05
    for argv, message in ((['--lr-max', '0.1'], 'trained with --lr-max 0.05, not 0.1'),
                          (['--seed', '0'], 'trained with --seed 3, not 0'),
                          (['--method', 'fgsm_rs'], 'trained with --method mixkl')):
        with pytest.raises(InputError, match=message):
            resumed(['--lr-max', '0.05', '--seed', '3'], argv)
    with pytest.raises(InputError, match='that is a CIFAR-10 run; resume it with '
                                         'MIX_KL_CIFAR10.py'):
        flags.resumed_args(flags.parse_args('cifar100', ['--resume', 'run'])[0], {'resume'},
                           vars(flags.parse_args('cifar10', [])[0]), 'run')


def test_a_resume_may_change_the_memory_layout_but_no_setting_of_the_training():
    assert resumed(['--channels-last'], ['--no-channels-last']).channels_last is False
    for argv in (['--epochs', '5'], ['--batch-size', '64'], ['--no-augment'],
                 ['--arch', 'resnet18'], ['--width', '32'], ['--val-examples', '3'],
                 ['--attack-iters', '3'], ['--eval-batch-size', '64']):
        with pytest.raises(InputError, match='the run was trained with'):
            resumed([], argv)


def test_a_config_json_value_the_parser_could_not_have_made_is_named():
    config = vars(flags.parse_args('cifar10', [])[0])
    assert flags.config_problems(config) == []
    for key, value in (('epsilon', 300.0), ('epsilon', '8'), ('method', 'mixk'),
                       ('augment', 1), ('epochs', 2.5), ('width', 0), ('lr_max', True)):
        assert flags.config_problems(dict(config, **{key: value})) == \
            [f'{key} {value!r}'], (key, value)
    # A run trained on another machine's GPU is read here too (summarize, a resume with
    # --device cpu): its device is not checked against this machine's.
    assert flags.config_problems(dict(config, device='cuda:1')) == []
    assert flags.config_problems(dict(config, device='cuda\0')) == ["device 'cuda\\x00'"]


@pytest.mark.parametrize('text,limit,shown', [
    ('a  b\n\tc ', 300, 'a b c'),
    ('x' * 10, 10, 'x' * 10),
    ('x' * 11, 10, 'x' * 7 + '...'),
    (['a', 'b'], 300, "['a', 'b']"),
])
def test_a_value_quoted_in_a_message_is_one_line_of_at_most_its_limit(text, limit, shown):
    assert base.one_line(text, limit) == shown


def test_the_exit_rules_give_each_failure_its_status_and_one_line(capsys):
    assert cli.exit_status(lambda: 3) == 3 and cli.exit_status(lambda: None) == 0
    assert capsys.readouterr().err == ''

    def bad_input():
        raise InputError('--n_ex 0:\nnot a count')
    assert cli.exit_status(bad_input) == 2
    assert capsys.readouterr().err == 'error: --n_ex 0: not a count\n'

    def full_disk():
        raise OSError(28, 'No space left on device', '/out/results.json')
    assert cli.exit_status(full_disk) == 1
    assert capsys.readouterr().err == ('error: /out/results.json: No space left on device; '
                                       'nothing was left half-written\n')


def test_amp_and_channels_last_default_on_for_cuda_only():
    assert [cli.cuda_default(d) for d in ('cuda', 'cuda:1', 'cpu', None)] == \
        [True, True, False, False]
    assert cli.check_device('cpu').type == 'cpu'
    for name, message in (('cpu:1', 'one CPU device'), ('mps', 'not mps'), ('x', 'not a device')):
        with pytest.raises(InputError, match=message):
            cli.check_device(name)


def test_a_gpu_number_is_checked_against_the_gpus_of_the_machine(monkeypatch):
    monkeypatch.setattr(cli.torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(cli.torch.cuda, 'device_count', lambda: 2)
    assert [str(cli.check_device(name)) for name in ('cuda', 'cuda:0', 'cuda:1')] == \
        ['cuda', 'cuda:0', 'cuda:1']
    with pytest.raises(InputError, match=r'--device cuda:2: this machine has 2 GPU\(s\), '
                                         'cuda:0 to cuda:1'):
        cli.check_device('cuda:2')


def test_cuda_on_a_machine_without_it_is_refused_in_one_argparse_line(monkeypatch):
    monkeypatch.setattr(cli.torch.cuda, 'is_available', lambda: False)
    with pytest.raises(InputError, match='argument --device: CUDA is not available'):
        flags.parse_args('cifar10', ['--device', 'cuda'], strict=True)
