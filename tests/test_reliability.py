"""Promises that hold for every script: a failed write is one line, --device is checked once.

A failed write is tested for real: a small tmpfs mounted and filled (where this
process may mount one; those cases are skipped elsewhere), and a file-size limit
(RLIMIT_FSIZE, `ulimit -f`) set in the script's own process. Either way the
script must say one `error:` line, exit with status 1 and leave no empty,
partial or temporary file.
"""
import errno
import json
import logging
import os
import resource
import signal
import subprocess
import sys
from types import SimpleNamespace

import pyautoattack
import pytest
import torch

import benchmark
import bf16_check
import evaluate
import files
import grid
import runs
import training
from conftest import ROOT, script_path
from synthetic import write_synthetic_cifar, write_synthetic_tiny_imagenet
from tinyimagenet import load_tiny_imagenet
from utils import InputError

TINY_TRAINING = ['--epochs', '1', '--batch-size', '16', '--width', '8', '--alarm-examples', '8',
                 '--eval-batch-size', '16']


# ---------------------------------------------------------------------------
# A full disk and a file-size limit

@pytest.fixture
def small_disk(tmp_path):
    """mount(tmpfs) of 1 MiB at tmp_path/disk, unmounted after the test; skipped if not allowed."""
    disk = tmp_path / 'disk'
    disk.mkdir()
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(disk)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip('cannot mount a tmpfs here (needs root): the file-size-limit cases stand in')
    try:
        yield disk
    finally:
        subprocess.run(['umount', '-l', str(disk)], capture_output=True)


def fill(disk, leave=0):
    """Write a file into ``disk`` until the file system is full, then free ``leave`` bytes."""
    with open(disk / 'filler', 'wb', buffering=0) as f:
        try:
            while True:
                f.write(b'\0' * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        if leave:
            f.truncate(max(0, f.tell() // 4096 * 4096 - leave))


def run_limited(command, cwd, fsize=None, env=None, stdout=subprocess.PIPE, timeout=300):
    """``python COMMAND`` in ``cwd``; with ``fsize``, no file it writes may pass fsize bytes.

    stdout is buffered, as users run the scripts (not as PYTHONUNBUFFERED may have it).
    """
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.RLIM_INFINITY))
    environment = {k: v for k, v in os.environ.items() if k != 'PYTHONUNBUFFERED'}
    return subprocess.run([sys.executable, *map(str, command)], cwd=cwd, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=timeout,
                          preexec_fn=limit if fsize is not None else None,
                          env={**environment, 'PYTHONDONTWRITEBYTECODE': '1', **(env or {})})


def the_error(proc, status=1):
    """The one `error:` line of a script that failed with ``status``."""
    errors = [line for line in proc.stderr.splitlines() if 'error' in line.lower()]
    assert proc.returncode == status and len(errors) == 1, proc.stderr
    assert errors[0].startswith('error: ') and 'Traceback' not in proc.stderr, proc.stderr
    return errors[0]


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(d, n), folder)
                  for d, _, names in os.walk(folder) for n in names)


def assert_nothing_partial(folder, complete=()):
    """No temporary or empty file under ``folder``; each of ``complete`` is whole JSON."""
    for name in files_under(folder):
        path = os.path.join(folder, name)
        assert not os.path.basename(name).startswith('.'), f'temporary {name} left behind'
        assert os.path.getsize(path) > 0 or name.endswith('run.lock'), f'empty {name} left'
        if name.endswith('.json'):
            json.loads(open(path).read())  # a truncated one would not parse


@pytest.fixture(params=['full disk', 'file-size limit'])
def limit(request, tmp_path):
    """(folder to write in, RLIMIT_FSIZE or None): a full tmpfs, or a 64 KiB file-size limit."""
    if request.param == 'full disk':
        disk = request.getfixturevalue('small_disk')
        return disk, None
    folder = tmp_path / 'out'
    folder.mkdir()
    return folder, 64 * 1024


