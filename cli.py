"""Command-line pieces shared by the scripts: value types, the device, exit rules, the header.

The training, evaluation and benchmark scripts take their flags through these,
so a bad value is refused the same way everywhere, with a one-line argparse error;
and they end the same way: bad input is one ``error:`` line and status 2, a failed
write (a full disk, ``ulimit -f``) one ``error:`` line and status 1.
"""
import argparse
import atexit
import contextlib
import math
import os
import platform
import signal
import sys

import torch

from base import InputError, one_line


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
# --width: a ResNet's base width (64 by default) or the WideResNet's widen factor (10). Past
# 1024 (16 times the widest ResNet-18 published) no machine holds the model.
network_width = number_in_range(int, 1, 1024)
# How many synthetic images the benchmarks write: 1,000,000 is twenty CIFAR training sets.
MAX_SYNTHETIC_IMAGES = 1_000_000
image_count = number_in_range(int, 1, MAX_SYNTHETIC_IMAGES)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except None: those flags' help says what they default to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


# ---------------------------------------------------------------------------
# The device

def check_device(name):
    """The torch.device ``name`` names, if this machine can run the scripts on it.

    The scripts run on the CPU and on CUDA GPUs. A name torch cannot parse, another
    device type (mps, meta, xla, ...), CUDA without a GPU, an index past the GPUs
    present or a CPU index are refused with an InputError. Under torchrun (ddp.py)
    each process then takes cuda:LOCAL_RANK itself.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError) as e:
        raise InputError(f'--device {name}: not a device name ({one_line(e, 120)})')
    if device.type == 'cpu':
        if device.index not in (None, 0):
            raise InputError(f'--device {name}: there is one CPU device, cpu')
        return device
    if device.type != 'cuda':
        raise InputError(f'--device {name}: the scripts run on cpu or cuda, not {device.type}')
    if not torch.cuda.is_available():
        raise InputError(f'--device {name}: CUDA is not available on this machine')
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise InputError(f'--device {name}: this machine has {count} GPU(s), '
                         f'cuda:0 to cuda:{count - 1}')
    return device


def device_name(text):
    """An argparse type: a device name torch parses, of a type the scripts run on (cpu, cuda),
    not checked against this machine's GPUs (grid.py's runs may execute on other machines)."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f'not a device name ({one_line(e, 120)})')
    if device.type not in ('cpu', 'cuda'):
        raise argparse.ArgumentTypeError(f'the scripts run on cpu or cuda, not {device.type}')
    return text


def device_flag(text):
    """The argparse type of every script's --device: checked before anything else runs."""
    try:
        return str(check_device(text))
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f'--device {text}: '))


def resolve_device(name):
    """The device of --device ``name`` (checked as device_flag does); None: cuda if present."""
    return check_device(name or ('cuda' if torch.cuda.is_available() else 'cpu'))


def cuda_default(device):
    """--amp and --channels-last when not given: on for CUDA, off on CPU.

    ``device`` is a torch.device or its text (config.json's device_used).
    """
    return str(device).startswith('cuda')


def backend_switches():
    """The process-wide backend switches: (cuDNN autotuning, TF32 in matmuls, TF32 in cuDNN)."""
    backends = torch.backends
    return backends.cudnn.benchmark, backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32


def set_backend_switches(switches):
    """Set the three switches of ``backend_switches``, in its order."""
    backends = torch.backends
    backends.cudnn.benchmark, backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32 = \
        switches


@contextlib.contextmanager
def backend_switches_kept():
    """Inside, the switches may change; after, they are as they were before."""
    previous = backend_switches()
    try:
        yield
    finally:
        set_backend_switches(previous)


def enable_fast_cuda():
    """Training's CUDA settings: cuDNN autotuning (fixed input shapes), TF32 for fp32 work."""
    set_backend_switches((True, True, True))


# ---------------------------------------------------------------------------
# Exit rules: bad input is status 2, a failed write status 1, each one `error:` line

def start_script():
    """What every script does first, so that a failed write is reported and not fatal.

    A write past ``ulimit -f`` sends SIGXFSZ, which kills the process before it
    can say a word or remove its temporary file: ignored, the write fails with
    EFBIG instead and is reported like a full disk (CPython ignores it at start-up
    too; this keeps it so whoever started the process). And what stdout still holds
    at exit is flushed by report_unwritable_stdout, not by the interpreter (which
    would print a traceback and exit with status 120 when that flush fails).
    """
    with contextlib.suppress(ValueError):  # ValueError: not the main thread, not a script
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if not _exit_state['registered']:
        atexit.register(report_unwritable_stdout)
        _exit_state['registered'] = True


# Whether report_unwritable_stdout is registered, and whether a failed write was reported
# already (then the exit's failing stdout flush adds no second line).
_exit_state = {'registered': False, 'reported': False}


def print_error(message, prefix=''):
    """``prefix`` + 'error: ' + ``message`` as one line on stderr, whatever the message holds
    (a path may hold a newline): what a script says when it stops."""
    print(f'{prefix}error: ' + ' '.join(str(message).split()), file=sys.stderr, flush=True)


def failed_write(error, where=None):
    """Report an OSError of a write in one `error:` line on stderr; returns the status, 1.

    ``where``: what was written, if the error does not name a file (standard output).
    """
    what = error.strerror or one_line(error)
    if where is not None:
        line = f'{where}: {what}'
    elif error.filename:  # the project's files are written atomically (files.py)
        line = f'{error.filename}: {what}; nothing was left half-written'
    else:
        line = what
    print_error(line)
    _exit_state['reported'] = True
    return 1


def report_unwritable_stdout():
    """At exit: flush stdout; if that fails (a redirect to a full disk), one line and status 1."""
    try:
        sys.stdout.flush()
    except OSError as e:
        if not _exit_state['reported']:
            failed_write(e, 'standard output')
        try:  # what stayed in the buffer goes nowhere, instead of failing again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        os._exit(1)
    except ValueError:  # stdout already closed
        pass


def exit_status(body):
    """Run ``body()`` under the exit rules; the status it returns (0 if not an int), or 2 or 1.

    An InputError is one `error:` line and 2, an OSError (a failed write) one
    `error:` line and 1. stdout is flushed here, so that a full disk behind it
    is reported too.
    """
    try:
        status = body()
    except InputError as e:
        print_error(e)
        return 2
    except OSError as e:
        return failed_write(e)
    try:
        sys.stdout.flush()
    except OSError as e:
        return failed_write(e, 'standard output')
    return status if isinstance(status, int) else 0


# ---------------------------------------------------------------------------
# The header of the benchmark scripts

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
