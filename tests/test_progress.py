"""progress.py: bars on a terminal, a plain line every few minutes in a log."""
import io
import types

import pytest

import progress


@pytest.fixture
def a_minute_per_step(monkeypatch):
    """progress's clock moves one minute each time it is read: once at the start, once a step.
    It starts where time.time() is, far from 0."""
    start = 1_800_000_000
    clock = iter(range(start, start + 10000, 60))
    monkeypatch.setattr(progress.time, 'time', lambda: next(clock))


@pytest.fixture
def log(monkeypatch):
    """stderr as a log file (not a terminal): what progress() writes there.

    progress.py's own ``sys`` is replaced, not sys.stderr, which pytest's capture sets again
    between a fixture and its test.
    """
    stream = io.StringIO()
    monkeypatch.setattr(progress, 'sys', types.SimpleNamespace(stderr=stream))
    return stream


def test_plain_progress_writes_a_line_per_interval_not_per_step(a_minute_per_step):
    out = io.StringIO()
    bar = progress.PlainProgress(range(20), desc='epoch 1/3', unit='steps', every_s=300,
                                 stream=out)
    bar.set_postfix(loss='1.234')
    assert list(bar) == list(range(20))
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines  # 20 minutes of steps, a line each 5 minutes
    assert lines[0] == 'epoch 1/3: 5/20 steps, 5.0 min, about 15.0 min left, loss=1.234'


def test_a_log_gets_a_line_every_five_minutes_by_default(a_minute_per_step, log):
    bar = progress.progress(range(20), desc='epoch 1/3')
    assert list(bar) == list(range(20))
    assert len(log.getvalue().splitlines()) == 4


def test_a_resumed_epoch_in_a_log_counts_from_the_step_it_resumed_at(a_minute_per_step, log):
    bar = progress.progress(range(5), total=20, initial=15, desc='epoch 2/3', unit='steps')
    assert list(bar) == list(range(5))
    assert log.getvalue() == 'epoch 2/3: 20/20 steps, 5.0 min, about 0.0 min left\n'


def test_a_disabled_progress_in_a_log_writes_nothing(a_minute_per_step, log):
    """As the processes of a torchrun run other than the first are given it."""
    assert list(progress.progress(range(20), desc='epoch 1/3', disable=True)) == list(range(20))
    assert log.getvalue() == ''


def test_a_log_file_gets_no_bar(log):
    assert isinstance(progress.progress(range(3)), progress.PlainProgress)


def test_a_resumed_epoch_estimates_what_is_left_from_its_own_steps(a_minute_per_step):
    """Resumed at step 50 of 100: the rate is that of the steps taken since, not 60 steps
    in the time of 10."""
    out = io.StringIO()
    bar = progress.PlainProgress(range(10), total=100, initial=50, desc='epoch 2/3',
                                 unit='steps', every_s=600, stream=out)
    assert list(bar) == list(range(10))
    assert out.getvalue() == 'epoch 2/3: 60/100 steps, 10.0 min, about 40.0 min left\n'


def test_a_terminal_gets_a_tqdm_bar_with_the_given_settings(monkeypatch):
    terminal = types.SimpleNamespace(isatty=lambda: True)  # what to_terminal asks of stderr
    monkeypatch.setattr(progress, 'sys', types.SimpleNamespace(stderr=terminal))
    bar = progress.progress(range(3), total=5, desc='epoch 1/3', initial=2, leave=True,
                            unit='steps')
    assert isinstance(bar, progress.tqdm) and not isinstance(bar, progress.PlainProgress)
    assert (bar.desc, bar.total, bar.n, bar.leave, bar.disable, bar.unit) == \
        ('epoch 1/3', 5, 2, True, False, 'steps')
    bar.close()
    assert progress.progress(range(3), disable=True).disable


def test_work_of_unknown_length_is_counted_without_an_estimate(a_minute_per_step):
    out = io.StringIO()
    bar = progress.PlainProgress((i for i in range(10)), desc='attack', every_s=300, stream=out)
    assert list(bar) == list(range(10))
    assert out.getvalue() == 'attack: 5 it, 5.0 min\nattack: 10 it, 10.0 min\n'


def test_an_update_counts_what_it_is_given(a_minute_per_step):
    out = io.StringIO()
    bar = progress.PlainProgress(None, total=100, desc='images', every_s=60, stream=out)
    bar.update(30)  # one minute: a line
    bar.update(20)
    assert out.getvalue().splitlines() == ['images: 30/100 it, 1.0 min, about 2.3 min left',
                                           'images: 50/100 it, 2.0 min, about 2.0 min left']
