"""A grid of runs from one command: train, evaluate and tabulate every combination of flags.

    python grid.py --dataset cifar10 --out_dir GRID_DIR --data-dir cifar10-data \\
        --method mixkl fgsm_rs n_fgsm --epsilon 8 16 --seed 0 1 2 [--attacks clean,pgd20,aa]

Any training flag may take several values; the grid is their Cartesian product.
Each combination is one ordinary run of the dataset's training script, in
GRID_DIR/runs/<name>/, followed by the dataset's test script on its
best_model.pth and final_model.pth. The table (grid.md, grid.csv) has one row
per configuration (every flag but the seed), with mean and standard deviation
over seeds; grid.png draws the per-epoch PGD accuracy of each. Rerunning the
same command continues: finished runs are skipped, interrupted ones resumed.

The grid runs the scripts as a user would; it trains and attacks nothing itself.
"""
import argparse
import csv
import ctypes
import fcntl
import hashlib
import io
import itertools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

import evaluate
import flags
import plots
import runs
from cli import (HelpFormatter, device_name, failed_write, number_in_range, positive_int,
                 print_error)
from progress import progress, to_terminal
from utils import DATASETS, InputError, atomic_write_text, check_writable_dir

ROOT = os.path.dirname(os.path.abspath(__file__))
TEST_SCRIPTS = {'cifar10': 'test_cifar10.py', 'cifar100': 'test_cifar100.py',
                'tinyimagenet': 'test_tinyimagenet.py'}

# ---------------------------------------------------------------------------
# Settings

# The table's attacks unless --attacks says otherwise: clean and PGD-20 accuracy are what
# fast adversarial training papers report, this paper included; AutoAttack is the number
# reviewers trust, and the one that catastrophic overfitting cannot inflate.
DEFAULT_ATTACKS = 'clean,pgd20,aa'
# Training flags the grid sets itself: where runs go, and resuming them.
GRID_OWNS = {'out_dir', 'resume'}
# Test-script flags that come from the run (its epsilon, its seed's training flag of the same
# name, the architecture in its checkpoint) or from the grid (where things are, the attacks).
TEST_FLAGS_NOT_PASSED = {'model_path', 'out_dir', 'data_dir', 'epsilon', 'attacks', 'device',
                         'arch', 'width'}
# Seconds between two looks at the running processes or jobs.
POLL_S = 0.5
# Files the grid keeps beside each run directory, in GRID_DIR/runs/<name>/.
RECORD = 'grid-run.json'
LOCK = 'grid.lock'
TRAIN_OUT, EVAL_OUT = 'train.out', 'eval.out'


def build_parser():
    p = argparse.ArgumentParser(
        description='Train, evaluate and tabulate every combination of training flags. Any '
                    'flag of the training script may be given, with one value or several '
                    '(e.g. --method mixkl fgsm_rs --epsilon 8 16 --seed 0 1 2); flags of the '
                    'test script (e.g. --n_ex 1000) are passed to every evaluation.',
        formatter_class=HelpFormatter)
    p.add_argument('--dataset', required=True, choices=list(DATASETS))
    p.add_argument('--out_dir', '--out-dir', dest='out_dir', required=True,
                   help='the grid directory: runs/, grid.json, grid.md, grid.csv, grid.png')
    p.add_argument('--data-dir', '--data_dir', dest='data_dir', default=None,
                   help='given to both scripts (default: theirs, <dataset>-data)')
    p.add_argument('--attacks', type=evaluate.attack_list, default=DEFAULT_ATTACKS,
                   help='the attacks evaluated and tabulated, a comma list from '
                        f'{",".join(evaluate.ATTACKS)}')
    p.add_argument('--retry-failed', action='store_true',
                   help='run again the runs that failed (a diverged run stays diverged)')
    p.add_argument('--device', type=device_name,
                   help='given to both scripts (default: cuda when present)')
    local = p.add_argument_group('where the runs execute, on this machine')
    local.add_argument('--gpus', type=gpu_list, default=None,
                       help='0,1,2,3 or all: one run per GPU (or per --gpus-per-run GPUs) at once')
    local.add_argument('--parallel', type=positive_int, default=1,
                       help='runs at once on a CPU, the cores split between them')
    local.add_argument('--threads-per-run', type=positive_int, default=None,
                       help='CPU threads of each run (default: the cores / --parallel)')
    local.add_argument('--gpus-per-run', type=positive_int, default=1,
                       help='more than 1: each run under torchrun with this many processes')
    cluster = p.add_argument_group('on a SLURM cluster (submitit)')
    cluster.add_argument('--slurm', choices=['slurm', 'local'], default=None,
                         help='each run one job: slurm submits them with sbatch; local runs '
                              'the same jobs with submitit\'s local executor (a check of the '
                              'setup on one machine)')
    cluster.add_argument('--partition', help='the SLURM partition')
    cluster.add_argument('--time-min', type=positive_float, default=24 * 60,
                         help='each job\'s time limit in minutes; a job that reaches it saves '
                              'a checkpoint, is requeued and resumes')
    cluster.add_argument('--cpus-per-run', type=positive_int, default=8)
    cluster.add_argument('--sbatch', action='append', default=[], metavar='KEY=VALUE',
                         help='another sbatch option, e.g. --sbatch account=abc --sbatch '
                              'qos=high (may be repeated)')
    cluster.add_argument('--max-requeues', type=positive_int, default=30,
                         help='how often a job may hit its time limit and be requeued')
    cluster.add_argument('--signal-delay-s', type=positive_int, default=180,
                         help='seconds before the time limit at which a job is told to stop '
                              'and save')
    return p


