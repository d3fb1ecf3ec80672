"""Paths and helpers shared by the test files: running the scripts, reading what a run wrote."""
import csv
import os
import subprocess
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import evaluate  # noqa: E402 (the project's modules, from ROOT)
from synthetic import learnable_images  # noqa: E402
from utils import attack_pgd  # noqa: E402

# The tests run many tiny models: one thread is faster than two that synchronise on every op,
# and it keeps results identical however busy the machine is. Subprocesses inherit it.
os.environ['OMP_NUM_THREADS'] = '1'
torch.set_num_threads(1)

TIME_COLUMNS = {'seconds', 'eval_seconds'}


def evaluate_in_process(capsys, *argv):
    """test_cifar10.py's main without a new interpreter: (exit status, stdout, stderr)."""
    try:
        evaluate.main('cifar10', [str(a) for a in argv])
        code = 0
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


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


# ---------------------------------------------------------------------------
# A small adversarially trained model, quick enough for AutoAttack and the checks

def coloured_images(n):
    """``n`` class-coloured 8x8 images (synthetic.py's, cropped) and their labels.

    Two classes' colours are 88/255 apart in some channel: a model can be robust up to
    44/255, none is at 64/255.
    """
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n)
    images = torch.from_numpy(learnable_images(labels, 10, rng)).float().div(255)
    return images.view(-1, 3, 32, 32)[:, :, :8, :8].contiguous(), torch.from_numpy(labels)


def adversarially_trained_mlp(eps, n_test):
    """An MLP PGD-trained at ``eps`` on the first 512 of ``coloured_images(512 + n_test)``
    (2 s), in eval mode, and the other ``n_test`` images and labels.

    Small inputs keep AutoAttack's 1,800 FAB-T and Square iterations quick on a CPU.
    """
    X, y = coloured_images(512 + n_test)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for epoch in range(20):
        for i in range(0, 512, 64):
            xb, yb = X[i:i + 64], y[i:i + 64]
            model.eval()
            delta = attack_pgd(model, xb, yb, eps, eps / 3, 3, 1)
            model.train()
            loss = F.cross_entropy(model(xb + delta), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval(), X[512:], y[512:]
