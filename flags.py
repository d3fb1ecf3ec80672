"""The training scripts' flags: the parser, each dataset's defaults, what a resume may change.

Training (training.py), the summary (summarize.py) and the grid (grid.py) read a
run's flags through this module, without importing the training loop. A flag's
default that depends on another flag (the attack steps follow --epsilon, the
width follows --arch) is filled in by ``resolve_defaults`` for a new run; a
resumed run keeps the values recorded in its checkpoint.
"""
import argparse

from cli import (HelpFormatter, cuda_default, device_flag, network_width, nonnegative,
                 number_in_range, pixel_units, positive_int, seed_int)
from mixkl import STEPS
from models import ARCHS
from utils import DATASETS, InputError, one_line

# ---------------------------------------------------------------------------
# Defaults that are not plain values

# Each method's attack step as a multiple of epsilon, as its paper defines it: the FGSM
# step of MIX-KL and N-FGSM is eps, FGSM-RS's 1.25 eps (Wong et al. 2020), PGD-AT's eps/4.
# At eps 8/255 they are 8, 10 and 2 (/255).
STEP_PER_EPSILON = {'mixkl': 1.0, 'fgsm_rs': 1.25, 'n_fgsm': 1.0, 'pgd_at': 0.25}
# The PGD step of every attack that measures robustness (per-epoch evaluation, the
# overfitting alarm, the test scripts), as a multiple of epsilon: 2/255 at eps 8/255.
EVAL_STEP_PER_EPSILON = 0.25

# The authors' Tiny-ImageNet script differs from their CIFAR ones in these defaults (METHOD.md).
DATASET_DEFAULTS = {
    'tinyimagenet': dict(batch_size=64, lr_max=0.2, lamda=42.0, mixup_alpha=1.0, ema_value=0.55,
                         ema_decay_max=0.55, con_reference='start', lr_schedule='cyclic',
                         lr_peak=20 / 110, augment=False),
}

TRAINING_SCRIPTS = {'cifar10': 'MIX_KL_CIFAR10.py', 'cifar100': 'MIX_KL_CIFAR100.py',
                    'tinyimagenet': 'MIX_KL_TinyImageNet.py'}

# Flags that may change when a run is resumed; every other one must match the run.
RESUME_MAY_CHANGE = {'resume', 'device', 'data_dir', 'out_dir', 'amp', 'channels_last'}
# Where the files are, not how the model was trained: not part of a run's settings.
LOCATION_FLAGS = {'data_dir', 'out_dir', 'resume', 'device'}
# What a run resumed from a checkpoint written before a flag existed had in its place.
BEFORE_THE_FLAG = dict(arch='preactresnet18', val_examples=0, lr_peak=0.5,
                       ema_decay_max=0.999, con_reference='clean', augment=True, attack_iters=10)


def default_alpha(method, epsilon):
    """The method's attack step for ``epsilon`` (both in /255)."""
    return STEP_PER_EPSILON[method] * epsilon


def default_eval_alpha(epsilon):
    """The PGD step of the attacks that measure robustness, for ``epsilon`` (both in /255)."""
    return EVAL_STEP_PER_EPSILON * epsilon


# ---------------------------------------------------------------------------
# The parser

def data_help(dataset):
    if dataset == 'tinyimagenet':
        return 'folder holding tiny-imagenet-200/ (train/<wnid>/images, val/images, ' \
               'val/val_annotations.txt), or that folder itself'
    return 'folder holding (or receiving) the python-pickle CIFAR files'