def test_a_failed_write_in_training_is_one_line_status_1_and_no_partial_file(tmp_path, limit):
    folder, fsize = limit
    write_synthetic_cifar(str(tmp_path / 'data'), 'cifar10', n_train=32, n_test=16, seed=2)
    if fsize is None:  # the run directory and config.json fit; the first model does not
        with open(folder / 'filler', 'wb') as f:
            f.write(b'\0' * (1024 * 1024 - 96 * 1024))
    proc = run_limited([script_path('cifar10'), '--data-dir', 'data', '--out_dir', folder,
                        *TINY_TRAINING], tmp_path, fsize)
    error = the_error(proc)
    assert error.endswith('best_model.pth: ' + ('No space left on device' if fsize is None
                                                 else 'File too large')
                          + '; nothing was left half-written')
    (folder / 'filler').unlink(missing_ok=True)
    run_dir, = [d for d in os.listdir(folder)]
    assert 'best_model.pth' not in os.listdir(folder / run_dir)
    assert_nothing_partial(folder)
    log = open(folder / run_dir / 'train.log').read()
    assert log.endswith('\n') and 'run directory' in log


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
    """A finished one-epoch training run: (folder holding data/, the run directory)."""
    tmp = tmp_path_factory.mktemp('run')
    write_synthetic_cifar(str(tmp / 'data'), 'cifar10', n_train=32, n_test=16, seed=2)
    proc = run_limited([script_path('cifar10'), '--data-dir', 'data', '--out_dir', 'runs',
                        *TINY_TRAINING], tmp)
    assert proc.returncode == 0, proc.stderr
    run_dir, = (tmp / 'runs').iterdir()
    return tmp, run_dir


def evaluation(finished_run, out, *flags):
    """The command line evaluating the run's best_model.pth on 4 test images into ``out``."""
    tmp, run_dir = finished_run
    return ['test_cifar10.py', '--model_path', run_dir / 'best_model.pth', '--out_dir', out,
            '--data-dir', tmp / 'data', '--n_ex', '4', *flags]


@pytest.fixture(scope='module')
def evaluated(finished_run):
    """A folder holding the results.json of a clean-accuracy evaluation."""
    out = finished_run[0] / 'evaluated'
    proc = run_limited(evaluation(finished_run, out, '--attacks', 'clean', '--no-checks'), ROOT)
    assert proc.returncode == 0, proc.stderr
    return out


def test_a_failed_write_in_evaluation_is_one_line_status_1_and_no_results_file(
        finished_run, limit):
    folder, fsize = limit
    if fsize is None:
        fill(folder)
    proc = run_limited(evaluation(finished_run, folder, '--attacks', 'clean'), ROOT,
                       fsize=fsize and 256)
    assert the_error(proc).endswith('results.json: ' + ('No space left on device' if fsize is None
                                                        else 'File too large')
                                    + '; nothing was left half-written')
    assert not [n for n in os.listdir(folder) if n != 'filler'], 'no results.json, empty or not'


def test_a_failed_rewrite_of_results_keeps_the_last_whole_version(finished_run,
                                                                   evaluated, tmp_path):
    """results.json is rewritten after every attack: a failed rewrite leaves the last whole one."""
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'results.json').write_bytes((evaluated / 'results.json').read_bytes())
    size = os.path.getsize(out / 'results.json')
    # The first write (no attacks yet) fits in `size` bytes, the rewrite after 'clean' does not.
    proc = run_limited(evaluation(finished_run, out, '--attacks', 'clean,pgd10', '--no-checks'),
                       ROOT, fsize=size - 8)
    assert the_error(proc).endswith('results-2.json: File too large; nothing was left '
                                    'half-written')
    report = json.loads((out / 'results-2.json').read_text())
    assert report['attacks'] == ['clean', 'pgd10'] and report['results'] == [], \
        'the version written before the first attack'
    assert_nothing_partial(out)


@pytest.mark.parametrize('command', [['benchmark.py'], ['bf16_check.py'],
                                     ['benchmark.py', '--check']])
