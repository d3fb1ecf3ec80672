"""Pickle payloads for the safe-loading tests: what unpickling them would do is the point."""
import codecs

import numpy as np

# numpy's own pickling functions, whichever module (numpy.core or numpy._core) holds them.
RECONSTRUCT = np.zeros(1).__reduce__()[0]
FROMBUFFER = np.zeros(1, np.uint8).__reduce_ex__(5)[0]


class CreatesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, 'w')


class Reduce:
    """Pickles as ``function(*args)``, then ``BUILD state`` if a state is given."""

    def __init__(self, function, args, state=None):
        self.function, self.args, self.state = function, args, state

    def __reduce__(self):
        if self.state is None:
            return self.function, self.args
        return self.function, self.args, self.state


def array_with_state(shape, dtype, data):
    """An ndarray as numpy pickles it (protocols 0-4), with any shape, dtype and data."""
    return Reduce(RECONSTRUCT, (np.ndarray, (0,), b'b'), (1, shape, dtype, False, data))


def forged_dtype(spec, flags):
    """numpy.dtype(spec) whose pickled state claims other flags (e.g. 'holds objects')."""
    return Reduce(np.dtype, (spec, False, True), (3, '|', None, None, None, -1, -1, flags))


def hex_chain(levels):
    """_codecs.encode(..., 'hex') nested ``levels`` deep: 2 bytes become 2 ** (levels + 1)."""
    payload = b'ab'
    for _ in range(levels):
        payload = Reduce(codecs.encode, (payload, 'hex'))
    return payload
