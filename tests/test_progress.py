"""progress.py: bars on a terminal, a plain line every few minutes in a log."""
import io

import progress


def test_plain_progress_writes_a_line_per_interval_not_per_step(monkeypatch):
    clock = iter(range(0, 10000, 60))  # a minute per step
    monkeypatch.setattr(progress.time, 'time', lambda: next(clock))
    out = io.StringIO()
    bar = progress.PlainProgress(range(20), desc='epoch 1/3', unit='steps', every_s=300,
                                 stream=out)
    bar.set_postfix(loss='1.234')
    assert list(bar) == list(range(20))
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines  # 20 minutes of steps, a line each 5 minutes
    assert lines[0] == 'epoch 1/3: 5/20 steps, 5.0 min, about 15.0 min left, loss=1.234'


def test_a_log_gets_a_line_every_five_minutes_by_default(monkeypatch):
    clock = iter(range(0, 10000, 60))  # a minute per step
    monkeypatch.setattr(progress.time, 'time', lambda: next(clock))
    monkeypatch.setattr(progress.sys, 'stderr', io.StringIO())
    bar = progress.progress(range(20), desc='epoch 1/3')
    assert list(bar) == list(range(20))
    assert len(progress.sys.stderr.getvalue().splitlines()) == 4


def test_a_resumed_epoch_in_a_log_counts_from_the_step_it_resumed_at(monkeypatch):
    clock = iter(range(0, 10000, 60))  # a minute per step
    monkeypatch.setattr(progress.time, 'time', lambda: next(clock))
    monkeypatch.setattr(progress.sys, 'stderr', io.StringIO())
    bar = progress.progress(range(5), total=20, initial=15, desc='epoch 2/3', unit='steps')
    assert list(bar) == list(range(5))
    assert progress.sys.stderr.getvalue() == \
        'epoch 2/3: 20/20 steps, 5.0 min, about 0.0 min left\n'


def test_a_disabled_progress_in_a_log_writes_nothing(monkeypatch):
    """As the processes of a torchrun run other than the first are given it."""
    clock = iter(range(0, 10000, 60))  # a minute per step
    monkeypatch.setattr(progress.time, 'time', lambda: next(clock))
    monkeypatch.setattr(progress.sys, 'stderr', io.StringIO())
    assert list(progress.progress(range(20), desc='epoch 1/3', disable=True)) == list(range(20))
    assert progress.sys.stderr.getvalue() == ''


def test_a_log_file_gets_no_bar(monkeypatch):
    monkeypatch.setattr(progress.sys, 'stderr', io.StringIO())
    assert isinstance(progress.progress(range(3)), progress.PlainProgress)


def test_a_resumed_epoch_estimates_what_is_left_from_its_own_steps(monkeypatch):
    """Resumed at step 50 of 100: the rate is that of the steps taken since, not 60 steps
    in the time of 10."""
    clock = iter(range(0, 10000, 60))  # a minute per step
    monkeypatch.setattr(progress.time, 'time', lambda: next(clock))
    out = io.StringIO()
    bar = progress.PlainProgress(range(10), total=100, initial=50, desc='epoch 2/3',
                                 unit='steps', every_s=600, stream=out)
    assert list(bar) == list(range(10))
    assert out.getvalue() == 'epoch 2/3: 60/100 steps, 10.0 min, about 40.0 min left\n'
