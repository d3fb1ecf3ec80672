"""grid.py running: a grid of real training runs and evaluations, its table, resuming it, SLURM
via submitit (test_grid_plan.py: what it decides, without running anything)."""
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

import grid
import runs
from conftest import ROOT, load_weights, same_weights
from synthetic import write_synthetic_cifar

# Two epochs of 64 images, width 4: a run takes seconds.
TINY = ['--epochs', '2', '--train-examples', '64', '--eval-examples', '32', '--batch-size', '32',
        '--width', '8', '--alarm-examples', '16', '--eval-batch-size', '32', '--pgd-iters', '2']
EVAL = ['--attacks', 'clean,pgd10', '--n_ex', '32', '--batch_size', '32', '--checks-examples', '16']
# The checks run in the first grid (its table counts their warnings); the other grids
# skip them.
FAST_EVAL = [*EVAL, '--no-checks']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp('grid-data') / 'data'
    write_synthetic_cifar(str(path), 'cifar10', n_train=64, n_test=32, seed=5)
    return str(path)


def run_grid(out_dir, data, *flags, wait=True):
    command = [sys.executable, os.path.join(ROOT, 'grid.py'), '--dataset', 'cifar10',
               '--out_dir', str(out_dir), '--data-dir', data, '--threads-per-run', '1', *flags]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


def grid_csv(out_dir):
    with open(os.path.join(out_dir, 'grid.csv'), newline='') as f:
        return list(csv.DictReader(f))


def run_dirs_of(out_dir):
    """{combination folder name: its training run directory}."""
    base = os.path.join(out_dir, 'runs')
    return {name: grid.run_dir_of(os.path.join(base, name)) for name in sorted(os.listdir(base))}


def model_mtimes(out_dir):
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
            for d in run_dirs_of(out_dir).values()
            for f in (runs.BEST, runs.FINAL, runs.CHECKPOINT)}