def gpu_list(text):
    if text == 'all':
        return 'all'
    try:
        gpus = [int(g) for g in text.split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not "all" or a comma list of GPU numbers')
    if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise argparse.ArgumentTypeError(f'{text!r}: GPU numbers are distinct and >= 0')
    return gpus


positive_float = number_in_range(float, 0, low_open=True)


# ---------------------------------------------------------------------------
# The combinations

def split_flags(tokens):
    """['--method', 'a', 'b', '--no-augment'] -> [('--method', ['a', 'b']), ('--no-augment', [])]."""
    out = []
    for token in tokens:
        if token.startswith('--'):
            flag, _, value = token.partition('=')
            out.append((flag, [value] if value else []))
        elif not out:
            raise InputError(f'{token}: a value before any flag')
        else:
            out[-1][1].append(token)
    return out


def sort_flags(dataset, tokens):
    """(training axes: [(dest, flag, [values])], evaluation argv) from the extra command line.

    Every flag belongs to the training script (it may vary) or to the test script
    (passed to every evaluation, one value); any other is an InputError naming it.
    """
    train_actions = flags.build_parser(dataset)._option_string_actions
    test_actions = evaluate.build_parser(dataset)._option_string_actions
    axes, eval_argv, seen = [], [], set()  # seen: (script, dest)
    for flag, values in split_flags(tokens):
        action = train_actions.get(flag) or test_actions.get(flag)
        if action is None or action.dest in (GRID_OWNS if flag in train_actions
                                             else TEST_FLAGS_NOT_PASSED):
            scripts = f'{flags.TRAINING_SCRIPTS[dataset]} and {TEST_SCRIPTS[dataset]}'
            raise InputError(f'{flag}: not a flag grid.py passes on (see --help; the flags of '
                             f'{scripts}, less those the grid sets)')
        owner = (flag in train_actions, action.dest)
        if owner in seen:
            raise InputError(f'{flag}: given twice')
        seen.add(owner)
        if flag in train_actions:
            axes.append((action.dest, flag, values or [None]))
        elif len(values) > 1:
            raise InputError(f'{flag} {" ".join(values)}: a flag of the test script takes one '
                             'value (only training flags vary)')
        else:
            eval_argv += [flag, *values]
    return axes, eval_argv


def combinations(dataset, axes):
    """Every combination of the axes' values, as training argv, each checked by the training
    script's own parser (InputError naming the flag and the value)."""
    out = []
    for values in itertools.product(*[vals for _, _, vals in axes]):
        argv = []
        for (_, flag, _), value in zip(axes, values):
            argv += [flag] if value is None else [flag, value]
        args, _ = flags.parse_args(dataset, argv, strict=True)
        out.append(Combination(dataset, argv, settings(args)))
    return out


def settings(args):
    """A run's flags as a dict, less where things are: what makes two runs the same run."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in flags.LOCATION_FLAGS}


class Combination:
    """One run of the grid: its training argv, its settings, its folder GRID_DIR/runs/<name>."""

    def __init__(self, dataset, argv, config):
        self.dataset, self.argv, self.config = dataset, list(argv), config
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
        self.name = (f'{runs.run_name(dataset, config["arch"], config["method"], config["seed"])}'
                     f'-eps{config["epsilon"]:g}-{digest}')

    def folder(self, grid_dir):
        return os.path.join(grid_dir, 'runs', self.name)

    def to_json(self):
        return dict(name=self.name, dataset=self.dataset, argv=self.argv, config=self.config)

    @classmethod
    def from_json(cls, data):
        return cls(data['dataset'], data['argv'], data['config'])


# ---------------------------------------------------------------------------
# One combination on disk: what to do next

def run_dir_of(folder):
    """The training run directory in a combination's folder: the finished one, else the one
    with the newest checkpoint, else None."""
    if not os.path.isdir(folder):
        return None
    found = [os.path.join(folder, d) for d in os.listdir(folder)
             if runs.is_run_dir(os.path.join(folder, d))]
    for state in ('finished', 'interrupted'):
        candidates = [d for d in found if runs.run_state(d) == state]
        if candidates:
            return max(candidates, key=lambda d: os.path.getmtime(
                os.path.join(d, runs.FINAL if state == 'finished' else runs.CHECKPOINT)))
    return None


def evaluated(run_dir, attacks, epsilon_255):
    """True when both saved models have a result for every attack, at the run's radius."""
    try:
        results = runs.model_results(run_dir, [e for p in runs.run_evaluations(run_dir)
                                               for e in runs.read_evaluation(p)], epsilon_255)
    except InputError:
        return False
    return all(attack in results[key]['attacks'] for key in runs.MODELS for attack in attacks)


def next_step(combo, grid):
    """('train' | 'resume' | 'evaluate', argv of the script) for the combination, or None
    when it is trained and evaluated."""
    folder = combo.folder(grid.out_dir)
    run_dir = run_dir_of(folder)
    script = os.path.join(ROOT, flags.TRAINING_SCRIPTS[combo.dataset])
    where = (['--data-dir', grid.data_dir] if grid.data_dir else []) + \
        (['--device', grid.device] if grid.device else [])
    if run_dir is None:
        remove_unstarted(folder)
        return 'train', [script, *combo.argv, '--out_dir', folder, *where]
    if runs.run_state(run_dir) == 'interrupted':
        return 'resume', [script, '--resume', run_dir, *where]
    if evaluated(run_dir, grid.attacks, combo.config['epsilon']):
        return None
    test = os.path.join(ROOT, TEST_SCRIPTS[combo.dataset])
    return 'evaluate', [test, '--model_path', run_dir, '--out_dir', run_dir,
                        '--epsilon', format(combo.config['epsilon'], 'g'),
                        '--attacks', ','.join(grid.attacks), *grid.eval_argv, *where]


# A script that exits 0 but leaves its combination needing the same stage again (its
# output not where the grid reads it) is failed, not started again and again.
NO_PROGRESS = {
    'train': 'training exited 0 but left no finished or resumable run in the folder',
    'resume': 'resuming exited 0 but left the run unfinished',
    'evaluate': 'the evaluation exited 0 but results for every attack of both saved models '
                'are not in the run directory',
}


def record_no_progress(folder, combo, stage):
    """Record the combination as failed: its ``stage`` exited 0 yet is needed again."""
    message = NO_PROGRESS[stage]
    write_record(folder, combo, status='failed', stage=stage, exit_code=0, message=message)
    return message


def remove_unstarted(folder):
    """Run directories killed before their first checkpoint: nothing in them to resume."""
    if not os.path.isdir(folder):
        return
    for d in os.listdir(folder):
        path = os.path.join(folder, d)
        if runs.is_run_dir(path) and runs.run_state(path) == 'started' and not runs.in_use(path):
            shutil.rmtree(path)


def read_record(folder):
    path = os.path.join(folder, RECORD)
    if not os.path.isfile(path):
        return {}
    try:
        record = runs.read_json(path)
    except InputError:
        return {}
    return record if isinstance(record, dict) else {}


def write_record(folder, combo, **entries):
    record = {**read_record(folder), **combo.to_json(), **entries}
    atomic_write_text(os.path.join(folder, RECORD), json.dumps(record, indent=2))
    return record


def ended_for_good(record, grid):
    """True for a combination whose run failed or diverged, unless --retry-failed runs a
    failed one again (a diverged run would diverge again: it is never rerun)."""
    status = record.get('status')
    return status == 'diverged' or (status == 'failed' and not grid.retry_failed)


def outcome(stage, code, folder):
    """What a script's exit status means for the run: 'interrupted' (stopped by a signal,
    resumes), 'diverged' (training's status 1 after a divergence) or 'failed'."""
    if code < 0 or code >= 128:
        return 'interrupted'
    run_dir = run_dir_of(folder)
    if stage in ('train', 'resume') and code == 1 and run_dir and runs.diverged(run_dir):
        return 'diverged'
    return 'failed'


def last_error(path):
    """The last 'error:' line of a script's output (else its last line), for the report."""
    try:
        with open(path, errors='replace') as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ''
    errors = [line for line in lines if 'error:' in line]
    return (errors or lines or [''])[-1][:300]


def lock(folder):
    """The combination's lock (an open file holding flock), or None if another process has it.

    The scripts the grid starts inherit it: while a run the grid started still
    lives, even after the grid was killed, no other grid process takes the run."""
    os.makedirs(folder, exist_ok=True)
    f = open(os.path.join(folder, LOCK), 'a')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


# ---------------------------------------------------------------------------
# Starting the scripts

def die_with_parent():
    """In the child, before exec: SIGTERM when the grid dies, however it dies (kill -9
    too). The training script then saves a checkpoint and exits: nothing trains unseen."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: the lock still keeps another grid off the run
    if os.getppid() != parent:  # the grid died before prctl
        os.kill(os.getpid(), signal.SIGTERM)


def command(argv, slot):
    """The command line for a script's argv in ``slot`` (under torchrun for several processes)."""
    if slot.processes > 1:
        return [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                f'--nproc_per_node={slot.processes}', *argv]
    return [sys.executable, *argv]


class Slot:
    """Where one run executes: its GPUs (CUDA_VISIBLE_DEVICES), threads and processes."""

    def __init__(self, gpus=None, threads=None, processes=1):
        self.gpus, self.threads, self.processes = gpus, threads, processes

    def env(self):
        env = dict(os.environ)
        if self.gpus is not None:
            env['CUDA_VISIBLE_DEVICES'] = ','.join(map(str, self.gpus))
        if self.threads is not None:
            env['OMP_NUM_THREADS'] = str(self.threads)
        return env

    def describe(self):
        parts = []
        if self.gpus is not None:
            parts.append(f'GPU {",".join(map(str, self.gpus))}')
        if self.processes > 1:
            parts.append(f'{self.processes} processes')
        if self.threads is not None:
            parts.append(f'{self.threads} thread{"s" if self.threads > 1 else ""}')
        return ', '.join(parts)


def local_slots(grid):
    """The slots of a local grid: one per GPU group with --gpus, else --parallel of them."""
    k = grid.gpus_per_run
    if grid.gpus is not None:
        gpus = grid.gpus
        if gpus == 'all':
            import torch
            gpus = list(range(torch.cuda.device_count()))
            if not gpus:
                raise InputError('--gpus all: no GPU on this machine')
        if len(gpus) < k:
            raise InputError(f'--gpus-per-run {k} but only {len(gpus)} GPU(s) in --gpus')
        return [Slot(gpus[i:i + k], processes=k) for i in range(0, len(gpus) - k + 1, k)]
    threads = grid.threads_per_run or max(1, (os.cpu_count() or 1) // grid.parallel)
    return [Slot(threads=threads, processes=k) for _ in range(grid.parallel)]


# ---------------------------------------------------------------------------
# Running the grid on this machine

class Running:
    """A script the grid started for a combination, in a slot."""

    def __init__(self, combo, stage, argv, slot, folder, lock_file):
        self.combo, self.stage, self.slot, self.lock_file = combo, stage, slot, lock_file
        self.folder = folder
        self.out_path = os.path.join(folder, EVAL_OUT if stage == 'evaluate' else TRAIN_OUT)
        with open(self.out_path, 'a') as out:
            out.write(f'\n$ {" ".join(command(argv, slot))}\n')
            out.flush()
            self.process = subprocess.Popen(
                command(argv, slot), stdout=out, stderr=subprocess.STDOUT, env=slot.env(),
                preexec_fn=die_with_parent, start_new_session=True,
                pass_fds=[lock_file.fileno()])
        self.started = time.time()


class LocalGrid:
    """Runs the combinations' scripts on this machine, a slot each, from the main thread.

    The children are started in their own session, so a Ctrl-C reaches only the
    grid, which then sends each of them one SIGTERM (they save a checkpoint) and
    waits for them.
    """

    def __init__(self, grid, combos, report):
        self.grid, self.report = grid, report
        self.pending = list(combos)
        self.free = local_slots(grid)
        self.running = []
        self.stopping = False

    def run(self):
        previous = {s: signal.signal(s, self._stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self.pending or self.running:
                self._start_what_fits()
                self._reap()
                if self.stopping and not self.running:
                    break
                time.sleep(POLL_S)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return not self.stopping

    def _stop(self, signum, frame):
        if not self.stopping:
            self.report.line(f'{signal.Signals(signum).name}: stopping; the running scripts save '
                             'a checkpoint (rerun the same command to continue)')
        self.stopping = True
        self.pending = []
        for r in self.running:
            if r.process.poll() is None:
                r.process.send_signal(signal.SIGTERM)

    def _start_what_fits(self):
        waiting = []
        while self.free and self.pending and not self.stopping:
            combo = self.pending.pop(0)
            folder = combo.folder(self.grid.out_dir)
            lock_file = lock(folder)
            if lock_file is None:  # another grid process (or a run it left) has it
                waiting.append(combo)
                self.report.waiting(combo)
                continue
            started = self._start(combo, folder, lock_file)
            if not started:
                lock_file.close()
        self.pending += waiting

    def _start(self, combo, folder, lock_file, succeeded=None):
        """Start the combination's next stage, if it has one; ``succeeded``: the stage that
        has just exited 0 for it."""
        record = read_record(folder)
        if ended_for_good(record, self.grid):
            self.report.finished(combo, record['status'], record.get('message', ''))
            return False
        step = next_step(combo, self.grid)
        if step is None:
            write_record(folder, combo, status='done')
            self.report.finished(combo, 'done')
            return False
        stage, argv = step
        if stage == succeeded:
            self.report.finished(combo, 'failed', record_no_progress(folder, combo, stage), stage)
            return False
        slot = self.free.pop(0)
        write_record(folder, combo, status='running', stage=stage)
        self.running.append(Running(combo, stage, argv, slot, folder, lock_file))
        self.report.started(combo, stage, slot)
        return True

    def _reap(self):
        for r in list(self.running):
            code = r.process.poll()
            if code is None:
                continue
            self.running.remove(r)
            self.free.append(r.slot)
            minutes = (time.time() - r.started) / 60
            if code == 0:
                # Trained: evaluate next (in the same turn, the lock kept); evaluated: done.
                write_record(r.folder, r.combo, status='pending')
                if not self.stopping and self._start(r.combo, r.folder, r.lock_file, r.stage):
                    continue
            else:
                state = outcome(r.stage, code, r.folder)
                message = last_error(r.out_path)
                write_record(r.folder, r.combo, status='pending' if state == 'interrupted'
                             else state, stage=r.stage, exit_code=code, message=message)
                self.report.finished(r.combo, state, message, r.stage, minutes)
            r.lock_file.close()


# ---------------------------------------------------------------------------
# Running the grid as SLURM jobs (submitit)

class GridJob:
    """One combination as a submitit job: train (or resume), then evaluate, in one job.

    When the job reaches its time limit or is pre-empted, submitit calls
    ``checkpoint``: the running script gets SIGTERM, saves a checkpoint, and the
    job is requeued; the requeued job finds the checkpoint and resumes.
    """

    def __init__(self, grid, combo):
        self.grid, self.combo = grid, combo
        self._process = None

    def __call__(self):
        folder = self.combo.folder(self.grid.out_dir)
        lock_file = lock(folder)
        while lock_file is None:  # a local grid (or an earlier job) still holds the run
            time.sleep(10)
            lock_file = lock(folder)
        slot = Slot(processes=self.grid.gpus_per_run)
        try:
            succeeded = None  # the stage that has just exited 0
            while True:
                step = next_step(self.combo, self.grid)
                if step is None:
                    write_record(folder, self.combo, status='done')
                    return 'done'
                stage, argv = step
                if stage == succeeded:
                    record_no_progress(folder, self.combo, stage)
                    return 'failed'
                write_record(folder, self.combo, status='running', stage=stage)
                running = Running(self.combo, stage, argv, slot, folder, lock_file)
                self._process = running.process
                while running.process.poll() is None:  # not wait(): see checkpoint
                    time.sleep(POLL_S)
                code = running.process.returncode
                if code != 0:
                    state = outcome(stage, code, folder)
                    message = last_error(running.out_path)
                    write_record(folder, self.combo, status='pending' if state == 'interrupted'
                                 else state, stage=stage, exit_code=code, message=message)
                    return state
                succeeded = stage
        finally:
            lock_file.close()

    def checkpoint(self, *args, **kwargs):
        """Called by submitit in a signal handler: stop the script (it saves), then requeue."""
        import submitit
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            deadline = time.time() + max(10, self.grid.signal_delay_s - 30)
            while process.poll() is None and time.time() < deadline:
                time.sleep(POLL_S)
        return submitit.helpers.DelayedSubmission(GridJob(self.grid, self.combo))


def submitit_executor(grid):
    """submitit's executor for --slurm: SLURM's, or the local one with the same behaviour."""
    try:
        import submitit
    except ImportError:
        raise InputError('--slurm needs the submitit package: pip install submitit')
    folder = os.path.join(grid.out_dir, 'slurm')
    extra = dict(option.split('=', 1) for option in grid.sbatch)
    if grid.slurm == 'local':
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=grid.max_requeues)
        # A check of the whole path: every job at once, on the CPU (no GPU is shared out).
        executor.update_parameters(timeout_min=grid.time_min, signal_delay_s=grid.signal_delay_s,
                                   gpus_per_node=0)
    else:
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=grid.max_requeues)
        executor.update_parameters(
            time=int(math.ceil(grid.time_min)), gpus_per_node=grid.gpus_per_run,
            ntasks_per_node=1, cpus_per_task=grid.cpus_per_run, signal_delay_s=grid.signal_delay_s,
            job_name='mixkl-grid', **({'partition': grid.partition} if grid.partition else {}),
            **({'additional_parameters': extra} if extra else {}))
    return executor


def queued_job(grid, record):
    """The SLURM job an earlier grid process submitted for a run, if it is not over."""
    if grid.slurm != 'slurm' or record.get('status') not in ('submitted', 'running') \
            or not record.get('job_id'):
        return None
    import submitit
    job = submitit.SlurmJob(os.path.join(grid.out_dir, 'slurm'), record['job_id'])
    return None if job.done() else job


def run_on_cluster(grid, combos, report):
    """Submit a job per combination not done and not already queued; wait for them all."""
    executor = submitit_executor(grid)
    # The jobs import this module by name: they must find it.
    os.environ['PYTHONPATH'] = os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')]))
    jobs = {}
    for combo in combos:
        folder = combo.folder(grid.out_dir)
        os.makedirs(folder, exist_ok=True)
        record = read_record(folder)
        if ended_for_good(record, grid):
            report.finished(combo, record['status'], record.get('message', ''))
            continue
        if next_step(combo, grid) is None:
            write_record(folder, combo, status='done')
            report.finished(combo, 'done')
            continue
        queued = queued_job(grid, record)
        if queued is not None:  # submitted by an earlier grid process, still queued or running
            report.line(f'waiting for {combo.name}: job {queued.job_id} is still in SLURM')
            jobs[combo.name] = (combo, queued)
            continue
        job = executor.submit(GridJob(grid, combo))
        write_record(folder, combo, status='submitted', job_id=str(job.job_id))
        report.line(f'submitted {combo.name}: job {job.job_id}')
        jobs[combo.name] = (combo, job)
    while jobs:
        for name, (combo, job) in list(jobs.items()):
            if job.done():
                del jobs[name]
                try:
                    state = job.result()
                except Exception as e:  # the job itself failed (submitit raises its error)
                    state = 'failed'
                    lines = str(e).strip().splitlines() or [type(e).__name__]
                    write_record(combo.folder(grid.out_dir), combo, status='failed',
                                 message=lines[-1][:300])
                record = read_record(combo.folder(grid.out_dir))
                report.finished(combo, state, record.get('message', ''))
        time.sleep(POLL_S * 4)
    return True


# ---------------------------------------------------------------------------
# Progress

class Report:
    """A line when each run starts, finishes, fails or is skipped; a bar over the runs."""

    def __init__(self, combos):
        self.total = len(combos)
        self.bar = progress(total=self.total, desc='grid', unit='runs', leave=True)
        self.announced = set()

    def line(self, text):
        stamp = time.strftime('%H:%M:%S')
        (self.bar.write if to_terminal() else print)(f'[{stamp}] {text}')
        sys.stdout.flush()

    def started(self, combo, stage, slot):
        where = slot.describe()
        self.line(f'{stage} {combo.name}{f" ({where})" if where else ""}')

    def waiting(self, combo):
        if combo.name not in self.announced:
            self.announced.add(combo.name)
            self.line(f'waiting for {combo.name}: another process runs it')

    def finished(self, combo, state, message='', stage=None, minutes=None):
        took = f' after {minutes:.1f} min' if minutes is not None else ''
        if state == 'done':
            self.line(f'done {combo.name}')
        elif state == 'interrupted':
            self.line(f'interrupted {combo.name} ({stage}){took}: resumes on the next run')
            return
        else:
            hint = ' (--retry-failed runs it again)' if state == 'failed' else ''
            self.line(f'{state.upper()} {combo.name}{f" ({stage})" if stage else ""}{took}'
                      f'{": " + message if message else ""}{hint}')
        self.bar.update()

    def close(self):
        self.bar.close()


# ---------------------------------------------------------------------------
# The table and the picture

def known_combinations(grid_dir):
    """Every combination ever run in the grid directory (this command's and earlier ones')."""
    found = []
    for folder in sorted(glob_folders(os.path.join(grid_dir, 'runs'))):
        record = read_record(folder)
        if {'dataset', 'argv', 'config'} <= set(record):
            found.append((Combination.from_json(record), record))
    return found


def glob_folders(path):
    return [os.path.join(path, d) for d in os.listdir(path)] if os.path.isdir(path) else []


def varying(configs):
    """The settings (other than the seed) that differ between ``configs``, in the training
    script's flag order. A setting that only follows others (each method's own --alpha, the
    width of each --arch) is left out unless some configuration sets it explicitly."""
    order = [a.dest for a in flags.build_parser(configs[0]['dataset'])._actions] \
        if configs else []
    keys = sorted({k for c in configs for k in c} - {'seed'},
                  key=lambda k: (order.index(k) if k in order else len(order), k))
    return [k for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1
            and not all(is_default(c, k) for c in configs)]


def is_default(config, key):
    """True if the run's ``key`` is what the training script gives it when not written."""
    default = flags.own_defaults(config).get(key)
    if default is None:
        default = flags.build_parser(config['dataset']).get_default(key)
    return config.get(key) == default


def mean_std(values):
    """(mean, sample standard deviation) of ``values``; None where undefined."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def table(grid_dir, attacks):
    """The grid's rows, one per configuration, as dicts of numbers (grid.csv's columns)."""
    entries = []
    for combo, record in known_combinations(grid_dir):
        run_dir = run_dir_of(combo.folder(grid_dir))
        run = None
        if run_dir is not None:
            try:
                run = runs.read_run(run_dir)
            except InputError as e:
                print(f'note: {e}; run left out of the table', file=sys.stderr)
        entries.append((combo, record, run))
    columns = varying([combo.config for combo, _, _ in entries])
    groups = {}
    for combo, record, run in entries:
        key = json.dumps({k: v for k, v in combo.config.items() if k != 'seed'}, sort_keys=True)
        groups.setdefault(key, []).append((combo, record, run))
    rows = []
    for members in groups.values():
        config = members[0][0].config
        finished = [run for _, _, run in members if run and run['state'] == 'finished']
        row = {c: config.get(c) for c in columns}
        row['dataset'] = config['dataset']
        row['epsilon'] = config['epsilon']
        row['seeds'] = len(finished)
        for key in runs.MODELS:
            for attack in attacks:
                values = [run['results'][key]['attacks'][attack]['accuracy'] for run in finished
                          if attack in run['results'][key]['attacks']]
                row[f'{key}_{attack}_mean'], row[f'{key}_{attack}_std'] = mean_std(values)
        row['minutes'] = mean_std([run['minutes'] for run in finished])[0]
        row['co'] = sum(1 for _, _, run in members if run and run['alarm_epochs'])
        row['checks_warned'] = sum(run['results'][key]['warnings'] for run in finished
                                   for key in runs.MODELS)
        row['failed'] = sum(1 for _, record, _ in members if record.get('status') == 'failed')
        row['diverged'] = sum(1 for _, record, _ in members if record.get('status') == 'diverged')
        row['_runs'] = [run for _, _, run in members if run]
        row['_config'] = config
        rows.append(row)
    rows.sort(key=lambda r: [sort_key(r.get(c)) for c in columns])
    return columns, rows


def sort_key(value):
    """Numbers in numeric order, before anything else in text order."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, '')
    return (1, 0, json.dumps(value))


def csv_text(columns, rows, attacks):
    fields = [*columns, 'seeds'] + [f'{key}_{attack}_{stat}' for key in runs.MODELS
                                    for attack in attacks for stat in ('mean', 'std')] \
        + ['minutes', 'co', 'checks_warned', 'failed', 'diverged']
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction='ignore')
    writer.writeheader()
    writer.writerows({k: '' if v is None else v for k, v in row.items()} for row in rows)
    return out.getvalue()