def build_parser(dataset):
    name = DATASETS[dataset]['name']
    p = argparse.ArgumentParser(
        description=f'Train a robust network on {name} with MIX-KL (or a baseline).',
        formatter_class=HelpFormatter)
    io = p.add_argument_group('data and output')
    io.add_argument('--data-dir', '--data_dir', dest='data_dir', default=f'{dataset}-data',
                    help=data_help(dataset))
    io.add_argument('--out_dir', '--out-dir', dest='out_dir', default='./output/',
                    help='a run directory is created inside it')
    io.add_argument('--resume', help='run directory (or its checkpoint.pth) to continue')
    io.add_argument('--train-examples', type=positive_int, help='use only the first N training images')
    io.add_argument('--eval-examples', type=positive_int, help='use only the first N test images')
    io.add_argument('--val-examples', type=number_in_range(int, 0), default=0,
                    help='hold the last N training images out, evaluate on them after every '
                         'epoch and pick best_model.pth on them (Rice et al. 2020); 0: pick it '
                         'on the test set, as the paper does')

    m = p.add_argument_group('method (defaults: METHOD.md)')
    m.add_argument('--method', choices=list(STEPS), default='mixkl',
                   help='baselines, without a teacher: fgsm_rs, FGSM from a uniform random '
                        'start (Wong et al. 2020); n_fgsm, FGSM from 2-eps noise, unprojected '
                        '(de Jorge et al. 2022); pgd_at, PGD-10 (Madry et al. 2018)')
    m.add_argument('--arch', choices=list(ARCHS), default='preactresnet18',
                   help='resnet18: the authors\' default; wrn34-10: WideResNet-34-10')
    m.add_argument('--epochs', type=positive_int, default=110)
    m.add_argument('--batch-size', type=positive_int, default=128)
    m.add_argument('--lr-schedule', choices=['multistep', 'cyclic'], default='multistep')
    m.add_argument('--lr-peak', type=number_in_range(float, 0, 1, low_open=True), default=0.5,
                   help='cyclic: the fraction of training at which the learning rate peaks '
                        '(Tiny-ImageNet: 20/110, the authors\' 20 of 110 epochs)')
    m.add_argument('--lr-max', type=number_in_range(float, 0, 10, low_open=True), default=0.1)
    m.add_argument('--momentum', type=number_in_range(float, 0, 1), default=0.9)
    m.add_argument('--momentum-min', type=number_in_range(float, 0, 1), default=0.8,
                   help='cyclic: momentum falls from --momentum to this as the learning rate '
                        'rises to its peak, as torch\'s CyclicLR does in the authors\' runs; '
                        'equal to --momentum keeps it constant')
    m.add_argument('--weight-decay', type=number_in_range(float, 0, 1), default=5e-4)
    m.add_argument('--epsilon', type=pixel_units, default=8.0, help='L-inf radius, in /255')
    m.add_argument('--alpha', type=pixel_units, default=None,
                   help='attack step, in /255 (default: eps for mixkl and n_fgsm, 1.25 eps for '
                        'fgsm_rs, eps/4 for pgd_at; 8, 10 and 2 at eps 8)')
    m.add_argument('--attack-iters', type=positive_int, default=10, help='pgd_at: PGD steps')
    m.add_argument('--augment', action=argparse.BooleanOptionalAction, default=True,
                   help='random crop (4-pixel zero padding) and horizontal flip of the '
                        'training images')
    m.add_argument('--delta-init', choices=['random', 'zero'], default='random',
                   help='zero: start the FGSM step at the mixed image itself')
    m.add_argument('--mixup-alpha', type=nonnegative, default=0.4, help='0 turns mixup off')
    m.add_argument('--lamda', type=nonnegative, default=12.0,
                   help='weight of the consistency term (0 turns it off)')
    m.add_argument('--tau0', type=number_in_range(float, 0, low_open=True), default=2.0)
    m.add_argument('--gamma', type=number_in_range(float, 0, 1, low_open=True), default=0.99,
                   help='temperature decay per epoch')
    m.add_argument('--tau-schedule', choices=['geometric', 'constant'], default='geometric')
    m.add_argument('--lambda-kl-base', type=nonnegative, default=1.0,
                   help='weight of the KL term at tau0 (0 turns it off)')
    m.add_argument('--ema-value', type=number_in_range(float, 0, 1, low_open=True), default=0.82,
                   help='teacher update when adv/clean accuracy of the batch is below this')
    m.add_argument('--ema-decay-max', type=number_in_range(float, 0, 1), default=0.999,
                   help='the teacher\'s decay is min(this, (k+1)/(k+10)) after k updates')
    m.add_argument('--con-reference', choices=['clean', 'start'], default='clean',
                   help='consistency denominator: mse(xm+delta, xm), or mse(xm+delta, xm+delta0) '
                        'as the authors\' Tiny-ImageNet script has it')

    e = p.add_argument_group('per-epoch evaluation')
    e.add_argument('--pgd-iters', type=positive_int, default=10)
    e.add_argument('--pgd-alpha', type=pixel_units, default=None,
                   help='PGD step, in /255, of the per-epoch evaluation and the overfitting '
                        'alarm (default: eps/4, 2 at eps 8)')
    e.add_argument('--eval-batch-size', type=positive_int, default=512)
    e.add_argument('--alarm-examples', type=positive_int, default=512,
                   help='training images watched for catastrophic overfitting')

    r = p.add_argument_group('machine')
    r.add_argument('--seed', type=seed_int, default=0)
    r.add_argument('--width', type=network_width, default=None,
                   help='base width of the ResNets (default 64), widen factor of the '
                        'WideResNet (default 10)')
    r.add_argument('--device', type=device_flag,
                   help='cuda, cuda:1, cpu ... (default: cuda when present)')
    r.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                   help='bf16 autocast in the training forwards; evaluation stays fp32 '
                        '(default: on for CUDA, off on CPU, where it is fast only with '
                        'AVX512-BF16 or AMX)')
    r.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=None,
                   help='keep the models in the channels_last memory format '
                        '(default: on for CUDA, off on CPU)')
    r.add_argument('--sync-bn', action='store_true',
                   help='under torchrun: batch-norm statistics over the global batch '
                        '(SyncBatchNorm, CUDA only) instead of per process')
    p.set_defaults(**DATASET_DEFAULTS.get(dataset, {}))
    return p