def test_the_benchmarks_report_a_failed_write_in_one_line(tmp_path, limit, command):
    folder, fsize = limit  # the synthetic data goes to TMPDIR: a full disk, or too large a file
    if fsize is None:
        fill(folder, leave=8192)  # Python's tempfile takes TMPDIR only where it can write a byte
    proc = run_limited([*command, '--device', 'cpu', '--batch-size', '8', '--eval-images', '8'],
                       ROOT, fsize=fsize and 4096, env={'TMPDIR': str(folder)})
    assert the_error(proc).endswith(('No space left on device; nothing was left half-written',
                                     'File too large; nothing was left half-written'))
    assert not [n for n in os.listdir(folder) if n != 'filler'], 'the temporary folder is gone'


def test_the_tiny_imagenet_cache_reports_a_failed_write_in_one_line(tmp_path, limit):
    folder, fsize = limit
    write_synthetic_tiny_imagenet(str(folder), num_classes=4, per_class=6, n_val=12)
    if fsize is None:
        fill(folder)
    proc = run_limited([script_path('MIX_KL_TinyImageNet.py'), '--data-dir', folder,
                        '--out_dir', tmp_path / 'runs', *TINY_TRAINING], tmp_path,
                       fsize=fsize and 100 * 1024)
    base = folder / 'tiny-imagenet-200'
    reason = 'No space left on device' if fsize is None else 'File too large'
    assert the_error(proc) == (f'error: {base}/.mixkl-cache-train.npy: {reason}; nothing was '
                               'left half-written')
    assert not [n for n in os.listdir(base) if n.startswith('.')], 'no cache, no temporary'
    assert not os.listdir(tmp_path / 'runs'), 'no run directory'


def test_summarize_reports_a_stdout_it_cannot_write_in_one_line(finished_run, tmp_path):
    run_dir = finished_run[1]
    with open(tmp_path / 'table.md', 'w') as table:  # the table is longer than 64 bytes
        proc = run_limited(['summarize.py', run_dir], ROOT, fsize=64, stdout=table)
    assert the_error(proc) == 'error: standard output: File too large'
    whole = run_limited(['summarize.py', run_dir], ROOT)
    assert whole.returncode == 0 and run_dir.name in whole.stdout, 'the table, when it fits'


def test_output_a_script_leaves_unflushed_on_a_full_disk_is_one_line_at_exit(tmp_path):
    """What is still buffered at exit is flushed by cli.start_script's hook, not Python's."""
    script = (f'import sys; sys.path.insert(0, {ROOT!r}); import cli; cli.start_script(); '
              'print("x" * 600)')
    with open(tmp_path / 'out.txt', 'w') as out:
        proc = run_limited(['-c', script], tmp_path, fsize=512, stdout=out)
    assert the_error(proc) == 'error: standard output: File too large'


def test_torch_save_on_a_full_disk_is_an_oserror_naming_the_file(small_disk):
    fill(small_disk)
    path = small_disk / 'model.pth'
    with pytest.raises(OSError) as error:
        files.atomic_save({'w': torch.zeros(100_000)}, str(path))
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(path)
    assert os.listdir(small_disk) == ['filler']


def test_a_failed_append_to_a_log_leaves_it_as_it_was(small_disk):
    log = small_disk / 'train.log'
    log.write_text('first line\n')
    fill(small_disk)
    with pytest.raises(OSError) as error:
        files.append_text(str(log), 'x' * 100_000 + '\n')
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(log)
    assert log.read_text() == 'first line\n'


def test_an_append_cut_short_by_the_file_size_limit_leaves_the_log_as_it_was(tmp_path):
    """Part of the text fits: that part is truncated away again."""
    log = tmp_path / 'train.log'
    log.write_text('first line\n')
    script = (f'import sys; sys.path.insert(0, {ROOT!r}); import files\n'
              'try:\n'
              f'    files.append_text({str(log)!r}, "x" * 20 + "\\n")\n'
              'except OSError as e:\n'
              '    print(e.errno, e.filename)\n')
    proc = run_limited(['-c', script], tmp_path, fsize=16)
    assert proc.stdout.split() == [str(errno.EFBIG), str(log)], proc.stderr
    assert log.read_text() == 'first line\n'


