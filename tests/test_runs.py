"""runs.py: what the tables read of a run directory, checked on directories written by hand
(every number known)."""
import json
import os
import re
import socket
import time
from types import SimpleNamespace

import pytest
import torch

import runs
from conftest import write_results, write_run
from utils import InputError, sha256_file


def results_entry(checkpoint, digest, n=100, warned=0, **accuracies):
    return dict(checkpoint=str(checkpoint), sha256=digest, report='r.json',
                attacks={a: dict(accuracy=acc, n=n) for a, acc in accuracies.items()},
                checks=[dict(verdict='warn')] * warned + [dict(verdict='pass')])


def test_later_evaluations_come_after_earlier_ones_in_number_order_not_text_order(tmp_path):
    for name in ('results-10.json', 'results-2.json', 'results.json', 'results-old.json',
                 'results-3.json'):
        (tmp_path / name).write_text('{}')
    (tmp_path / 'sub').mkdir()
    (tmp_path / 'sub' / 'results.json').write_text('{}')
    assert [os.path.basename(p) for p in runs.evaluations_in(str(tmp_path))] == \
        ['results.json', 'results-2.json', 'results-3.json', 'results-10.json']
    assert runs.run_evaluations(str(tmp_path))[-1] == str(tmp_path / 'sub' / 'results.json')


def test_evaluations_are_found_in_a_folder_whose_name_has_glob_characters(tmp_path):
    folder = tmp_path / 'run[seed 1]*?'
    (folder / 'eval').mkdir(parents=True)
    for path in ('results.json', 'results-2.json', 'eval/results.json'):
        (folder / path).write_text('{}')
    assert runs.evaluations_in(str(folder)) == [str(folder / 'results.json'),
                                                str(folder / 'results-2.json')]
    assert runs.evaluations_in(str(folder), below=True) == [str(folder / 'eval' / 'results.json')]


def test_each_attack_keeps_the_evaluation_on_most_images_and_the_latest_on_a_tie(tmp_path):
    run = write_run(tmp_path, 'run', [], [(60, 0, 0.5, 0.25)])
    best, final = run / runs.BEST, run / runs.FINAL
    b, f = sha256_file(best), sha256_file(final)
    evaluations = [
        results_entry(best, b, n=1000, warned=1, clean=0.8, aa=0.40),
        results_entry(best, b, n=10000, warned=2, aa=0.42),
        results_entry(best, b, n=10000, aa=0.43),        # a tie: the later one
        results_entry(best, b, n=500, aa=0.10),          # fewer images: ignored
        results_entry(final, f, n=100, warned=3, aa=0.30),
        results_entry(best, '0' * 64, n=99999, aa=0.99),  # other weights at that path
    ]
    got = runs.model_results(str(run), evaluations)
    assert got['best']['attacks']['aa']['accuracy'] == 0.43
    assert got['best']['attacks']['clean']['accuracy'] == 0.8
    assert (got['best']['warnings'], got['final']['warnings']) == (2, 3)
    assert got['final']['attacks'] == {'aa': dict(accuracy=0.30, n=100)}


def test_a_copied_evaluation_counts_by_content_and_a_missing_model_by_its_path(tmp_path):
    run = write_run(tmp_path, 'run', [], [(60, 0, 0.5, 0.25)])
    copy = tmp_path / 'copy.pth'
    copy.write_bytes((run / runs.BEST).read_bytes())
    got = runs.model_results(str(run), [results_entry(copy, sha256_file(copy), aa=0.4)])
    assert got['best']['attacks']['aa']['accuracy'] == 0.4 and got['final']['attacks'] == {}
    # Weights not copied along with the results: the evaluated path is matched.
    (run / runs.FINAL).unlink()
    got = runs.model_results(str(run), [results_entry(run / runs.FINAL, 'a' * 64, aa=0.3),
                                        results_entry(copy, 'a' * 64, aa=0.9)])
    assert got['final']['attacks']['aa']['accuracy'] == 0.3