@pytest.fixture(scope='module')
def finished_grid(tmp_path_factory, data):
    out = tmp_path_factory.mktemp('grid')
    proc = run_grid(out, data, '--method', 'mixkl', 'fgsm_rs', '--seed', '0', '1', *TINY, *EVAL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc


def test_a_grid_trains_evaluates_and_tabulates_mean_and_std_over_seeds(finished_grid):
    out, proc = finished_grid
    rows = grid_csv(out)
    assert [row['method'] for row in rows] == ['fgsm_rs', 'mixkl']
    assert 'seed' not in rows[0], 'one row per configuration: the seeds are averaged'
    # Each cell recomputed from the runs' own results.json files.
    for row in rows:
        accuracies, warned = {}, 0
        for run_dir in run_dirs_of(out).values():
            config = json.load(open(os.path.join(run_dir, 'config.json')))
            if config['method'] != row['method']:
                continue
            with open(os.path.join(run_dir, 'results.json')) as f:
                report = json.load(f)
            for entry in report['results']:
                key = 'best' if entry['checkpoint'].endswith(runs.BEST) else 'final'
                for attack, result in entry['attacks'].items():
                    accuracies.setdefault((key, attack), []).append(result['accuracy'])
                assert len(entry['checks']) >= 6, 'the test script checked each model'
                warned += sum(check['verdict'] == 'warn' for check in entry['checks'])
        assert row['seeds'] == '2' and row['checks_warned'] == str(warned)
        for (key, attack), values in accuracies.items():
            assert len(values) == 2
            assert float(row[f'{key}_{attack}_mean']) == pytest.approx(statistics.mean(values))
            assert float(row[f'{key}_{attack}_std']) == pytest.approx(statistics.stdev(values))
        assert set(accuracies) == {(k, a) for k in ('best', 'final') for a in ('clean', 'pgd10')}
    text = open(os.path.join(out, 'grid.md')).read()
    assert text in proc.stdout, 'the table is printed at the end'
    assert '| method | seeds | best clean | best PGD-10 | final clean | final PGD-10 |' in text
    manifest = json.load(open(os.path.join(out, 'grid.json')))
    assert sorted(r['run_dir'] for r in manifest['runs']) == sorted(run_dirs_of(out).values())
    assert {r['status'] for r in manifest['runs']} == {'done'}
    for line in ('train ', 'evaluate ', 'done '):
        assert sum(line in l for l in proc.stdout.splitlines()) == 4, line


def test_the_grid_picture_has_a_panel_per_dataset_and_epsilon(finished_grid):
    import matplotlib.image
    out, _ = finished_grid
    image = matplotlib.image.imread(os.path.join(out, 'grid.png'))
    assert image.shape[0] > 200 and image.shape[1] > 200
    columns, rows = grid.table(str(out), ['clean', 'pgd10'])
    series = grid.plot_series(columns, rows)
    assert [s['label'] for s in series] == ['method=fgsm_rs', 'method=mixkl']
    assert {s['panel'] for s in series} == {('CIFAR-10', 8.0)}
    for s in series:
        assert len(s['runs']) == 2 and all(len(r) == 2 for r in s['runs'])


def test_rerunning_the_grid_retrains_nothing(finished_grid, data):
    out, _ = finished_grid
    before = model_mtimes(out)
    proc = run_grid(out, data, '--method', 'mixkl', 'fgsm_rs', '--seed', '0', '1', *TINY, *EVAL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert model_mtimes(out) == before
    assert 'train ' not in proc.stdout and 'evaluate ' not in proc.stdout
    assert proc.stdout.count('done ') == 4


def test_a_grid_given_more_values_adds_runs_and_keeps_the_old(finished_grid, data, tmp_path):
    out, _ = finished_grid
    # A configuration with an explicit default is the same run: --epochs 2 is in TINY.
    assert grid.parse(['--dataset', 'cifar10', '--out_dir', str(out), *TINY,
                       '--method', 'mixkl'])[1][0].name in run_dirs_of(out)
    columns, rows = grid.table(str(out), ['clean'])
    assert columns == ['method'] and len(rows) == 2


def test_parallel_runs_end_as_one_at_a_time(finished_grid, data, tmp_path):
    out, _ = finished_grid
    proc = run_grid(tmp_path, data, '--method', 'fgsm_rs', '--seed', '0', '1', *TINY, *FAST_EVAL,
                    '--parallel', '2')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sequential, parallel = run_dirs_of(out), run_dirs_of(tmp_path)
    assert set(parallel) < set(sequential)
    for name, run_dir in parallel.items():
        assert same_weights(os.path.join(run_dir, runs.FINAL),
                            os.path.join(sequential[name], runs.FINAL))


def test_a_killed_grid_stops_its_run_and_the_rerun_resumes_it_bitwise(data, tmp_path):
    argv = ['--method', 'fgsm_rs', '--seed', '3', *TINY[:1], '6', *TINY[2:], *FAST_EVAL]
    grid_proc = run_grid(tmp_path / 'grid', data, *argv, wait=False)
    # Wait for the first checkpoint, then kill -9 the grid in the middle of the run.
    deadline = time.time() + 300
    run_dir = None
    while time.time() < deadline:
        found = [d for d in run_dirs_of(tmp_path / 'grid').values() if d] \
            if os.path.isdir(tmp_path / 'grid' / 'runs') else []
        if found and os.path.exists(os.path.join(found[0], runs.CHECKPOINT)):
            run_dir = found[0]
            break
        time.sleep(0.2)
    assert run_dir is not None
    grid_proc.kill()
    grid_proc.wait()
    assert not os.path.exists(os.path.join(run_dir, runs.FINAL)), 'killed before the end'
    # The training it started stops too (it saves a checkpoint): nothing trains unseen.
    deadline = time.time() + 120
    while runs.in_use(run_dir) and time.time() < deadline:
        time.sleep(0.2)
    assert not runs.in_use(run_dir)
    stopped_at = load_weights(os.path.join(run_dir, runs.CHECKPOINT))['epoch']
    assert stopped_at < 6
    proc = run_grid(tmp_path / 'grid', data, *argv)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'resume ' in proc.stdout
    # The same flags, trained in one go by the training script itself.
    alone = subprocess.run([sys.executable, os.path.join(ROOT, 'MIX_KL_CIFAR10.py'),
                            '--out_dir', str(tmp_path / 'alone'), '--data-dir', data,
                            '--method', 'fgsm_rs', '--seed', '3', '--epochs', '6', *TINY[2:]],
                           capture_output=True, text=True, env=dict(os.environ,
                                                                    OMP_NUM_THREADS='1'))
    assert alone.returncode == 0, alone.stderr
    alone_dir, = [os.path.join(tmp_path / 'alone', d) for d in os.listdir(tmp_path / 'alone')]
    assert same_weights(os.path.join(run_dir, runs.FINAL), os.path.join(alone_dir, runs.FINAL))


def test_a_slurm_job_that_reaches_its_time_limit_is_requeued_and_finishes(data, tmp_path):
    """submitit's local executor runs the job; once the run has a checkpoint the test sends
    the job the signal SLURM sends before a time limit (submitit's USR2). The training script
    saves a checkpoint, the job is requeued, resumes and finishes the run."""
    pytest.importorskip('submitit')
    out = tmp_path / 'grid'
    proc = run_grid(out, data, '--slurm', 'local', '--time-min', '10', '--signal-delay-s', '60',
                    '--method', 'fgsm_rs', *TINY[:1], '12', *TINY[2:], *FAST_EVAL, wait=False)
    deadline, run_dir = time.time() + 300, None
    while run_dir is None and time.time() < deadline and proc.poll() is None:
        found = [d for d in run_dirs_of(out).values() if d] if os.path.isdir(out / 'runs') else []
        if found and os.path.exists(os.path.join(found[0], runs.CHECKPOINT)):
            run_dir = found[0]
        time.sleep(0.2)
    assert run_dir is not None, proc.communicate()[0]
    job, = [pid for pid in os.listdir('/proc') if pid.isdigit() and 'submitit.core._submit'
            in read_cmdline(pid) and str(out) in read_cmdline(pid)]
    os.kill(int(job), signal.SIGUSR2)
    stdout, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout
    assert runs.run_state(run_dir) == 'finished'
    assert grid_csv(out)[0]['seeds'] == '1'
    with open(os.path.join(os.path.dirname(run_dir), grid.TRAIN_OUT)) as f:
        text = f.read()
    assert 'checkpoint saved' in text and 'resumed from' in text, text
    assert [int(r['epoch']) for r in runs.read_metrics(run_dir)] == list(range(1, 13))
    with open(next((out / 'slurm').glob('*_log.out'))) as f:
        assert 'Requeued job' in f.read()


def read_cmdline(pid):
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            return f.read().replace(b'\0', b' ').decode(errors='replace')
    except OSError:
        return ''


def test_a_second_grid_waits_for_a_run_another_process_holds(finished_grid, data):
    out, _ = finished_grid
    folder = sorted((out / 'runs').iterdir())[0]
    held = grid.lock(str(folder))  # as another grid process (or a run it left) would hold it
    assert grid.lock(str(folder)) is None
    proc = run_grid(out, data, '--method', 'mixkl', 'fgsm_rs', '--seed', '0', '1', *TINY, *EVAL,
                    wait=False)
    lines = []
    while not any('waiting for' in line for line in lines):
        lines.append(proc.stdout.readline())
        assert lines[-1] or proc.poll() is None, ''.join(lines)
    assert f'waiting for {folder.name}: another process runs it' in lines[-1]
    held.close()
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and (''.join(lines) + rest).count('done ') == 4


def test_logs_of_the_scripts_the_grid_ran_hold_no_progress_bars(finished_grid):
    out, _ = finished_grid
    for name in os.listdir(out / 'runs'):
        for log in (grid.TRAIN_OUT, grid.EVAL_OUT):
            text = (out / 'runs' / name / log).read_text()
            assert 'epoch 2/2' in text or 'PGD-10' in text
            assert '\r' not in text and 'it/s' not in text