def test_autoattacks_log_on_a_full_disk_stops_the_evaluation_and_leaves_no_partial_log(
        small_disk, monkeypatch):
    class LogsALot:  # AutoAttack's interface, and a long log
        def __init__(self, model, norm, eps, version, seed, device):
            pass

        def run_standard_evaluation(self, x, y, batch_size):
            for i in range(200):
                logging.getLogger('auto-attack').info(f'line {i} ' + 'x' * 1000)
            return x, y
    monkeypatch.setattr(pyautoattack, 'AutoAttack', LogsALot)
    fill(small_disk, leave=16 * 1024)
    model, x, y = torch.nn.Flatten(), torch.rand(2, 3), torch.zeros(2, dtype=torch.long)
    with pytest.raises(OSError) as error:
        evaluate.run_autoattack(model, x, y, 8 / 255, SimpleNamespace(seed=0, batch_size=2),
                                str(small_disk / 'model_autoattack.log'))
    assert error.value.errno == errno.ENOSPC
    assert os.listdir(small_disk) == ['filler']


# ---------------------------------------------------------------------------
# Temporaries a killed write left

KILLED_WRITER = '''
import sys, time
sys.path.insert(0, {root!r})
import files
def write(f):
    f.write(b'x' * 100_000)
    f.flush()
    print('writing', flush=True)
    time.sleep(600)
files.atomic_write_bytes({path!r}, b'')  # the directory exists
files._atomic_write({path!r}, write)
'''