def test_an_evaluation_at_another_radius_than_the_runs_is_not_its_result(tmp_path, capsys):
    # Trained at 8/255 (write_run's default); evaluated at 8, then at 16 on more images.
    run = write_run(tmp_path, 'run', [], [(60, 0, 0.5, 0.25)])
    write_results(run / 'results.json', [(run / runs.BEST, sha256_file(run / runs.BEST), 0.4)])
    write_results(run / 'results-2.json', [(run / runs.BEST, sha256_file(run / runs.BEST), 0.1)],
                  n=20000, epsilon_255=16.0)
    write_results(run / 'results-3.json', [(run / runs.BEST, sha256_file(run / runs.BEST), 0.7)],
                  n=30000, epsilon_255=4.0)  # a smaller radius: no more its result
    report = json.loads((run / 'results-2.json').read_text())
    results = runs.read_run(str(run))['results']
    assert results['best']['attacks']['aa']['accuracy'] == 0.4
    err = capsys.readouterr().err
    for name, radius in (('results-2.json', 16), ('results-3.json', 4)):
        assert f'{run / name} evaluated {run / runs.BEST} at eps {radius}/255, not at the ' \
               '8/255 it trained at; that evaluation is not used' in err
    (run / 'results-3.json').unlink()
    # A report without its radius (written by hand) counts, as before radii were recorded.
    (run / 'results-2.json').write_text(json.dumps(
        {k: v for k, v in report.items() if k != 'epsilon_255'}))
    assert runs.read_run(str(run))['results']['best']['attacks']['aa']['accuracy'] == 0.1


def test_the_state_of_a_run_is_read_from_which_models_it_saved(tmp_path):
    run = write_run(tmp_path, 'run', [], [(60, 0, 0.5, 0.25)])
    assert runs.run_state(str(run)) == 'finished'
    (run / runs.CHECKPOINT).write_bytes(b'')
    assert runs.run_state(str(run)) == 'finished', 'a finished run keeps its last checkpoint'
    (run / runs.FINAL).unlink()
    assert runs.run_state(str(run)) == 'interrupted'
    (run / runs.CHECKPOINT).unlink()
    assert runs.run_state(str(run)) == 'started'


def test_a_run_diverged_only_if_its_log_ends_saying_so(tmp_path):
    (tmp_path / runs.LOG).write_text('[01:02] epoch 1\n[01:03] error: the run diverged: '
                                     'non-finite loss (nan) at epoch 2. Kept: best\n')
    assert runs.diverged(str(tmp_path)) == \
        'error: the run diverged: non-finite loss (nan) at epoch 2. Kept: best'
    # Resumed afterwards with a smaller learning rate and going on: not diverged any more.
    with open(tmp_path / runs.LOG, 'a') as f:
        f.write('[02:00] resumed from checkpoint.pth\n')
    assert runs.diverged(str(tmp_path)) is None
    (tmp_path / runs.LOG).unlink()
    assert runs.diverged(str(tmp_path)) is None


def test_a_run_reads_as_its_best_epoch_its_last_epoch_and_its_minutes(tmp_path):
    # (seconds, eval seconds, clean, PGD): PGD peaks twice, at epochs 2 and 4: the first counts.
    run = write_run(tmp_path, 'run', [], [(60, 30, 0.5, 0.25), (60, 30, 0.6, 0.40),
                                          (60, 30, 0.7, 0.35), (120, 0, 0.8, 0.40),
                                          (60, 30, 0.9, 0.30)])
    write_results(run / 'results.json', [(run / runs.FINAL, sha256_file(run / runs.FINAL),
                                          0.27)])
    got = runs.read_run(str(run))
    assert (got['best']['epoch'], got['best']['test_clean_acc']) == (2, 0.6)
    assert (got['final']['epoch'], got['final']['test_pgd_acc']) == (5, 0.30)
    assert got['minutes'] == pytest.approx(8.0)
    assert got['state'] == 'finished' and got['alarm_epochs'] == []
    assert got['results']['final']['attacks']['aa']['accuracy'] == 0.27
    assert got['results']['best']['attacks'] == {}