def percent_pm(mean, std):
    """'41.23 ± 0.52' (percent); the mean alone for one seed; '-' for none."""
    if mean is None:
        return '-'
    return f'{100 * mean:.2f}' + (f' ± {100 * std:.2f}' if std is not None else '')


def markdown(columns, rows, attacks):
    header = [*columns, 'seeds'] + [f'{key} {evaluate.LABELS[attack]}' for key in runs.MODELS
                                    for attack in attacks] \
        + ['minutes', 'co', 'checks warned', 'failed']
    lines = ['| ' + ' | '.join(header) + ' |', '|---' * len(header) + '|']
    for row in rows:
        problems = ', '.join(f'{row[k]} {k}' for k in ('failed', 'diverged') if row[k]) or '-'
        cells = [cell_text(row[c]) for c in columns] + [str(row['seeds'])]
        cells += [percent_pm(row[f'{key}_{attack}_mean'], row[f'{key}_{attack}_std'])
                  for key in runs.MODELS for attack in attacks]
        cells += [f'{row["minutes"]:.1f}' if row['minutes'] is not None else '-',
                  str(row['co']), str(row['checks_warned']), problems]
        lines.append('| ' + ' | '.join(cells) + ' |')
    note = ('Accuracy in %, mean ± sample standard deviation over the seeds that finished; '
            'co: seeds whose catastrophic-overfitting alarm fired; checks warned: warnings of '
            'the evaluation\'s gradient-masking checks, over seeds and both models.')
    return '\n'.join(lines) + '\n\n' + note + '\n'


