"""grid.py without running anything: its flags, combinations and slots, the next step of
each combination and the table, on grid directories written by hand (every number known)."""
import csv
import json
import os
import shutil
import signal
import statistics
import sys
import time
from types import SimpleNamespace

import pytest

import flags
import grid
import runs
from conftest import table_rows, write_results, write_run
from utils import sha256_file


def test_flags_are_read_with_and_without_an_equals_sign():
    assert grid.split_flags(['--epsilon=8', '--method', 'mixkl', 'fgsm_rs', '--no-augment',
                             '--seed', '0', '--lr-max=0.05']) == [
        ('--epsilon', ['8']), ('--method', ['mixkl', 'fgsm_rs']), ('--no-augment', []),
        ('--seed', ['0']), ('--lr-max', ['0.05'])]


@pytest.mark.parametrize('extra, message', [
    (['--epsilon', '8', '300'], 'argument --epsilon: 300.0 must be <= 255'),
    (['--method', 'mixkl', 'pgd'], "argument --method: invalid choice: 'pgd'"),
    (['--bogus', '1'], '--bogus: not a flag grid.py passes on'),
    (['--resume', 'x'], '--resume: not a flag grid.py passes on'),
    (['--model_path', 'x'], '--model_path: not a flag grid.py passes on'),  # the grid's own
    (['--n_ex', '10', '20'], '--n_ex 10 20: a flag of the test script takes one value'),
    (['--n_ex', '0'], 'argument --n_ex/--n-ex: 0 must be >= 1'),
    (['--lr-schedule', 'cyclic', '--momentum-min', '0.95'], '--momentum 0.9: the cyclic'),
    (['--gpus', '0,x'], 'argument --gpus: \'0,x\' is not "all" or a comma list of GPU numbers'),
    (['--gpus', '0,1,0'], "argument --gpus: '0,1,0': GPU numbers are distinct and >= 0"),
    (['--gpus', '1,-1'], "argument --gpus: '1,-1': GPU numbers are distinct and >= 0"),
    (['--gpus', '0,1', '--gpus-per-run', '3'], '--gpus-per-run 3 but only 2 GPU(s) in --gpus'),
    (['--slurm', 'local', '--gpus', '0'], '--gpus and --parallel are for a local grid'),
    (['--slurm', 'local', '--parallel', '2'], '--gpus and --parallel are for a local grid'),
    (['--slurm', 'local', '--sbatch', 'account'], '--sbatch account: KEY=VALUE'),
    (['--slurm', 'local', '--time-min', '0'], 'argument --time-min: 0.0 must be > 0'),
    (['--device', 'mps'], 'argument --device: the scripts run on cpu or cuda, not mps'),
    (['--epsilon', '8', '--lr-max', '0.1', '--epsilon=16'], '--epsilon: given twice'),
    (['--n_ex', '10', '--n-ex', '20'], '--n-ex: given twice'),
])
def test_bad_flags_are_refused_before_any_run_starts(tmp_path, capsys, extra, message):
    code = grid.main(['--dataset', 'cifar10', '--out_dir', str(tmp_path / 'grid'), '--data-dir',
                      str(tmp_path / 'data'), '--epochs', '2', *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith('error: ') and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / 'grid' / 'runs')


def test_step_sizes_follow_epsilon_and_an_explicit_flag_wins():
    def parsed(*argv):
        return flags.parse_args('cifar10', list(argv))[0]
    for method, at_8 in (('mixkl', 8), ('n_fgsm', 8), ('fgsm_rs', 10), ('pgd_at', 2)):
        assert parsed('--method', method).alpha == at_8, 'at eps 8: the values of before'
        assert parsed('--method', method, '--epsilon', '16').alpha == 2 * at_8
    assert parsed().pgd_alpha == 2 and parsed('--epsilon', '32').pgd_alpha == 8
    assert parsed('--epsilon', '32', '--alpha', '5', '--pgd-alpha', '3').alpha == 5
    assert parsed('--epsilon', '32', '--pgd-alpha', '3').pgd_alpha == 3


def test_the_table_rows_put_numbers_in_numeric_order():
    assert sorted([16.0, 8.0, 4.5], key=grid.sort_key) == [4.5, 8.0, 16.0]
    assert grid.percent_pm(0.41234, 0.0052) == '41.23 ± 0.52'
    assert grid.percent_pm(0.5, None) == '50.00' and grid.percent_pm(None, None) == '-'
    assert grid.percent_pm(0.0, 0.0) == '0.00 ± 0.00', 'no image left correct is a result'
    assert grid.mean_std([0.2]) == (0.2, None)


def test_asking_for_slurm_without_submitit_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, 'submitit', None)  # import submitit now fails
    parsed, _ = grid.parse(['--dataset', 'cifar10', '--out_dir', str(tmp_path), '--slurm',
                            'slurm'])
    with pytest.raises(grid.InputError, match='pip install submitit'):
        grid.submitit_executor(parsed)


class RecordingExecutor:
    """submitit's executors, as far as the grid uses them: what they were given."""

    def __init__(self, **kwargs):
        self.kwargs, self.parameters = kwargs, {}

    def update_parameters(self, **parameters):
        self.parameters.update(parameters)


def test_slurm_jobs_get_the_time_gpus_cpus_partition_and_sbatch_options_asked_for(
        monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, 'submitit', SimpleNamespace(
        SlurmExecutor=RecordingExecutor, LocalExecutor=RecordingExecutor))
    parsed, _ = grid.parse(['--dataset', 'cifar10', '--out_dir', str(tmp_path), '--slurm',
                            'slurm', '--partition', 'gpu', '--time-min', '90.5',
                            '--gpus-per-run', '2', '--cpus-per-run', '6', '--sbatch',
                            'account=abc', '--sbatch', 'qos=high=1', '--max-requeues', '4',
                            '--signal-delay-s', '120'])
    executor = grid.submitit_executor(parsed)
    assert executor.kwargs == dict(folder=str(tmp_path / 'slurm'), max_num_timeout=4)
    assert executor.parameters == dict(
        time=91, gpus_per_node=2, ntasks_per_node=1, cpus_per_task=6, signal_delay_s=120,
        job_name='mixkl-grid', partition='gpu',
        additional_parameters={'account': 'abc', 'qos': 'high=1'})
    parsed, _ = grid.parse(['--dataset', 'cifar10', '--out_dir', str(tmp_path), '--slurm',
                            'local', '--time-min', '10', '--signal-delay-s', '60'])
    executor = grid.submitit_executor(parsed)
    assert executor.kwargs == dict(folder=str(tmp_path / 'slurm'), max_num_timeout=30)
    assert executor.parameters == dict(timeout_min=10, signal_delay_s=60, gpus_per_node=0)


