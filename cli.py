"""Command-line pieces shared by the scripts: value types, the help format, the device.

The training, evaluation and benchmark scripts take their flags through these,
so a bad value is refused the same way everywhere, with a one-line argparse error.
"""
import argparse
import math
import os
import platform

import torch

from utils import InputError


def number_in_range(kind, low=None, high=None, low_open=False):
    """An argparse type: ``kind`` (int or float) within [low, high] ((low, high] if low_open).

    NaN and +-inf are refused whatever the range: no flag means anything with them.
    """
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not {"an" if kind is int else "a"} '
                                             f'{kind.__name__}')
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f'{text!r} is not a finite number')
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f'{value} must be {">" if low_open else ">="} {low}')
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f'{value} must be <= {high}')
        return value
    return parse


positive_int = number_in_range(int, 1)
nonnegative = number_in_range(float, 0)
# Radii and step sizes, in /255 of the [0, 1] pixel range.
pixel_units = number_in_range(float, 0, 255)
# Seeds reach numpy's RNG, which takes 0 .. 2^32 - 1; the trainer adds the rank and epochs.
seed_int = number_in_range(int, 0, 2 ** 31 - 1)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except None: those flags' help says what they default to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def resolve_device(name):
    device = torch.device(name or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise InputError(f'--device {name}: CUDA is not available on this machine')
    return device


def cuda_default(device):
    """--amp and --channels-last when not given: on for CUDA, off on CPU.

    ``device`` is a torch.device or its text (config.json's device_used).
    """
    return str(device).startswith('cuda')


def enable_fast_cuda():
    """Training's CUDA settings: cuDNN autotuning (fixed input shapes), TF32 for fp32 work."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


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


def print_header(command, device):
    print(f'command: python {command}')
    print(f'device:  {describe_device(device)}')
    print(f'torch:   {torch.__version__}, Python {platform.python_version()}')
