"""Paths and helpers shared by the test files: running the scripts, reading what a run wrote."""
import csv
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The tests run many tiny models: one thread is faster than two that synchronise on every op,
# and it keeps results identical however busy the machine is. Subprocesses inherit it.
os.environ['OMP_NUM_THREADS'] = '1'
torch.set_num_threads(1)

TIME_COLUMNS = {'seconds', 'eval_seconds'}


def script_path(name):
    """A top-level script by file name, or the training script of a dataset."""
    return os.path.join(ROOT, {'cifar10': 'MIX_KL_CIFAR10.py',
                               'cifar100': 'MIX_KL_CIFAR100.py'}.get(name, name))


def run_script(name, *args, cwd, wait=True, timeout=900):
    """``python SCRIPT ARGS`` in ``cwd``, as a user runs it; a Popen if not ``wait``."""
    command = [sys.executable, script_path(name), *map(str, args)]
    if not wait:
        return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def run_dirs(out_dir):
    """The run directories a training script created in ``out_dir``, sorted."""
    return sorted(os.path.join(out_dir, d) for d in os.listdir(out_dir))


def the_run_dir(out_dir):
    runs = run_dirs(out_dir)
    assert len(runs) == 1, runs
    return runs[0]


def read_metrics(run_dir, times=True):
    """metrics.csv as dicts of strings; ``times=False`` drops the time columns."""
    with open(os.path.join(run_dir, 'metrics.csv'), newline='') as f:
        rows = list(csv.DictReader(f))
    return rows if times else [{k: v for k, v in r.items() if k not in TIME_COLUMNS} for r in rows]


def load_weights(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def same_weights(a, b):
    """Two state_dicts (or the files holding them) bitwise equal."""
    a, b = (load_weights(x) if isinstance(x, (str, os.PathLike)) else x for x in (a, b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