def test_the_alarm_epochs_are_those_after_which_training_logged_the_alarm(tmp_path):
    # (FGSM, PGD) of the alarm's columns: PGD halves at epoch 3 while FGSM holds; at
    # epoch 5 both fall (the model broke down, not overfitted); epoch 6 PGD halves again.
    alarm = [(0.5, 0.4), (0.5, 0.4), (0.6, 0.19), (0.5, 0.2), (0.2, 0.1), (0.5, 0.1)]
    run = write_run(tmp_path, 'run', [], [(1, 1, 0.5, 0.3, dict(alarm_fgsm_acc=f, alarm_pgd_acc=p))
                                          for f, p in alarm])
    assert runs.read_run(str(run))['alarm_epochs'] == [3, 6]


def test_a_run_from_before_the_alarm_columns_reads_as_no_alarm(tmp_path):
    run = write_run(tmp_path, 'run', [], [(1, 1, 0.5, 0.3)] * 3)
    lines = (run / runs.METRICS).read_text().splitlines()
    keep = [i for i, name in enumerate(lines[0].split(',')) if not name.startswith('alarm_')]
    assert len(keep) == len(lines[0].split(',')) - 2
    (run / runs.METRICS).write_text(''.join(','.join(line.split(',')[i] for i in keep) + '\n'
                                            for line in lines))
    got = runs.read_run(str(run))
    assert len(got['rows']) == 3 and got['alarm_epochs'] == []


def test_a_checkpoint_from_another_run_directory_is_named_field_by_field(tmp_path):
    run = write_run(tmp_path, 'run', [], [(60, 0, 0.5, 0.25)])
    config = runs.read_config(str(run))
    args = {k: config[k] for k in runs.config_flags(config)}
    runs.check_checkpoint_matches_config(str(run), dict(args=dict(args)))
    # What a resume may change (where the data is, the device) may differ.
    runs.check_checkpoint_matches_config(str(run), dict(args=dict(args, data_dir='/x',
                                                                  device='cpu')))
    # Nor what a resume may set anew (config.json keeps the first value).
    runs.check_checkpoint_matches_config(str(run), dict(args=dict(
        args, amp=not config['amp'], channels_last=not config['channels_last'])))
    with pytest.raises(runs.InputError, match=r': epochs, seed differ\(s\) from config.json'):
        runs.check_checkpoint_matches_config(str(run), dict(args=dict(args, seed=4, epochs=7)))
    config.pop('seed')
    (run / runs.CONFIG).write_text(json.dumps(config))
    with pytest.raises(runs.InputError, match='seed'):
        runs.read_config(str(run))


@pytest.mark.parametrize('arch,name', [
    ('preactresnet18', 'cifar100-pgd_at-seed3'),  # the authors' network, as runs were named
    ('wrn34-10', 'cifar100-wrn34-10-pgd_at-seed3'),
])
def test_a_run_directory_is_named_after_its_dataset_architecture_method_and_seed(
        tmp_path, arch, name):
    assert runs.run_name('cifar100', arch, 'pgd_at', 3) == name
    run_dir = runs.new_run_dir(str(tmp_path), 'cifar100', arch, 'pgd_at', 3)
    assert re.fullmatch(re.escape(name) + r'-\d{8}-\d{6}', os.path.basename(run_dir))


def test_a_run_started_in_the_same_second_as_another_gets_a_number(tmp_path, monkeypatch):
    started = time.struct_time((2026, 11, 30, 12, 45, 7, 0, 334, 0))
    monkeypatch.setattr(runs, 'time', SimpleNamespace(
        strftime=lambda fmt: time.strftime(fmt, started)))
    made = [os.path.basename(runs.new_run_dir(str(tmp_path), 'cifar10', 'preactresnet18',
                                              'mixkl', 0)) for _ in range(3)]
    assert made == ['cifar10-mixkl-seed0-20261130-124507', 'cifar10-mixkl-seed0-20261130-124507-1',
                    'cifar10-mixkl-seed0-20261130-124507-2']


@pytest.mark.parametrize('bad_row,value,message,column', [
    (1, 'x', 'not a number', 'test_pgd_acc'),
    (3, 'nan', 'not a finite number in one of', 'test_pgd_acc'),
    (2, '', 'not a finite number in one of', 'test_pgd_acc'),
    (2, '', 'not a finite number in one of', 'eval_seconds'),  # the minutes are read from it
    (1, 'inf', 'not a finite number in one of', 'seconds')])
