"""Paths and helpers shared by the test files: running the scripts, reading what a run wrote."""
import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cli  # noqa: E402 (the project's modules, from ROOT)
import evaluate  # noqa: E402
import runs  # noqa: E402
import training  # noqa: E402
from synthetic import learnable_images  # noqa: E402
from utils import attack_pgd  # noqa: E402

# The tests run many tiny models: one thread is faster than two that synchronise on every op,
# and it keeps results identical however busy the machine is. Subprocesses inherit it.
os.environ['OMP_NUM_THREADS'] = '1'
torch.set_num_threads(1)

# The slowest files first, longest first (each one's seconds in a full run on 2 cores):
# pytest-xdist hands each worker whole files in this order (pytest.ini: --dist loadfile
# --no-loadscope-reorder), and a long file started last would leave the other core idle.
SLOW_FILES = ['test_grid.py',  # 200 s
              'test_training.py',  # 193
              'test_attacks.py',  # 109
              'test_experiments.py',  # 100
              'test_architectures.py',  # 95
              'test_reliability.py',  # 82
              'test_distributed.py',  # 75
              'test_checks.py',  # 40
              'test_evaluation_numbers.py',  # 25
              'test_training_numbers.py']  # 23; the others take under 15 s each


def pytest_collection_modifyitems(items):
    def rank(item):
        name = os.path.basename(str(item.path))
        return SLOW_FILES.index(name) if name in SLOW_FILES else len(SLOW_FILES)
    items.sort(key=rank)  # stable: each file keeps its own order


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


def backend_flags():
    """cuDNN autotuning, TF32 in matmuls, TF32 in cuDNN convolutions, read straight from torch
    (the tests' own reading, not cli.backend_switches, which they check)."""
    backends = torch.backends
    return (backends.cudnn.benchmark, backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32)


@pytest.fixture
def backend_flags_on():
    """cli.backend_switches all on, as training sets them on CUDA; as they were afterwards."""
    with cli.backend_switches_kept():
        cli.set_backend_switches((True, True, True))
        yield


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


# ---------------------------------------------------------------------------
# Run directories and evaluations written by hand (summarize.py, grid.py)

def write_run(parent, name, flags, metrics, **config_entries):
    """A run directory written by hand: config.json (``config_entries`` override it),
    metrics.csv (a row per (seconds, eval seconds, clean, PGD[, {other columns}])), model files."""
    run_dir = parent / name
    run_dir.mkdir()
    # The flags as that dataset's script and that architecture's defaults make them.
    dataset = config_entries.get('dataset', 'cifar10')
    args, _ = training.parse_args(dataset, ['--arch', config_entries.get('arch', 'preactresnet18'),
                                            *flags])
    for flag in ('amp', 'channels_last'):
        if getattr(args, flag) is None:
            setattr(args, flag, True)  # as Trainer resolves them on CUDA
    config = {**vars(args), 'data_dir': '/elsewhere', 'out_dir': str(parent),
              'device_used': 'cuda:0', 'torch': '2.14.1', 'command': 'MIX_KL_CIFAR10.py',
              **config_entries}
    (run_dir / 'config.json').write_text(json.dumps(config))
    rows = [dict({k: 0 for k in runs.METRIC_FIELDS}, epoch=i + 1, seconds=s, eval_seconds=e,
                 test_clean_acc=c, test_pgd_acc=p, **(other[0] if other else {}))
            for i, (s, e, c, p, *other) in enumerate(metrics)]
    runs.write_metrics(str(run_dir / 'metrics.csv'), rows)
    for checkpoint in ('best_model.pth', 'final_model.pth'):
        (run_dir / checkpoint).write_bytes(f'weights of {name}/{checkpoint}'.encode())
    return run_dir


def write_results(path, entries, n=10000, epsilon_255=8.0):
    """An evaluate.py results.json; entries: (checkpoint path, sha256, AutoAttack accuracy)."""
    results = [dict(checkpoint=str(c), sha256=digest, width=64,
                    attacks={'clean': dict(accuracy=0.9, correct=int(0.9 * n), n=n, seconds=1),
                             'aa': dict(accuracy=aa, correct=int(aa * n), n=n, seconds=9)})
               for c, digest, aa in entries]
    path.write_text(json.dumps(dict(dataset='cifar10', n_examples=n, epsilon_255=epsilon_255,
                                    attacks=['clean', 'aa'], results=results)))


def table_rows(markdown):
    lines = markdown.strip().splitlines()
    header = [c.strip() for c in lines[0].strip('|').split('|')]
    assert re.fullmatch(r'\|(\s*:?-+:?\s*\|){%d}' % len(header), lines[1]), \
        'a delimiter cell per column'
    return [dict(zip(header, (c.strip() for c in line.strip('|').split('|'))))
            for line in lines[2:]]