def cell_text(value):
    return format(value, 'g') if isinstance(value, float) else str(value)


def plot_series(columns, rows):
    """plots.plot_grid's series: per configuration, the per-epoch PGD accuracy of each seed."""
    series = []
    for row in rows:
        config = row['_config']
        split = 'validation' if config.get('val_examples') else \
            DATASETS[config['dataset']].get('test_split', 'test')
        label = ', '.join(f'{c}={cell_text(row[c])}' for c in columns
                          if c not in ('dataset', 'epsilon')) or 'all runs'
        series.append(dict(panel=(DATASETS[config['dataset']]['name'], config['epsilon']),
                           label=label, attack=f'PGD-{config["pgd_iters"]}', split=split,
                           runs=[[r['test_pgd_acc'] for r in run['rows']]
                                 for run in row['_runs'] if run['rows']]))
    return series


def write_outputs(grid):
    """grid.md, grid.csv, grid.png and the grid.json manifest; returns the markdown."""
    columns, rows = table(grid.out_dir, grid.attacks)
    text = markdown(columns, rows, grid.attacks)
    atomic_write_text(os.path.join(grid.out_dir, 'grid.md'), text)
    atomic_write_text(os.path.join(grid.out_dir, 'grid.csv'), csv_text(columns, rows, grid.attacks))
    plots.plot_grid(plot_series(columns, rows), os.path.join(grid.out_dir, 'grid.png'))
    write_manifest(grid)
    return text