def test_slots_share_the_gpus_and_torchrun_starts_several_processes():
    parsed = grid.build_parser().parse_args(['--dataset', 'cifar10', '--out_dir', 'x',
                                             '--gpus', '0,1,2,3', '--gpus-per-run', '2'])
    slots = grid.local_slots(parsed)
    assert [s.env()['CUDA_VISIBLE_DEVICES'] for s in slots] == ['0,1', '2,3']
    parsed.gpus = [0, 1, 2]  # the third GPU is too few for a run of 2: it stays idle
    assert [s.env()['CUDA_VISIBLE_DEVICES'] for s in grid.local_slots(parsed)] == ['0,1']
    parsed.gpus = [3, 1]  # just enough for one run
    assert [s.env()['CUDA_VISIBLE_DEVICES'] for s in grid.local_slots(parsed)] == ['3,1']
    assert grid.command(['MIX_KL_CIFAR10.py', '--seed', '1'], slots[0])[1:5] == \
        ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    assert grid.command(['a.py'], grid.Slot()) == [sys.executable, 'a.py']


def test_parallel_runs_share_the_cpus_unless_threads_per_run_is_given(monkeypatch):
    monkeypatch.setattr(os, 'cpu_count', lambda: 8)
    parsed = grid.build_parser().parse_args(['--dataset', 'cifar10', '--out_dir', 'x',
                                             '--parallel', '2'])
    assert [s.env()['OMP_NUM_THREADS'] for s in grid.local_slots(parsed)] == ['4', '4']
    parsed.parallel = 16  # more runs than CPUs: one thread each
    assert {s.env()['OMP_NUM_THREADS'] for s in grid.local_slots(parsed)} == {'1'}
    parsed.threads_per_run = 3
    assert {s.env()['OMP_NUM_THREADS'] for s in grid.local_slots(parsed)} == {'3'}


def test_gpus_all_is_every_gpu_of_the_machine_and_refused_on_one_without(monkeypatch):
    import torch
    parsed = grid.build_parser().parse_args(['--dataset', 'cifar10', '--out_dir', 'x',
                                             '--gpus', 'all'])
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 3)
    assert [s.gpus for s in grid.local_slots(parsed)] == [[0], [1], [2]]
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 0)
    with pytest.raises(grid.InputError, match='^--gpus all: no GPU on this machine$'):
        grid.local_slots(parsed)


def test_the_report_says_where_each_run_executes():
    assert grid.Slot([2, 3], processes=2).describe() == 'GPU 2,3, 2 processes'
    assert grid.Slot([1]).describe() == 'GPU 1'
    assert grid.Slot(threads=1).describe() == '1 thread'
    assert grid.Slot(threads=4, processes=2).describe() == '2 processes, 4 threads'
    assert grid.Slot().describe() == ''


# ---------------------------------------------------------------------------
# The table and the next step, on grids written by hand: every number is known