def test_a_bad_metrics_value_is_named_by_its_line_in_the_file(tmp_path, bad_row, value,
                                                              message, column):
    # Line 1 is the header: the nth row is line n + 1, as an editor numbers them.
    run = write_run(tmp_path, 'run', [], [(60, 0, 0.5, 0.25)] * 3)
    path = run / runs.METRICS
    lines = path.read_text().splitlines(keepends=True)
    column = lines[0].rstrip('\n').split(',').index(column)
    cells = lines[bad_row].rstrip('\n').split(',')
    cells[column] = value
    lines[bad_row] = ','.join(cells) + '\n'
    path.write_text(''.join(lines))
    with pytest.raises(runs.InputError) as error:
        runs.read_metrics(str(run))
    assert str(error.value).startswith(f'{path}, line {bad_row + 1}: {message}')


def test_a_run_directory_lock_names_only_the_process_holding_it_now(tmp_path):
    (tmp_path / runs.LOCK).write_text('process 1 on a-machine-that-crashed\n')
    lock = runs.lock_run_dir(str(tmp_path))
    try:
        assert (tmp_path / runs.LOCK).read_text() == \
            f'process {os.getpid()} on {socket.gethostname()}\n'
    finally:
        lock.close()


def test_accuracies_of_0_and_1_are_read_and_anything_past_them_refused(tmp_path):
    run = write_run(tmp_path, 'run', [], [(60, 0, 1.0, 0.0, dict(train_acc=1.0, alarm_fgsm_acc=0.0,
                                                                alarm_pgd_acc=1.0))])
    row, = runs.read_metrics(str(run))
    assert (row['test_clean_acc'], row['test_pgd_acc'], row['train_acc']) == (1.0, 0.0, 1.0)
    for value in (1.0001, -0.0001):
        bad = write_run(tmp_path, f'bad{value}', [], [(60, 0, value, 0.5)])
        with pytest.raises(runs.InputError, match='test_clean_acc not an accuracy in'):
            runs.read_metrics(str(bad))
    for column in ('train_acc', 'alarm_fgsm_acc', 'alarm_pgd_acc'):
        bad = write_run(tmp_path, f'bad-{column}', [], [(60, 0, 0.5, 0.5, {column: 1.5})])
        with pytest.raises(runs.InputError, match=f'{column} not an accuracy in'):
            runs.read_metrics(str(bad))


def test_a_run_before_its_first_epoch_has_no_rows_and_binary_records_are_refused(tmp_path):
    run = write_run(tmp_path, 'run', [], [(60, 0, 0.5, 0.25)])
    (run / runs.METRICS).unlink()  # killed before its first epoch ended
    assert runs.read_metrics(str(run)) == []
    (run / runs.METRICS).write_bytes(b'\xff\xfe epoch,seconds\n')
    with pytest.raises(runs.InputError, match=r'metrics.csv: not a metrics file \('):
        runs.read_metrics(str(run))
    (run / 'config.json').write_bytes(b'{"method": "\xff"}')
    with pytest.raises(runs.InputError, match=r'config.json: not a text file$'):
        runs.read_config(str(run))


def test_the_json_depth_counts_brackets_outside_strings_escaped_quotes_included():
    assert runs.json_depth('{"a": [[1], {"b": []}]}') == 4
    assert runs.json_depth('{"a": "[[[{", "b": "\\\\"}') == 1, 'a quote after \\\\ ends it'
    assert runs.json_depth('{"a": "\\"[[[[", "b": 1}') == 1, 'a quote after \\ does not'


def test_the_checkpoint_format_is_the_one_the_checkpoints_already_on_disk_carry():
    assert runs.CHECKPOINT_FORMAT == 'mixkl-resumable-1'  # a new one would refuse every resume


def resumable():
    """The fields of a checkpoint.pth training writes, each of its kind."""
    return dict(format=runs.CHECKPOINT_FORMAT, args={}, student={}, teacher=None,
                teacher_updates=0, optimizer={}, scheduler={}, epoch=0, step=0, stats={},
                best_pgd=-1.0, history=[], rng={})