def write_manifest(grid):
    """grid.json: every combination of the grid directory, its run directory and status."""
    entries = []
    for combo, record in known_combinations(grid.out_dir):
        run_dir = run_dir_of(combo.folder(grid.out_dir))
        entries.append(dict(name=combo.name, argv=combo.argv, status=record.get('status'),
                            folder=combo.folder(grid.out_dir), run_dir=run_dir,
                            exit_code=record.get('exit_code'), message=record.get('message'),
                            job_id=record.get('job_id')))
    manifest = dict(dataset=grid.dataset, attacks=grid.attacks,
                    command=' '.join(['grid.py', *sys.argv[1:]]), runs=entries)
    atomic_write_text(os.path.join(grid.out_dir, 'grid.json'), json.dumps(manifest, indent=2))


# ---------------------------------------------------------------------------
# main

def parse(argv=None):
    """The grid's own flags (a namespace) and its combinations; InputError for bad input."""
    parser = build_parser()
    parser.error = flags.raise_input_error  # one 'error:' line, as grid.py's other bad input
    grid, rest = parser.parse_known_args(argv)
    if grid.slurm and (grid.gpus is not None or grid.parallel != 1):
        parser.error('--gpus and --parallel are for a local grid; with --slurm each run is a job')
    for option in grid.sbatch:
        if '=' not in option:
            parser.error(f'--sbatch {option}: KEY=VALUE, e.g. --sbatch account=abc')
    if not grid.slurm:
        local_slots(grid)  # --gpus checked against --gpus-per-run before anything is written
    axes, grid.eval_argv = sort_flags(grid.dataset, rest)
    # The evaluation flags, checked once by the test script's own parser.
    test_parser = evaluate.build_parser(grid.dataset)
    test_parser.error = flags.raise_input_error
    test_parser.parse_args(['--model_path', 'x', *grid.eval_argv])
    combos = combinations(grid.dataset, axes)
    # Absolute: a SLURM job may start in another directory.
    grid.out_dir = os.path.abspath(grid.out_dir)
    grid.data_dir = grid.data_dir and os.path.abspath(grid.data_dir)
    return grid, combos