def parse_args(dataset, argv=None, strict=False):
    """The flags of ``argv`` (a new run's defaults filled in) and the parser that read them.

    ``parser.given_flags`` holds the dests written on the command line: a resume
    compares exactly those with the run's. A bad flag or value exits with argparse's
    one line, or with ``strict`` raises InputError with that line (grid.py checks
    every combination of its flags this way before anything runs).
    """
    parser = build_parser(dataset)
    if strict:
        parser.error = raise_input_error
    args = parser.parse_args(argv)
    if not args.resume:  # a resumed run keeps its own settings
        try:
            resolve_defaults(args)
        except InputError as e:
            parser.error(str(e))
    args.dataset = dataset
    parser.given_flags = given_flags(dataset, argv)
    return args, parser


def config_problems(config):
    """The flags in a config.json whose values the parser could not have made, each as
    "name value" (e.g. "epsilon '8'"): a file edited by hand, or another program's.

    Each value must be one the flag's type accepts and maps to itself (choices, ranges,
    int or float, a switch's bool); None stands for a default filled in later. --device
    is only text: a run trained on a GPU is read on a machine without one.
    """
    problems = []
    for action in build_parser(config['dataset'])._actions:
        value = config.get(action.dest)
        if action.option_strings and value is not None and not valid_value(action, value):
            problems.append(f'{action.dest} {one_line(repr(value), 40)}')
    return problems


def valid_value(action, value):
    """Whether ``value`` (from JSON) is one the parser gives for ``action``'s flag."""
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
        return isinstance(value, bool)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return False
    if action.choices is not None:
        return value in action.choices
    if action.type is None or action.dest == 'device':
        return isinstance(value, str) and '\0' not in value
    try:
        return action.type(str(value)) == value
    except (argparse.ArgumentTypeError, ValueError):
        return False


def raise_input_error(message):
    raise InputError(message)


def resolve_defaults(args):
    """Fill in the defaults that follow other flags; InputError for flags that contradict."""
    if args.alpha is None:
        args.alpha = default_alpha(args.method, args.epsilon)
    if args.pgd_alpha is None:
        args.pgd_alpha = default_eval_alpha(args.epsilon)
    if args.width is None:
        args.width = ARCHS[args.arch].default_width
    if args.lr_schedule == 'cyclic' and args.momentum_min > args.momentum:
        raise InputError(f'--momentum {args.momentum:g}: the cyclic schedule lowers the momentum '
                         f'to --momentum-min ({args.momentum_min:g}), which must not exceed it; '
                         'give --momentum-min too (equal to --momentum: constant momentum)')


def given_flags(dataset, argv):
    """The flags written on the command line (their dests), whether or not equal to the default."""
    quiet = build_parser(dataset)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    quiet._defaults.clear()  # the dataset's own defaults (DATASET_DEFAULTS) were not written either
    return set(vars(quiet.parse_args(argv)))


# ---------------------------------------------------------------------------
# A resumed run's flags

def resumed_args(args, given, saved, where):
    """The run's own flags (``saved``), with those that may change taken from ``args``.

    ``given`` are the flags written on the command line; one that differs from the
    run's, other than RESUME_MAY_CHANGE, is an InputError naming it.
    """
    saved = {**BEFORE_THE_FLAG, 'momentum_min': saved['momentum'], **saved}
    if saved['dataset'] != args.dataset:
        raise InputError(f'--resume {where}: that is a {DATASETS[saved["dataset"]]["name"]} run; '
                         f'resume it with {TRAINING_SCRIPTS[saved["dataset"]]}')
    merged = dict(saved, device=args.device, resume=args.resume)
    for key in sorted(given - {'device', 'resume'}):
        value = getattr(args, key)
        if key in RESUME_MAY_CHANGE:
            merged[key] = value
        elif value != saved.get(key):
            raise InputError(f'--resume {where}: the run was trained with {flag_name(key)} '
                             f'{saved.get(key)}, not {value}')
    return argparse.Namespace(**merged)


def flag_name(dest):
    """'lr_max' -> '--lr-max'."""
    return '--' + dest.replace('_', '-')


def own_defaults(config):
    """The defaults that follow other flags, for a run's flags (config.json's entries)."""
    epsilon = config.get('epsilon', 8.0)
    arch = ARCHS.get(config.get('arch', BEFORE_THE_FLAG['arch']))
    on_cuda = cuda_default(config.get('device_used'))
    return {'alpha': default_alpha(config['method'], epsilon) if config.get('method') in
            STEP_PER_EPSILON else None,
            'pgd_alpha': default_eval_alpha(epsilon), 'amp': on_cuda, 'channels_last': on_cuda,
            'width': arch and arch.default_width}