def hand_made_grid(out, plan):
    """A grid directory as grid.py leaves it, without training: ``plan`` maps
    (method, epsilon, seed) to None (no run: it failed before training) or to
    (status, AutoAttack accuracy of best, of final, warned checks of both, alarm fired, minutes)."""
    combos = grid.parse(['--dataset', 'cifar10', '--out_dir', str(out), '--method', 'mixkl',
                         'fgsm_rs', '--epsilon', '8', '16', '--seed', '0', '1', '2'])[1]
    for combo in combos:
        c = combo.config
        entry = plan.get((c['method'], c['epsilon'], c['seed']))
        folder = combo.folder(str(out))
        os.makedirs(folder)
        if entry is None:
            grid.write_record(folder, combo, status='failed', exit_code=1)
            continue
        status, best_aa, final_aa, warned, alarm, minutes = entry
        grid.write_record(folder, combo, status=status)
        # Two epochs; when asked to, the alarm's columns fire after the second, and after
        # a third that takes no time (an alarm fired twice is still one seed in 'co').
        metrics = [(minutes * 20, minutes * 10, 0.5, 0.3, dict(alarm_fgsm_acc=0.5,
                                                                alarm_pgd_acc=0.4)),
                   (minutes * 20, minutes * 10, 0.6, 0.35,
                    dict(alarm_fgsm_acc=0.5, alarm_pgd_acc=0.1 if alarm else 0.4))]
        if alarm:
            metrics.append((0, 0, 0.6, 0.35, dict(alarm_fgsm_acc=0.5, alarm_pgd_acc=0.1)))
        run = write_run(out / 'runs' / combo.name, 'run', combo.argv, metrics)
        write_results(run / 'results.json', [(run / name, sha256_file(run / name), aa)
                                             for name, aa in ((runs.BEST, best_aa),
                                                              (runs.FINAL, final_aa))],
                      epsilon_255=c['epsilon'])
        report = json.loads((run / 'results.json').read_text())
        # The warnings are shared out between the best and the final model.
        for entry, count in zip(report['results'], (warned - warned // 2, warned // 2)):
            entry['checks'] = [dict(name='c', verdict='warn', numbers={}, meaning='.')] * count
        (run / 'results.json').write_text(json.dumps(report))
        if status == 'diverged':  # stopped in its last epoch: no final model, a checkpoint
            (run / runs.FINAL).unlink()
            (run / runs.CHECKPOINT).write_bytes(b'')
    return combos


def every_run_done():
    """hand_made_grid's plan where every run finished and was evaluated alike."""
    return {(m, e, s): ('done', 0.4, 0.4, 0, False, 1.0)
            for m in ('mixkl', 'fgsm_rs') for e in (8.0, 16.0) for s in range(3)}


def test_the_table_of_a_grid_is_the_mean_and_std_of_each_configurations_seeds(tmp_path):
    plan = {}
    for m, method in enumerate(('mixkl', 'fgsm_rs')):
        for e, eps in enumerate((8.0, 16.0)):
            for seed in range(3):
                plan[method, eps, seed] = ('done', 0.5 - 0.1 * m - 0.2 * e + 0.01 * seed,
                                           0.45 - 0.1 * m - 0.2 * e - 0.02 * seed, seed,
                                           seed == 2 and method == 'fgsm_rs', 1.0 + seed ** 2)
    plan['mixkl', 16.0, 1] = None  # failed before its first checkpoint
    # Diverged after its alarm fired: a seed in 'co' and a curve in the figure, not in the means.
    plan['fgsm_rs', 8.0, 0] = ('diverged', 0.1, 0.1, 0, True, 1.0)
    hand_made_grid(tmp_path, plan)

    columns, rows = grid.table(str(tmp_path), ['clean', 'aa'])

    assert columns == ['method', 'epsilon']
    # Numbers in numeric order (8 before 16), text in text order.
    assert [(r['method'], r['epsilon']) for r in rows] == [
        ('fgsm_rs', 8.0), ('fgsm_rs', 16.0), ('mixkl', 8.0), ('mixkl', 16.0)]
    for row in rows:
        key = (row['method'], row['epsilon'])
        # Only finished runs are seeds: not the diverged one, whose best model was evaluated.
        done = [v for (m, e, _), v in sorted(plan.items()) if (m, e) == key and v
                and v[0] == 'done']
        assert row['seeds'] == len(done)
        for i, model in ((1, 'best'), (2, 'final')):
            values = [v[i] for v in done]
            assert row[f'{model}_aa_mean'] == pytest.approx(statistics.mean(values))
            assert row[f'{model}_aa_std'] == pytest.approx(statistics.stdev(values))
            assert row[f'{model}_clean_mean'] == pytest.approx(0.9)
        assert row['minutes'] == pytest.approx(statistics.mean(v[5] for v in done))
        assert row['checks_warned'] == sum(v[3] for v in done)
        assert row['co'] == sum(1 for (m, e, _), v in plan.items() if (m, e) == key and v
                                and v[4])
        assert row['failed'] == sum(1 for (m, e, _), v in plan.items() if (m, e) == key and not v)
        assert row['diverged'] == sum(1 for (m, e, _), v in plan.items()
                                      if (m, e) == key and v and v[0] == 'diverged')
    assert [r['seeds'] for r in rows] == [2, 3, 3, 2]
    assert [r['co'] for r in rows] == [2, 1, 0, 0]
    assert [r['minutes'] for r in rows] == pytest.approx([(2 + 5) / 2, 8 / 3, 8 / 3, 3.0])
    # Every seed that trained is a curve of the figure, the diverged one too.
    assert [len(s['runs']) for s in grid.plot_series(columns, rows)] == [3, 3, 3, 2]
    assert [r['failed'] for r in rows] == [0, 0, 0, 1] and rows[0]['diverged'] == 1

    text = grid.markdown(columns, rows, ['clean', 'aa'])
    cells = table_rows(text.split('\n\n')[0])
    row = rows[2]
    assert cells[2] == {
        'method': 'mixkl', 'epsilon': '8', 'seeds': '3',
        'best clean': '90.00 ± 0.00', 'best AutoAttack': grid.percent_pm(row['best_aa_mean'],
                                                                        row['best_aa_std']),
        'final clean': '90.00 ± 0.00', 'final AutoAttack': '43.00 ± 2.00',
        'minutes': '2.7', 'co': '0', 'checks warned': '3', 'failed': '-'}
    assert cells[2]['best AutoAttack'] == '51.00 ± 1.00'
    assert (cells[0]['failed'], cells[3]['failed']) == ('1 diverged', '1 failed')
    with_csv = list(csv.DictReader(grid.csv_text(columns, rows, ['clean', 'aa']).splitlines()))
    assert list(with_csv[0]) == ['method', 'epsilon', 'seeds'] + [
        f'{m}_{a}_{s}' for m in ('best', 'final') for a in ('clean', 'aa') for s in ('mean', 'std')
    ] + ['minutes', 'co', 'checks_warned', 'failed', 'diverged']
    for line, row in zip(with_csv, rows):
        assert [float(line[k]) for k in list(line)[2:]] == \
            pytest.approx([row[k] for k in list(line)[2:]])


def test_the_next_step_of_a_combination_follows_what_its_folder_holds(tmp_path):
    plan = every_run_done()
    combos = hand_made_grid(tmp_path / 'g', plan)
    parsed = grid.parse(['--dataset', 'cifar10', '--out_dir', str(tmp_path / 'g'),
                         '--data-dir', str(tmp_path / 'd'), '--device', 'cpu',
                         '--attacks', 'clean,aa', '--n_ex', '64'])[0]
    combo = next(c for c in combos if c.config['epsilon'] == 16.0)
    run_dir = grid.run_dir_of(combo.folder(parsed.out_dir))
    assert grid.next_step(combo, parsed) is None, 'trained and evaluated for clean and aa'
    # Evaluated at another radius than its own (by hand): still to evaluate at its own.
    results = os.path.join(run_dir, 'results.json')
    with open(results) as f:
        report = json.load(f)
    with open(results, 'w') as f:
        json.dump(dict(report, epsilon_255=8.0), f)
    assert grid.next_step(combo, parsed)[0] == 'evaluate'
    with open(results, 'w') as f:
        json.dump(report, f)

    parsed.attacks = ['clean', 'aa', 'pgd20']  # an attack added later: evaluated again
    stage, argv = grid.next_step(combo, parsed)
    assert stage == 'evaluate' and argv[0].endswith('test_cifar10.py')
    assert argv[1:] == ['--model_path', run_dir, '--out_dir', run_dir, '--epsilon', '16',
                        '--attacks', 'clean,aa,pgd20', '--n_ex', '64',
                        '--data-dir', str(tmp_path / 'd'), '--device', 'cpu']
    # Only the best model evaluated for pgd20: still to do.
    path = os.path.join(run_dir, 'results-2.json')
    best = os.path.join(run_dir, runs.BEST)
    report = dict(results=[dict(checkpoint=best, sha256=sha256_file(best),
                                attacks={'pgd20': dict(accuracy=0.3, n=64)})])
    with open(path, 'w') as f:
        json.dump(report, f)
    assert grid.next_step(combo, parsed)[0] == 'evaluate'
    assert not grid.evaluated(run_dir, ['pgd20'], 16) and grid.evaluated(run_dir, ['aa'], 16)
    assert not grid.evaluated(run_dir, ['aa'], 8), 'evaluated at 16/255 only'
    with open(path, 'w') as f:  # a results file that cannot be read counts for nothing
        f.write('{"results": [')
    assert not grid.evaluated(run_dir, ['aa'], 16)
    os.remove(path)

    # Killed before its end: a checkpoint and no final model.
    os.remove(os.path.join(run_dir, runs.FINAL))
    open(os.path.join(run_dir, runs.CHECKPOINT), 'wb').close()
    stage, argv = grid.next_step(combo, parsed)
    assert (stage, argv[1:]) == ('resume', ['--resume', run_dir, '--data-dir',
                                            str(tmp_path / 'd'), '--device', 'cpu'])
    os.remove(os.path.join(run_dir, runs.CHECKPOINT))
    stage, argv = grid.next_step(combo, parsed)
    assert stage == 'train' and not os.path.exists(run_dir), 'a run that never saved is removed'
    assert argv[1:] == [*combo.argv, '--out_dir', combo.folder(parsed.out_dir),
                        '--data-dir', str(tmp_path / 'd'), '--device', 'cpu']
    assert '--epsilon' in argv and argv[argv.index('--epsilon') + 1] == '16'


@pytest.mark.parametrize('dataset,training_script,test_script', [
    ('cifar10', 'MIX_KL_CIFAR10.py', 'test_cifar10.py'),
    ('cifar100', 'MIX_KL_CIFAR100.py', 'test_cifar100.py'),
    ('tinyimagenet', 'MIX_KL_TinyImageNet.py', 'test_tinyimagenet.py'),
])
def test_each_dataset_is_trained_and_evaluated_by_its_own_scripts(tmp_path, dataset,
                                                                  training_script, test_script):
    parsed, (combo,) = grid.parse(['--dataset', dataset, '--out_dir', str(tmp_path),
                                   '--method', 'fgsm_rs'])
    stage, argv = grid.next_step(combo, parsed)
    assert (stage, argv[0]) == ('train', os.path.join(grid.ROOT, training_script))
    folder = combo.folder(parsed.out_dir)
    os.makedirs(folder)
    write_run(tmp_path / 'runs' / combo.name, 'run', combo.argv, [(60, 0, 0.5, 0.25)],
              dataset=dataset)
    stage, argv = grid.next_step(combo, parsed)
    assert (stage, argv[0]) == ('evaluate', os.path.join(grid.ROOT, test_script))


def test_the_grid_figure_plots_each_seeds_per_epoch_pgd_accuracy(tmp_path):
    plan = every_run_done()
    plan['mixkl', 16.0, 2] = None
    hand_made_grid(tmp_path, plan)
    columns, rows = grid.table(str(tmp_path), ['clean'])
    series = grid.plot_series(columns, rows)
    assert [(s['panel'], s['label']) for s in series] == [
        (('CIFAR-10', 8.0), 'method=fgsm_rs'), (('CIFAR-10', 16.0), 'method=fgsm_rs'),
        (('CIFAR-10', 8.0), 'method=mixkl'), (('CIFAR-10', 16.0), 'method=mixkl')]
    # hand_made_grid's metrics.csv: test PGD accuracy 0.3, then 0.35 (clean 0.5, 0.6).
    assert [s['runs'] for s in series] == [[[0.3, 0.35]] * 3] * 3 + [[[0.3, 0.35]] * 2]
    assert {(s['attack'], s['split']) for s in series} == {('PGD-10', 'test')}


@pytest.mark.parametrize('status', ['failed', 'diverged'])
def test_a_rerun_grid_reports_a_run_that_ended_for_good_and_starts_nothing(tmp_path, capsys,
                                                                           status):
    argv = ['--dataset', 'cifar10', '--out_dir', str(tmp_path), '--method', 'fgsm_rs',
            '--data-dir', str(tmp_path / 'no-data')]
    combo, = grid.parse(argv)[1]
    folder = combo.folder(str(tmp_path))
    os.makedirs(folder)
    grid.write_record(folder, combo, status=status, stage='train', exit_code=1,
                      message='error: the first attempt')
    assert grid.main(argv) == 0
    record = grid.read_record(folder)
    assert (record['status'], record['message']) == (status, 'error: the first attempt')
    assert not os.path.exists(os.path.join(folder, grid.TRAIN_OUT)), 'nothing was started'
    assert f'{status.upper()} {combo.name}: error: the first attempt' in capsys.readouterr().out


def test_where_a_run_trains_and_finds_its_data_does_not_make_it_another_run(tmp_path):
    def folder_name(*where):
        combo, = grid.parse(['--dataset', 'cifar10', '--out_dir', str(tmp_path), '--method',
                             'fgsm_rs', *where])[1]
        return combo.name
    assert folder_name('--device', 'cpu') == folder_name('--device', 'cuda:1') == \
        folder_name('--data-dir', '/elsewhere') == folder_name()
    assert folder_name('--seed', '1') != folder_name()


def test_only_unstarted_run_directories_no_process_holds_are_removed(tmp_path):
    def run_dir(name, *files):
        path = tmp_path / name
        path.mkdir()
        for f in (runs.CONFIG, *files):
            (path / f).write_text('{}')
        return path
    killed, training = run_dir('killed'), run_dir('training')
    kept = [run_dir('interrupted', runs.CHECKPOINT), run_dir('finished', runs.FINAL),
            training, tmp_path / 'not-a-run']
    (tmp_path / 'not-a-run').mkdir()
    lock = runs.lock_run_dir(str(training))  # held as a run in its first epoch holds it
    try:
        grid.remove_unstarted(str(tmp_path))
    finally:
        lock.close()
    assert not killed.exists() and all(path.is_dir() for path in kept)


@pytest.mark.parametrize('slurm,record,finished,queued', [
    ('slurm', dict(status='submitted', job_id='12'), False, True),
    ('slurm', dict(status='running', job_id='12'), False, True),  # started by its job
    ('slurm', dict(status='running', job_id='12'), True, False),  # the job is over
    ('slurm', dict(status='running'), False, False),  # run by a local grid, not a job
    ('slurm', dict(status='pending', job_id='12'), False, False),
    ('slurm', dict(status='done', job_id='12'), False, False),
    ('local', dict(status='running', job_id='12'), False, False),  # submitit's local jobs
])
def test_a_slurm_job_an_earlier_grid_submitted_is_waited_for_until_it_is_over(
        tmp_path, monkeypatch, slurm, record, finished, queued):
    class SlurmJob:
        def __init__(self, folder, job_id):
            self.folder, self.job_id = folder, job_id

        def done(self):
            return finished
    monkeypatch.setitem(sys.modules, 'submitit', SimpleNamespace(SlurmJob=SlurmJob))
    job = grid.queued_job(SimpleNamespace(slurm=slurm, out_dir=str(tmp_path)), record)
    if not queued:
        assert job is None
    else:
        assert (job.folder, job.job_id) == (str(tmp_path / 'slurm'), '12')


def test_a_job_that_starts_running_keeps_its_job_id_for_the_next_grid_to_wait_for(
        tmp_path, monkeypatch):
    def running_job(folder, job_id):
        return SimpleNamespace(job_id=job_id, done=lambda: False)
    monkeypatch.setitem(sys.modules, 'submitit', SimpleNamespace(SlurmJob=running_job))
    combo, = grid.parse(['--dataset', 'cifar10', '--out_dir', str(tmp_path), '--method',
                         'fgsm_rs'])[1]
    folder = combo.folder(str(tmp_path))
    os.makedirs(folder)
    grid.write_record(folder, combo, status='submitted', job_id='12')  # the grid submits
    grid.write_record(folder, combo, status='running', stage='train')  # the job starts
    record = grid.read_record(folder)
    assert record['job_id'] == '12' and record['name'] == combo.name
    job = grid.queued_job(SimpleNamespace(slurm='slurm', out_dir=str(tmp_path)), record)
    assert job.job_id == '12'


@pytest.mark.parametrize('lines,reported', [
    (['epoch 1', 'error: first', 'Traceback', 'error: second', 'the end'], 'error: second'),
    (['epoch 1', 'Killed'], 'Killed'),
    (['', '  '], ''),
    (['x', 'error: ' + 'y' * 400], 'error: ' + 'y' * 293),
])
def test_the_report_names_a_scripts_last_error_line_else_its_last_line(tmp_path, lines,
                                                                       reported):
    out = tmp_path / grid.TRAIN_OUT
    out.write_text(''.join(f'{line}\n' for line in lines))
    assert grid.last_error(str(out)) == reported
    assert grid.last_error(str(tmp_path / 'missing.out')) == ''


@pytest.mark.parametrize('retry', [False, True])
def test_retry_failed_runs_a_failed_combination_again_never_a_diverged_one(tmp_path, retry):
    plan = every_run_done()
    combos = hand_made_grid(tmp_path, plan)
    parsed = grid.parse(['--dataset', 'cifar10', '--out_dir', str(tmp_path), '--attacks',
                         'clean,aa', *(['--retry-failed'] if retry else [])])[0]
    ended = {combos[0].name: 'failed', combos[1].name: 'diverged'}
    for combo in combos[:2]:
        grid.write_record(combo.folder(str(tmp_path)), combo, status=ended[combo.name])
    local = grid.LocalGrid(parsed, combos[:3], grid.Report(combos[:3]))
    for combo in combos[:3]:
        folder = combo.folder(str(tmp_path))
        # Nothing is started: the runs are trained and evaluated, or ended for good.
        assert local._start(combo, folder, grid.lock(folder)) is False
    statuses = [grid.read_record(c.folder(str(tmp_path)))['status'] for c in combos[:3]]
    assert statuses == ['done' if retry else 'failed', 'diverged', 'done']
    assert grid.ended_for_good({'status': 'failed'}, parsed) is not retry
    assert grid.ended_for_good({'status': 'diverged'}, parsed)
    assert not grid.ended_for_good({'status': 'done'}, parsed)


@pytest.mark.parametrize('runner', ['local', 'job'])
def test_an_evaluation_that_exits_0_without_its_results_fails_the_run_once(tmp_path, monkeypatch,
                                                                          runner):
    # Started again, it would leave no results again: the grid would never end. (This script
    # fails when started a second time, so that the test ends either way.)
    script = tmp_path / 'evaluates-nothing.py'
    script.write_text('import os, sys\n'
                      f'ran = os.path.exists({str(tmp_path / "ran")!r})\n'
                      f'open({str(tmp_path / "ran")!r}, "w").close()\n'
                      'print("evaluated")\n'
                      'sys.exit(1 if ran else 0)\n')
    monkeypatch.setitem(grid.TEST_SCRIPTS, 'cifar10', str(script))
    argv = ['--dataset', 'cifar10', '--out_dir', str(tmp_path / 'grid'), '--method', 'fgsm_rs']
    parsed, (combo,) = grid.parse(argv)
    folder = combo.folder(parsed.out_dir)
    os.makedirs(folder)
    write_run(tmp_path / 'grid' / 'runs' / combo.name, 'run', combo.argv, [(60, 0, 0.5, 0.25)])
    if runner == 'local':
        assert grid.main(argv) == 0  # the table shows the failed run
    else:
        assert grid.GridJob(parsed, combo)() == 'failed'
    record = grid.read_record(folder)
    assert (record['status'], record['stage'], record['exit_code']) == ('failed', 'evaluate', 0)
    assert record['message'] == grid.NO_PROGRESS['evaluate']
    log = (tmp_path / 'grid' / 'runs' / combo.name / grid.EVAL_OUT).read_text()
    assert log.count('evaluated') == 1


def test_a_grid_told_to_stop_starts_no_evaluation_and_exits_128_plus_sigterm(tmp_path,
                                                                             monkeypatch):
    # The training stand-in ignores the grid's SIGTERM, signals the grid, then leaves a
    # finished run and exits 0, as a script does that saves its last epoch at the signal.
    argv = ['--dataset', 'cifar10', '--out_dir', str(tmp_path / 'grid'), '--method', 'fgsm_rs']
    parsed, (combo,) = grid.parse(argv)
    finished = write_run(tmp_path, 'finished', combo.argv, [(60, 0, 0.5, 0.25)])
    train, evaluate = tmp_path / 'train.py', tmp_path / 'evaluate.py'
    train.write_text('import os, signal, time\n'
                     'signal.signal(signal.SIGTERM, signal.SIG_IGN)\n'
                     'os.kill(os.getppid(), signal.SIGTERM)\n'
                     'time.sleep(1)\n'
                     f'os.rename({str(finished)!r}, '
                     f'{os.path.join(combo.folder(parsed.out_dir), "run")!r})\n')
    evaluate.write_text(f'open({str(tmp_path / "evaluated")!r}, "w").close()\n')
    monkeypatch.setitem(flags.TRAINING_SCRIPTS, 'cifar10', str(train))
    monkeypatch.setitem(grid.TEST_SCRIPTS, 'cifar10', str(evaluate))
    assert grid.main(argv) == 128 + signal.SIGTERM
    assert not (tmp_path / 'evaluated').exists()
    assert grid.read_record(combo.folder(parsed.out_dir))['status'] == 'pending'
    assert grid.next_step(combo, parsed)[0] == 'evaluate', 'the rerun evaluates it'


@pytest.mark.parametrize('runner', ['local', 'job'])
def test_a_script_that_fails_is_recorded_failed_with_its_error_and_not_started_again(
        tmp_path, monkeypatch, runner):
    train = tmp_path / 'train.py'
    train.write_text('import sys\nprint("epoch 1")\nprint("error: boom", file=sys.stderr)\n'
                     'sys.exit(3)\n')
    monkeypatch.setitem(flags.TRAINING_SCRIPTS, 'cifar10', str(train))
    argv = ['--dataset', 'cifar10', '--out_dir', str(tmp_path / 'grid'), '--method', 'fgsm_rs']
    parsed, (combo,) = grid.parse(argv)
    folder = combo.folder(parsed.out_dir)
    if runner == 'local':
        assert grid.main(argv) == 0 and grid.main(argv) == 0  # the rerun starts nothing
        log = open(os.path.join(folder, grid.TRAIN_OUT)).read()
        assert log.count('\n$ ') == 1 and 'epoch 1\nerror: boom\n' in log
        row, = csv.DictReader(open(tmp_path / 'grid' / 'grid.csv'))
        assert (row['seeds'], row['failed'], row['diverged']) == ('0', '1', '0')
        entry, = json.loads((tmp_path / 'grid' / 'grid.json').read_text())['runs']
        assert (entry['status'], entry['exit_code'], entry['message']) == \
            ('failed', 3, 'error: boom')
    else:
        assert grid.GridJob(parsed, combo)() == 'failed'
    record = grid.read_record(folder)
    assert (record['status'], record['stage'], record['exit_code'], record['message']) == \
        ('failed', 'train', 3, 'error: boom')


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_a_grid_told_to_stop_passes_sigterm_on_to_its_scripts_and_the_run_stays_pending(
        tmp_path, monkeypatch, signum):
    """Stopped by SIGTERM or Ctrl-C (SIGINT): each running script gets SIGTERM and saves."""
    stopped = tmp_path / 'stopped'
    train = tmp_path / 'train.py'
    train.write_text('import os, signal, sys, time\n'
                     'def stop(*_):\n'
                     f'    open({str(stopped)!r}, "w").close()\n'
                     '    sys.exit(128 + signal.SIGTERM)\n'
                     'signal.signal(signal.SIGTERM, stop)\n'
                     f'os.kill(os.getppid(), {int(signum)})\n'
                     'time.sleep(30)\n')
    monkeypatch.setitem(flags.TRAINING_SCRIPTS, 'cifar10', str(train))
    argv = ['--dataset', 'cifar10', '--out_dir', str(tmp_path / 'grid'), '--method', 'fgsm_rs']
    parsed, (combo,) = grid.parse(argv)
    started, handler = time.time(), signal.getsignal(signum)
    assert grid.main(argv) == 128 + signal.SIGTERM
    assert stopped.exists() and time.time() - started < 20
    assert signal.getsignal(signum) is handler, 'the handler as it was before the grid'
    record = grid.read_record(combo.folder(parsed.out_dir))
    assert (record['status'], record['exit_code']) == ('pending', 128 + signal.SIGTERM)


def test_the_scripts_the_grid_starts_are_sent_sigterm_when_the_grid_dies(monkeypatch):
    calls = []
    monkeypatch.setattr(grid.ctypes, 'CDLL', lambda *args, **kwargs: SimpleNamespace(
        prctl=lambda *args: calls.append(args)))
    grid.die_with_parent()
    assert calls == [(1, signal.SIGTERM)]  # PR_SET_PDEATHSIG: they save, then exit


def test_a_slurm_job_runs_its_script_under_torchrun_with_gpus_per_run_processes(tmp_path,
                                                                                 monkeypatch):
    parsed, (combo,) = grid.parse(['--dataset', 'cifar10', '--out_dir', str(tmp_path),
                                   '--slurm', 'slurm', '--gpus-per-run', '2'])
    commands, records = [], []
    os.makedirs(combo.folder(str(tmp_path)))
    grid.write_record(combo.folder(str(tmp_path)), combo, status='submitted', job_id='12')

    class Started:
        def __init__(self, combo, stage, argv, slot, folder, lock_file):
            commands.append(grid.command(argv, slot))
            records.append(grid.read_record(folder))
            self.process = SimpleNamespace(poll=lambda: 0, returncode=0)
            self.out_path = os.path.join(folder, grid.TRAIN_OUT)
    monkeypatch.setattr(grid, 'Running', Started)
    job = grid.GridJob(parsed, combo)
    assert job() == 'failed'  # it trained nothing
    assert job._process is not None, 'kept for checkpoint() to stop at the time limit'
    assert commands[0][1:5] == ['-m', 'torch.distributed.run', '--standalone',
                                '--nproc_per_node=2']
    # Running, and still under its job id: a second grid waits for the job.
    assert (records[0]['status'], records[0]['job_id'], records[0]['stage']) == \
        ('running', '12', 'train')


@pytest.mark.parametrize('delay, waited', [(180, 150), (20, 10)])
def test_at_its_time_limit_a_job_waits_for_its_script_to_save_up_to_30_s_before_the_kill(
        tmp_path, monkeypatch, delay, waited):
    parsed, (combo,) = grid.parse(['--dataset', 'cifar10', '--out_dir', str(tmp_path),
                                   '--slurm', 'slurm', '--signal-delay-s', str(delay)])
    clock = [1000.0]
    monkeypatch.setattr(grid, 'time', SimpleNamespace(
        time=lambda: clock[0], sleep=lambda s: clock.__setitem__(0, clock[0] + s)))
    monkeypatch.setitem(sys.modules, 'submitit', SimpleNamespace(
        helpers=SimpleNamespace(DelayedSubmission=lambda job: job)))
    signals, job = [], grid.GridJob(parsed, combo)
    job._process = SimpleNamespace(poll=lambda: None, send_signal=signals.append)
    requeued = job.checkpoint()
    assert signals == [signal.SIGTERM] and isinstance(requeued, grid.GridJob)
    assert clock[0] - 1000 == pytest.approx(waited, abs=grid.POLL_S)


def test_relative_out_and_data_dirs_are_made_absolute_for_jobs_started_elsewhere(tmp_path,
                                                                                monkeypatch):
    monkeypatch.chdir(tmp_path)
    parsed, (combo,) = grid.parse(['--dataset', 'cifar10', '--out_dir', 'g', '--data-dir', 'd'])
    assert (parsed.out_dir, parsed.data_dir) == (str(tmp_path / 'g'), str(tmp_path / 'd'))
    stage, argv = grid.next_step(combo, parsed)
    assert argv[argv.index('--data-dir') + 1] == str(tmp_path / 'd')
    assert argv[argv.index('--out_dir') + 1].startswith(str(tmp_path / 'g'))


def test_the_figure_names_the_split_and_attack_each_configuration_was_evaluated_with():
    rows = [dict(method=m, _runs=[], _config=dict(dataset=d, epsilon=8.0, pgd_iters=i,
                                                  attack_iters=10, val_examples=v))
            for m, d, v, i in (('a', 'cifar10', 0, 10), ('b', 'cifar10', 100, 3),
                               ('c', 'tinyimagenet', 0, 50))]
    series = grid.plot_series(['method'], rows)
    assert [(s['split'], s['attack']) for s in series] == \
        [('test', 'PGD-10'), ('validation', 'PGD-3'), ('val', 'PGD-50')]


@pytest.mark.parametrize('extra, seen', [(['--gpus', '3'], '3 1'),
                                         (['--threads-per-run', '5'], 'None 5')])
def test_each_script_runs_with_its_slots_gpus_and_threads(tmp_path, monkeypatch, extra, seen):
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
    monkeypatch.setattr(grid, 'local_slots', lambda parsed: [  # --gpus without the GPUs
        grid.Slot([3], 1) if parsed.gpus else grid.Slot(threads=parsed.threads_per_run)])
    train = tmp_path / 'train.py'
    train.write_text(f'import os, sys\nopen({str(tmp_path / "env")!r}, "w").write('
                     'f"{os.environ.get(\'CUDA_VISIBLE_DEVICES\')} '
                     '{os.environ.get(\'OMP_NUM_THREADS\')}")\nsys.exit(3)\n')
    monkeypatch.setitem(flags.TRAINING_SCRIPTS, 'cifar10', str(train))
    grid.main(['--dataset', 'cifar10', '--out_dir', str(tmp_path / 'grid'), '--method',
               'fgsm_rs', *extra])
    assert (tmp_path / 'env').read_text() == seen


def test_a_stand_in_script_keeps_its_runs_lock_after_the_grid_lets_go_of_it(tmp_path):
    folder = str(tmp_path / 'run')
    held = grid.lock(folder)
    sleeper = tmp_path / 'sleeper.py'
    sleeper.write_text('import time\ntime.sleep(30)\n')
    parsed, (combo,) = grid.parse(['--dataset', 'cifar10', '--out_dir', str(tmp_path)])
    running = grid.Running(combo, 'train', [str(sleeper)], grid.Slot(), folder, held)
    held.close()  # as a killed grid would
    try:
        assert grid.lock(folder) is None, 'the script still holds the run'
        # In a session of its own: a Ctrl-C in the terminal reaches the grid only, which
        # then sends the script one SIGTERM.
        assert os.getsid(running.process.pid) == running.process.pid != os.getsid(0)
    finally:
        running.process.kill()
        running.process.wait()
    assert grid.lock(folder) is not None


def test_a_flag_without_a_value_reaches_every_combination():
    parsed, combos = grid.parse(['--dataset', 'cifar10', '--out_dir', '/g', '--method', 'fgsm_rs',
                                 '--no-augment', '--seed', '0', '1'])
    assert len(combos) == 2
    for combo in combos:
        assert combo.config['augment'] is False and None not in combo.argv
        assert '--no-augment' in grid.next_step(combo, parsed)[1]
    with pytest.raises(grid.InputError, match='^stray: a value before any flag$'):
        grid.split_flags(['stray', '--seed', '0'])


def test_the_grids_defaults_are_the_papers_attacks_and_a_days_job(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, 'submitit', SimpleNamespace(
        SlurmExecutor=RecordingExecutor, LocalExecutor=RecordingExecutor))
    parsed, _ = grid.parse(['--dataset', 'cifar10', '--out_dir', str(tmp_path), '--slurm',
                            'slurm'])
    assert parsed.attacks == ['clean', 'pgd20', 'aa']
    assert grid.submitit_executor(parsed).parameters == dict(
        time=1440, gpus_per_node=1, ntasks_per_node=1, cpus_per_task=8, signal_delay_s=180,
        job_name='mixkl-grid')
    parsed, _ = grid.parse(['--dataset', 'cifar10', '--out_dir', str(tmp_path),
                            '--gpus-per-run', '2'])
    slot, = grid.local_slots(parsed)
    assert grid.command(['a.py'], slot)[4] == '--nproc_per_node=2'


def test_a_slurm_grid_submits_the_runs_not_done_not_ended_and_not_queued(tmp_path, monkeypatch):
    plan = every_run_done()
    plan['mixkl', 8.0, 0] = None  # failed before training: ended for good
    plan['mixkl', 8.0, 1] = ('diverged', 0.1, 0.1, 0, False, 1.0)
    combos = hand_made_grid(tmp_path, plan)
    # combos: mixkl at eps 8 (seeds 0, 1, 2), at 16, then fgsm_rs. Of fgsm_rs at 8 and the
    # first at 16: a job still queued, a job that is over, and two never sent.
    queued, requeued, new, crashed = combos[6:10]
    for combo, record in ((queued, dict(status='submitted', job_id='41')),
                          (requeued, dict(status='running', job_id='42')),
                          (new, dict(status='pending')), (crashed, dict(status='pending'))):
        shutil.rmtree(os.path.join(combo.folder(str(tmp_path)), 'run'))
        grid.write_record(combo.folder(str(tmp_path)), combo, **record)
    parsed = grid.parse(['--dataset', 'cifar10', '--out_dir', str(tmp_path), '--slurm', 'slurm',
                         '--attacks', 'clean,aa'])[0]
    looks = {'41': iter([False, True]), '42': iter([True])}
    monkeypatch.setitem(sys.modules, 'submitit', SimpleNamespace(SlurmJob=lambda folder, job_id:
        SimpleNamespace(job_id=job_id, done=lambda: next(looks[job_id]), result=lambda: 'done')))
    submitted = []

    def result(name):
        if name == crashed.name:
            raise RuntimeError('Traceback ...\nFailedJobError: boom')
        return 'done'
    monkeypatch.setattr(grid, 'submitit_executor', lambda parsed: SimpleNamespace(
        submit=lambda job: submitted.append(job.combo.name) or SimpleNamespace(
            job_id=str(100 + len(submitted)), done=lambda: True,
            result=lambda name=job.combo.name: result(name))))
    monkeypatch.setattr(grid, 'POLL_S', 0)
    monkeypatch.setenv('PYTHONPATH', os.path.join('elsewhere', 'lib'))
    assert grid.run_on_cluster(parsed, combos, grid.Report(combos))
    # The jobs unpickle grid.GridJob by name, wherever the grid was started from.
    assert os.environ['PYTHONPATH'].split(os.pathsep) == [grid.ROOT, os.path.join('elsewhere',
                                                                                  'lib')]
    assert submitted == [requeued.name, new.name, crashed.name]
    assert next(looks['41'], 'looked until it was over') == 'looked until it was over'
    records = {c.name: grid.read_record(c.folder(str(tmp_path))) for c in combos}
    assert [(records[c.name]['status'], records[c.name].get('job_id'))
            for c in (requeued, new)] == [('submitted', '101'), ('submitted', '102')]
    assert (records[crashed.name]['status'], records[crashed.name]['message']) == \
        ('failed', 'FailedJobError: boom')
    assert [records[c.name]['status'] for c in combos[:2]] == ['failed', 'diverged']
    assert {records[c.name]['status'] for c in combos[2:6] + combos[10:]} == {'done'}


def test_a_combination_folder_holding_several_runs_is_read_from_its_latest_finished_one(tmp_path):
    folder = tmp_path / 'combination'
    folder.mkdir()
    old, new = (write_run(folder, name, [], [(1, 1, 0.5, 0.3)]) for name in ('old', 'new'))
    killed = write_run(folder, 'killed', [], [(1, 1, 0.5, 0.3)])
    os.remove(killed / runs.FINAL)
    (killed / runs.CHECKPOINT).write_bytes(b'resumable')
    started = write_run(folder, 'started', [], [])
    for path in (started / runs.FINAL, started / runs.BEST):
        os.remove(path)
    for age, path in enumerate([killed / runs.CHECKPOINT, new / runs.FINAL, old / runs.FINAL]):
        os.utime(path, (1e9 - 1000 * age,) * 2)  # the killed run's checkpoint is the newest
    assert grid.run_dir_of(str(folder)) == str(new), 'a finished run wins over a newer checkpoint'
    for run_dir in (old, new):
        os.remove(run_dir / runs.FINAL)
        (run_dir / runs.CHECKPOINT).write_bytes(b'resumable')
        os.utime(run_dir / runs.CHECKPOINT, (1e8,) * 2)
    assert grid.run_dir_of(str(folder)) == str(killed), 'else the newest checkpoint'
    os.remove(killed / runs.CHECKPOINT)
    os.utime(old / runs.CHECKPOINT, (2e8,) * 2)
    assert grid.run_dir_of(str(folder)) == str(old)
    assert grid.run_dir_of(str(tmp_path / 'none')) is None


@pytest.mark.parametrize('stage, code, diverged, expected', [
    ('train', -15, False, 'interrupted'),  # killed by SIGTERM: resumes
    ('evaluate', -9, False, 'interrupted'),
    ('train', 130, False, 'interrupted'),  # a shell's 128 + SIGINT
    ('train', 128, False, 'interrupted'),
    ('train', 127, False, 'failed'),  # a shell's "command not found"
    ('train', 1, True, 'diverged'),
    ('resume', 1, True, 'diverged'),
    ('train', 1, False, 'failed'),
    ('evaluate', 1, True, 'failed'),  # only training diverges
    ('train', 2, True, 'failed'),  # bad flags
])
def test_a_scripts_exit_status_says_whether_its_run_resumes_diverged_or_failed(
        tmp_path, stage, code, diverged, expected):
    run_dir = write_run(tmp_path, 'run', [], [(1, 1, 0.5, 0.3)])
    last = ('error: the run diverged: the loss is nan at epoch 1' if diverged
            else 'epoch 1 done')
    (run_dir / runs.LOG).write_text(f'[2026-11-30 05:00:00] started\n[2026-11-30 05:01:00] {last}\n')
    assert grid.outcome(stage, code, str(tmp_path)) == expected


def test_combinations_that_differ_in_any_setting_get_folders_of_their_own(tmp_path):
    # --lamda and --lr-max are not in the folder's readable part (dataset, arch, method, seed,
    # epsilon): the settings' digest keeps the four runs apart.
    combos = grid.parse(['--dataset', 'cifar10', '--out_dir', str(tmp_path),
                         '--lamda', '1', '2', '--lr-max', '0.1', '0.2'])[1]
    assert len({c.folder(str(tmp_path)) for c in combos}) == len(combos) == 4
    again = grid.parse(['--dataset', 'cifar10', '--out_dir', str(tmp_path / 'other'),
                        '--lr-max', '0.2', '--lamda', '2', '--device', 'cpu'])[1]
    assert again[0].name in {c.name for c in combos}, 'where and how it runs is not a setting'


def test_an_out_dir_that_is_a_file_is_bad_input(tmp_path, capsys):
    (tmp_path / 'grid').write_text('')
    assert grid.main(['--dataset', 'cifar10', '--out_dir', str(tmp_path / 'grid')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: --out_dir') and len(err.strip().splitlines()) == 1, err


def test_settings_are_written_in_the_table_as_given():
    assert [grid.cell_text(v) for v in (8.0, 0.5, 1000000, True, 'mixkl')] == \
        ['8', '0.5', '1000000', 'True', 'mixkl']


def test_the_scripts_the_grid_starts_keep_the_grids_environment(monkeypatch):
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '5,6')
    monkeypatch.setenv('MIXKL_GRID_TEST', 'kept')
    env = grid.Slot(threads=2).env()
    assert (env['CUDA_VISIBLE_DEVICES'], env['MIXKL_GRID_TEST'], env['OMP_NUM_THREADS']) == \
        ('5,6', 'kept', '2')  # under SLURM the scheduler's GPUs
    assert grid.Slot(gpus=[1]).env()['CUDA_VISIBLE_DEVICES'] == '1'


def test_waiting_for_a_run_another_process_holds_is_said_once(capsys):
    combo = SimpleNamespace(name='method=mixkl_seed=0')
    report = grid.Report([combo])
    for _ in range(3):
        report.waiting(combo)
    report.close()
    assert capsys.readouterr().out.count('waiting for method=mixkl_seed=0') == 1


def test_a_failed_run_is_reported_with_the_minutes_it_ran(tmp_path, capsys):
    parsed, (combo,) = grid.parse(['--dataset', 'cifar10', '--out_dir', str(tmp_path),
                                   '--method', 'fgsm_rs'])
    folder = combo.folder(parsed.out_dir)
    os.makedirs(folder)
    (tmp_path / 'out.txt').write_text('error: boom\n')
    local = grid.LocalGrid(parsed, [], grid.Report([combo]))
    local.running = [SimpleNamespace(process=SimpleNamespace(poll=lambda: 3), slot=grid.Slot(),
                                     started=time.time() - 148, stage='train', folder=folder,
                                     combo=combo, out_path=str(tmp_path / 'out.txt'),
                                     lock_file=open(tmp_path / 'lock', 'w'))]
    local._reap()  # 148 s: 2.47 min, shown as 2.5 for a few seconds more
    assert f'FAILED {combo.name} (train) after 2.5 min: error: boom' in capsys.readouterr().out


def test_a_local_grid_runs_as_many_scripts_at_once_as_it_has_slots(tmp_path, monkeypatch):
    parsed, combos = grid.parse(['--dataset', 'cifar10', '--out_dir', str(tmp_path), '--method',
                                 'mixkl', 'fgsm_rs', 'pgd_at', '--parallel', '2'])
    started = []

    class NeverEnds:
        def __init__(self, combo, stage, argv, slot, folder, lock_file):
            started.append((combo.name, slot))
            self.process = SimpleNamespace(poll=lambda: None)
    monkeypatch.setattr(grid, 'Running', NeverEnds)
    local = grid.LocalGrid(parsed, combos, grid.Report(combos))
    local._start_what_fits()
    assert [name for name, _ in started] == [c.name for c in combos[:2]]
    assert started[0][1] is not started[1][1] and local.free == []
    assert local.pending == combos[2:]


def diverging_script(tmp_path, combo, parsed):
    """A training stand-in that leaves a diverged run in the combination's folder, exits 1."""
    prepared = write_run(tmp_path, 'prepared', combo.argv, [(60, 0, 0.5, 0.25)])
    (prepared / runs.FINAL).unlink()
    (prepared / runs.CHECKPOINT).write_bytes(b'')
    message = 'error: the run diverged: loss nan at epoch 2, step 3'
    (prepared / runs.LOG).write_text(f'[2026-11-30 12:00:00] {message}\n')
    script = tmp_path / 'diverges.py'
    script.write_text(f'import os, sys\nos.rename({str(prepared)!r}, '
                      f'{os.path.join(combo.folder(parsed.out_dir), "run")!r})\n'
                      f'print({message!r})\nsys.exit(1)\n')
    return script, message


@pytest.mark.parametrize('runner', ['local', 'job'])
def test_a_run_that_diverges_is_recorded_diverged_and_never_started_again(tmp_path, monkeypatch,
                                                                          runner):
    argv = ['--dataset', 'cifar10', '--out_dir', str(tmp_path / 'grid'), '--method', 'fgsm_rs']
    parsed, (combo,) = grid.parse(argv)
    os.makedirs(combo.folder(parsed.out_dir))
    script, message = diverging_script(tmp_path, combo, parsed)
    monkeypatch.setitem(flags.TRAINING_SCRIPTS, 'cifar10', str(script))
    if runner == 'local':
        assert grid.main(argv) == 0 and grid.main(argv + ['--retry-failed']) == 0
        row, = csv.DictReader(open(tmp_path / 'grid' / 'grid.csv'))
        assert (row['seeds'], row['failed'], row['diverged']) == ('0', '0', '1')
        log = open(os.path.join(combo.folder(parsed.out_dir), grid.TRAIN_OUT)).read()
        assert log.count('\n$ ') == 1, 'not started again'
    else:
        assert grid.GridJob(parsed, combo)() == 'diverged'
    record = grid.read_record(combo.folder(parsed.out_dir))
    assert (record['status'], record['stage'], record['exit_code'], record['message']) == \
        ('diverged', 'train', 1, message)


def test_a_job_waits_for_the_lock_then_records_its_done_run(tmp_path, monkeypatch):
    combos = hand_made_grid(tmp_path, every_run_done())
    parsed = grid.parse(['--dataset', 'cifar10', '--out_dir', str(tmp_path), '--slurm', 'slurm',
                         '--attacks', 'clean,aa'])[0]
    combo = combos[0]
    folder = combo.folder(str(tmp_path))
    grid.write_record(folder, combo, status='submitted', job_id='12')
    held, sleeps = [grid.lock(folder)], []

    def sleep(seconds):  # another process lets go of the run after the second wait
        sleeps.append(seconds)
        if len(sleeps) == 2:
            held.pop().close()
    monkeypatch.setattr(grid, 'time', SimpleNamespace(sleep=sleep, time=time.time))
    assert grid.GridJob(parsed, combo)() == 'done' and len(sleeps) == 2
    assert grid.read_record(folder)['status'] == 'done'
    grid.write_manifest(parsed)
    entry, = [e for e in json.loads((tmp_path / 'grid.json').read_text())['runs']
              if e['name'] == combo.name]
    assert (entry['status'], entry['job_id']) == ('done', '12')


def test_a_combination_given_twice_is_one_run(tmp_path, monkeypatch, capsys):
    train = tmp_path / 'train.py'
    train.write_text(f'open({str(tmp_path / "started")!r}, "a").write("started\\n")\n'
                     'raise SystemExit(3)\n')
    monkeypatch.setitem(flags.TRAINING_SCRIPTS, 'cifar10', str(train))
    assert grid.main(['--dataset', 'cifar10', '--out_dir', str(tmp_path / 'grid'), '--method',
                      'fgsm_rs', 'fgsm_rs', '--seed', '0', '0']) == 0
    assert 'grid: 1 run(s) of ' in capsys.readouterr().out
    assert (tmp_path / 'started').read_text() == 'started\n'