def main(argv=None):
    try:
        grid, combos = parse(argv)
        check_writable_dir(grid.out_dir, '--out_dir')
        unique = list({c.name: c for c in combos}.values())
        print(f'grid: {len(unique)} run(s) of {flags.TRAINING_SCRIPTS[grid.dataset]} in '
              f'{grid.out_dir}', flush=True)
        for combo in unique:  # recorded before anything runs: the table knows every run
            folder = combo.folder(grid.out_dir)
            os.makedirs(folder, exist_ok=True)
            if not read_record(folder):
                write_record(folder, combo, status='pending')
        write_manifest(grid)
        report = Report(unique)
        try:
            if grid.slurm:
                complete = run_on_cluster(grid, unique, report)
            else:
                complete = LocalGrid(grid, unique, report).run()
        finally:
            report.close()
        text = write_outputs(grid)
    except InputError as e:
        print_error(e)
        return 2
    except OSError as e:
        return failed_write(e)
    print('\n' + text)
    print(f'table: {os.path.join(grid.out_dir, "grid.md")}, grid.csv, grid.png')
    if not complete:
        return 128 + signal.SIGTERM
    return 0


if __name__ == '__main__':
    # Through the module 'grid', not '__main__': submitit's jobs unpickle GridJob by name.
    import grid
    sys.exit(grid.main())