def test_a_cache_write_killed_by_sigkill_leaves_a_temporary_the_next_run_removes(
        tmp_path, capsys):
    write_synthetic_tiny_imagenet(str(tmp_path), num_classes=2, per_class=2, n_val=2)
    base = tmp_path / 'tiny-imagenet-200'
    writer = subprocess.Popen([sys.executable, '-c', KILLED_WRITER.format(
        root=ROOT, path=str(base / '.mixkl-cache-train.npy'))], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == 'writing\n'
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    killed, = [n for n in os.listdir(base) if n.startswith('..mixkl-cache-train.npy.')]
    (base / '..mixkl-cache-val.npy.k1ll3d00').write_bytes(b'a killed write of the val cache')
    # Not ours, or not dead: kept.
    others = ['.mixkl-cache-train.npy.partial', '..metrics.csv.abcd1234', 'notes.txt']
    for name in others:
        (base / name).write_text('keep me')
    fd, live = files._locked_temporary(str(base), '.mixkl-cache-val.npy')  # a live writer's
    try:
        load_tiny_imagenet(str(tmp_path), train=True)
        listing = os.listdir(base)
        assert killed not in listing and '..mixkl-cache-val.npy.k1ll3d00' not in listing
        assert all(name in listing for name in others) and os.path.basename(live) in listing
        assert 'removed 2 temporary cache file(s)' in capsys.readouterr().out
    finally:
        os.close(fd)
        os.unlink(live)


# ---------------------------------------------------------------------------
# --device: checked by one argparse type in every script, before anything is read

def parse_training(argv):
    training.parse_args('cifar10', argv)


def parse_evaluation(argv):
    evaluate.build_parser('cifar10').parse_args(['--model_path', 'missing.pth', *argv])


@pytest.mark.parametrize('parse', [parse_training, parse_evaluation, benchmark.main,
                                   bf16_check.main,
                                   lambda argv: benchmark.main(['--check', *argv])],
                         ids=['training', 'evaluation', 'benchmark', 'bf16_check',
                              'benchmark --check'])
@pytest.mark.parametrize('device,message', [
    ('cpu:zz', "not a device name (Invalid device string: 'cpu:zz')"),
    ('gpu', 'not a device name (Expected one of cpu, cuda'),
    ('mps', 'the scripts run on cpu or cuda, not mps'),
    ('meta', 'the scripts run on cpu or cuda, not meta'),
    ('xla', 'the scripts run on cpu or cuda, not xla'),
    ('cpu:1', 'there is one CPU device, cpu'),
    ('cuda:99', None),
])
def test_a_device_this_machine_cannot_run_is_one_argparse_line(capsys, parse, device, message):
    if message is None:
        message = (f'this machine has {torch.cuda.device_count()} GPU(s)'
                   if torch.cuda.is_available() else 'CUDA is not available on this machine')
    with pytest.raises(SystemExit) as exit_info:
        parse(['--device', device, '--data-dir', 'no-such-folder'])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    error, = [line for line in err.splitlines() if 'error' in line]
    assert error.endswith(f'error: argument --device: {message}') or \
        f'error: argument --device: {message}' in error, error


def test_a_good_device_is_kept_as_text_for_config_json():
    args, _ = training.parse_args('cifar10', ['--device', 'cpu:0'])
    assert json.loads(json.dumps(vars(args)))['device'] == 'cpu:0'
    args, _ = training.parse_args('cifar10', [])
    assert args.device is None, 'the default (cuda when present) is chosen later, per rank'


@pytest.mark.parametrize('device, message', [
    ('cpu:zz', 'not a device name'), ('mps', 'the scripts run on cpu or cuda, not mps')])
def test_the_grid_checks_its_device_before_any_run(capsys, device, message):
    with pytest.raises(SystemExit) as exit_info:
        grid.build_parser().parse_args(['--dataset', 'cifar10', '--out_dir', 'g',
                                        '--device', device])
    assert exit_info.value.code == 2 and f'argument --device: {message}' in capsys.readouterr().err
    # A GPU the grid's machine lacks is fine: its runs may execute elsewhere (SLURM).
    assert grid.build_parser().parse_args(['--dataset', 'cifar10', '--out_dir', 'g',
                                           '--device', 'cuda:3']).device == 'cuda:3'


# ---------------------------------------------------------------------------
# Sizes no machine holds, files that are not files, messages on one line

@pytest.mark.parametrize('parse, flags, message', [
    (benchmark.parse_args, ['--width', '2000'], 'argument --width: 2000 must be <= 1024'),
    (benchmark.parse_args, ['--steps', '10000', '--batch-size', '1000'],
     'would need more than 1,000,000 synthetic training images'),
    (bf16_check.main, ['--train-images', str(10 ** 20)],
     f'argument --train-images/--check-train-images: {10 ** 20} must be <= 1000000'),
    (parse_evaluation, ['--width', '1025'], 'argument --width: 1025 must be <= 1024'),
], ids=['benchmark width', 'benchmark images', 'bf16_check images', 'evaluation width'])
def test_sizes_no_machine_holds_are_one_argparse_line(capsys, parse, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        parse(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_fifo_where_a_file_belongs_is_refused_at_once(tmp_path):
    fifo = tmp_path / 'metrics.csv'
    os.mkfifo(fifo)
    signal.alarm(20)  # reading a FIFO nobody writes to would wait forever
    try:
        with pytest.raises(InputError, match=f'{fifo}: not a regular file'):
            files.read_file(str(fifo))
        with pytest.raises(InputError, match='not a regular file'):
            runs.read_metrics(str(tmp_path))
    finally:
        signal.alarm(0)


def test_the_project_writes_files_readable_as_the_umask_allows(tmp_path):
    for write in (files.atomic_write_text, files.atomic_write_bytes):
        path = tmp_path / write.__name__
        write(str(path), 'x' if write is files.atomic_write_text else b'x')
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~files._UMASK, 'not mkstemp\'s 0600'


def test_a_path_holding_a_newline_is_reported_on_one_line(tmp_path):
    proc = run_limited(['test_cifar10.py', '--model_path', str(tmp_path / 'x\nerror: fake'),
                        '--out_dir', tmp_path / 'out', '--data-dir', tmp_path, '--no-checks'],
                       ROOT)
    assert the_error(proc, status=2) == f'error: {tmp_path}/x error: fake: no such file'