@pytest.mark.parametrize('args', [['--seed', '0'], None, 'mixkl'])
def test_a_checkpoint_whose_flags_are_not_a_dict_is_not_resumable(tmp_path, args):
    path = str(tmp_path / 'checkpoint.pth')
    torch.save(dict(resumable(), args=args), path)
    with pytest.raises(InputError, match=f'^--resume {re.escape(path)}: not a resumable '
                                         'checkpoint of this project$'):
        runs.read_checkpoint(path)


@pytest.mark.parametrize('field', ['epoch', 'step'])
def test_a_checkpoint_at_a_negative_epoch_or_step_is_not_resumable(tmp_path, field):
    checkpoint = resumable()
    path = str(tmp_path / 'checkpoint.pth')
    torch.save(checkpoint, path)
    assert runs.read_checkpoint(path)['epoch'] == 0
    torch.save(dict(checkpoint, **{field: -1}), path)
    with pytest.raises(InputError, match=r'\(epoch, step missing or not what training writes\)'):
        runs.read_checkpoint(path)


def results_with(path, attack, aa=0.4, **fields):
    """A results.json for one model (AutoAttack accuracy ``aa``), ``attack``'s entry given
    ``fields``."""
    write_results(path, [(path.parent / runs.BEST, '0' * 64, aa)])
    report = json.loads(path.read_text())
    report['results'][0]['attacks'][attack].update(fields)
    path.write_text(json.dumps(report))


@pytest.mark.parametrize('field, value, message', [
    ('accuracy', -0.2, 'the aa accuracy -0.2 is not a number in [0, 1]'),
    ('n', -5, 'the aa image count -5 is not a whole number'),
    ('n', 2.5, 'the aa image count 2.5 is not a whole number'),
    ('accuracy', True, 'the aa accuracy True is not a number in [0, 1]'),  # JSON's true
])
def test_an_evaluation_holding_numbers_no_evaluation_writes_is_refused(tmp_path, field, value,
                                                                       message):
    path = tmp_path / 'results.json'
    results_with(path, 'aa', **{field: value})
    with pytest.raises(InputError, match=f'^{re.escape(f"{path}: {message}")}$'):
        runs.read_evaluation(str(path))


@pytest.mark.parametrize('key, value', [('epochs', None), ('epochs', 0), ('dataset', 'imagenet')])
def test_a_config_without_its_epochs_or_of_an_unknown_dataset_is_refused(tmp_path, key, value):
    run = write_run(tmp_path, 'run', [], [(60, 0, 0.5, 0.25)])
    config = json.loads((run / 'config.json').read_text())
    config[key] = value
    (run / 'config.json').write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    with pytest.raises(InputError, match=re.escape(f'not the config.json of a training run '
                                                   f'({key} {value!r})')):
        runs.read_config(str(run))


def test_json_nested_as_deep_as_the_limit_is_read_and_one_level_more_refused(tmp_path):
    path = tmp_path / 'results.json'
    for depth in (runs.JSON_DEPTH_LIMIT, runs.JSON_DEPTH_LIMIT + 1):
        path.write_text('[' * depth + ']' * depth)
        if depth == runs.JSON_DEPTH_LIMIT:
            assert runs.json_depth(path.read_text()) == depth and runs.read_json(str(path))
        else:
            with pytest.raises(InputError, match=f'nested deeper than {runs.JSON_DEPTH_LIMIT}'):
                runs.read_json(str(path))


def test_a_missing_model_is_matched_by_its_path_from_a_relative_run_directory(tmp_path,
                                                                            monkeypatch):
    run = write_run(tmp_path, 'run', [], [(60, 0, 0.5, 0.25)])
    (run / runs.FINAL).unlink()
    monkeypatch.chdir(tmp_path)  # summarize.py run: evaluate.py recorded the absolute path
    got = runs.model_results('run', [results_entry(run / runs.FINAL, 'a' * 64, aa=0.3)])
    assert got['final']['attacks']['aa']['accuracy'] == 0.3


def test_an_evaluation_with_accuracies_of_exactly_0_and_1_is_read(tmp_path):
    path = tmp_path / 'results.json'
    results_with(path, 'clean', aa=0.0, accuracy=1.0, correct=10000)
    entry, = runs.read_evaluation(str(path))
    assert (entry['attacks']['clean']['accuracy'], entry['attacks']['aa']['accuracy']) == (1.0, 0.0)
