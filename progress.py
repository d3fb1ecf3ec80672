"""Progress that suits where the output goes: a tqdm bar on a terminal, plain lines in a log.

A bar redraws itself many times a second; in a file (a SLURM log, a redirected
run) every redraw is a line, and 110 epochs x 391 steps fill it with tens of
thousands of them. When stderr is not a terminal, ``progress`` prints one plain
line every ``PLAIN_EVERY_S`` seconds instead (and nothing for work shorter than
that).
"""
import sys
import time

from tqdm import tqdm

# Seconds between two plain progress lines when the output is not a terminal.
PLAIN_EVERY_S = 300.0


def to_terminal(stream=None):
    """True when ``stream`` (stderr by default) is a terminal."""
    stream = stream if stream is not None else sys.stderr
    return hasattr(stream, 'isatty') and stream.isatty()


def progress(iterable=None, total=None, desc='', initial=0, leave=False, disable=False,
             unit='it'):
    """A tqdm bar on a terminal; a ``PlainProgress`` otherwise. Both iterate, update and
    take set_postfix."""
    if to_terminal():
        return tqdm(iterable, total=total, desc=desc, initial=initial, leave=leave,
                    disable=disable, unit=unit)
    return PlainProgress(iterable, total=total, desc=desc, initial=initial, disable=disable,
                         unit=unit)


class PlainProgress:
    """tqdm's interface, written as one line every PLAIN_EVERY_S seconds to stderr."""

    def __init__(self, iterable=None, total=None, desc='', initial=0, disable=False, unit='it',
                 every_s=None, stream=None):
        self.iterable, self.desc, self.unit, self.disable = iterable, desc, unit, disable
        self.total = total if total is not None else _length(iterable)
        self.n = self.start_n = initial
        self.every_s = PLAIN_EVERY_S if every_s is None else every_s
        self.stream = stream
        self.start = self.last = time.time()
        self.postfix = ''

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()

    def update(self, n=1):
        self.n += n
        now = time.time()
        if not self.disable and now - self.last >= self.every_s:
            self.last = now
            print(self.line(now), file=self.stream or sys.stderr, flush=True)

    def line(self, now=None):
        """'epoch 3/110: 200/391 it, 4.1 min, about 3.9 min left, loss=1.234'."""
        elapsed = (now or time.time()) - self.start
        done = f'{self.n}/{self.total}' if self.total else str(self.n)
        text = f'{self.desc}: {done} {self.unit}, {elapsed / 60:.1f} min'
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0
        if self.total and rate > 0:
            text += f', about {(self.total - self.n) / rate / 60:.1f} min left'
        return text + (f', {self.postfix}' if self.postfix else '')

    def set_postfix(self, **values):
        self.postfix = ', '.join(f'{k}={v}' for k, v in values.items())

    def close(self):
        pass

    @staticmethod
    def write(text):
        print(text, flush=True)


def _length(iterable):
    try:
        return len(iterable)
    except TypeError:
        return None
