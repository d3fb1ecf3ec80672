"""Files written so that a failure or a kill never leaves an empty or partial one in place.

Every file the scripts write (checkpoints, metrics, results.json, the Tiny-ImageNet
cache) goes to a temporary ``.NAME.XXXXXXXX`` beside it and is renamed into place
once complete. A write that fails (a full disk, ``ulimit -f``) removes its temporary
and raises an OSError naming the file; a kill leaves the temporary, which
``remove_stale_temporaries`` recognises: its writer holds a lock on it while it lives.
"""
import contextlib
import errno
import fcntl
import hashlib
import itertools
import os
import re
import stat
import tempfile

import numpy as np
import torch

from base import InputError, one_line

_UMASK = os.umask(0)
os.umask(_UMASK)
# tempfile.mkstemp's random part: 8 characters of this set, after the prefix '.NAME.'.
_TEMPORARY_SUFFIX = r'\.[a-z0-9_]{8}'
# os.link's errors on file systems without hard links: claim the name another way there.
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}


# ---------------------------------------------------------------------------
# Writing: a locked temporary, renamed into place when complete

def _locked_temporary(directory, name):
    """A new temporary ``.NAME.XXXXXXXX`` in ``directory``, open and locked: (fd, path).

    The lock (flock, dropped by the kernel when the process dies, however it dies)
    tells remove_stale_temporaries that a live writer owns the file. A temporary
    taken for stale between its creation and the lock is replaced by a new one.
    """
    while True:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{name}.')
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # no locks on this file system: then nothing takes it for stale either
            return fd, tmp
        try:
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return fd, tmp
        except FileNotFoundError:
            pass
        os.close(fd)


def _atomic_write(path, write, place=None):
    """``write(f)`` into a temporary beside ``path``, then ``place(tmp)`` (default: rename to path).

    The temporary stays locked until it is placed. On any failure it is removed
    and an OSError names ``path`` (not the temporary). Returns what ``place`` returns.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = _locked_temporary(directory, os.path.basename(path))
    f = os.fdopen(fd, 'wb')
    try:
        write(f)
        f.flush()
        os.fsync(f.fileno())
        os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # mkstemp's 0600 would make results private
        return place(tmp) if place is not None else os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename in (None, tmp):
            e.filename, e.filename2 = path, None
        raise
    finally:
        with contextlib.suppress(OSError):  # after a failed write its buffer fails again
            f.close()


class _RecordingWriter:
    """A file's write and flush that remember the first OSError raised.

    torch.save's zip writer turns a failed write (a full disk) into a RuntimeError
    ('unexpected pos ...') that no longer says what failed; this keeps the cause.
    """

    def __init__(self, file):
        self.file, self.error = file, None

    def _recording(self, call, *args):
        try:
            return call(*args)
        except OSError as e:
            self.error = self.error or e
            raise

    def write(self, data):
        return self._recording(self.file.write, data)

    def flush(self):
        return self._recording(self.file.flush)


def _torch_save(obj, f):
    writer = _RecordingWriter(f)
    try:
        torch.save(obj, writer)
    except RuntimeError:
        if writer.error is None:
            raise
        raise writer.error


def atomic_save(obj, path):
    """torch.save through a temporary file, so ``path`` is never left truncated.

    A failed write is an OSError with its real cause (e.g. ENOSPC), as for any other file.
    """
    _atomic_write(path, lambda f: _torch_save(obj, f))


def atomic_write_bytes(path, data):
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_array(path, array):
    """np.save (no pickles) through a temporary file: a reader never sees half an array.

    The bytes go through Python's file writes, not numpy's C ``tofile``, whose failed
    write (a full disk, ``ulimit -f``) is an OSError without its errno.
    """
    _atomic_write(path, lambda f: np.save(_PythonWrites(f), array, allow_pickle=False))


class _PythonWrites:
    """A file seen only through ``write``: numpy then writes through it, not to the fd."""

    def __init__(self, f):
        self.write = f.write


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode())


def create_new_text_file(directory, name, text):
    """Write ``text`` to a new file ``name`` in ``directory`` and return its path.

    An existing file is never replaced: if ``name`` (say results.json) is taken,
    results-2.json, results-3.json, ... are tried. The text is written to a
    temporary first and hard-linked to the first free name (a link never replaces
    a file, so two processes never take the same one): no name ever holds an empty
    or partial file, even after a full disk. Where the file system has no hard
    links the name is claimed with O_EXCL and the temporary renamed onto it.
    """
    stem, ext = os.path.splitext(name)
    names = (os.path.join(directory, name if n == 1 else f'{stem}-{n}{ext}')
             for n in itertools.count(1))
    return _atomic_write(os.path.join(directory, name), lambda f: f.write(text.encode()),
                         place=lambda tmp: _link_to_a_new_name(tmp, names))


def _link_to_a_new_name(tmp, names):
    """Give the complete file ``tmp`` the first name of ``names`` that is not taken."""
    for path in names:
        try:
            os.link(tmp, path)
        except FileExistsError:
            continue
        except OSError as e:
            if e.errno not in _NO_HARD_LINKS:
                raise
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            except FileExistsError:
                continue
            try:
                os.replace(tmp, path)
            except OSError:
                os.unlink(path)  # the empty claim goes too
                raise
            return path
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return path


def append_text(path, text):
    """Append ``text`` to ``path``, all or nothing: a failed write is truncated away again.

    For logs: a full disk leaves the lines written before it, never half a line.
    Unbuffered: a buffered file would write part of the text, then fail again
    flushing what is left before it truncates, and keep the part.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            rest = memoryview(text.encode())
            while rest:
                rest = rest[os.write(fd, rest):]
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            e.filename = e.filename or path
            raise
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# What a kill leaves behind

def remove_stale_temporaries(directory, names):
    """Remove the temporaries that writes of ``names`` in ``directory`` left when killed.

    Only files named as _atomic_write names its temporaries (``.NAME.XXXXXXXX``,
    NAME one of ``names``) and whose writer is dead (no lock held on them) are
    removed; a write in progress in another process keeps its file. Returns the
    paths removed. A folder that cannot be listed or written removes nothing.
    """
    pattern = re.compile('|'.join(rf'\.{re.escape(name)}{_TEMPORARY_SUFFIX}' for name in names))
    removed = []
    try:
        entries = [e for e in os.scandir(directory)
                   if pattern.fullmatch(e.name) and e.is_file(follow_symlinks=False)]
    except OSError:
        return removed
    for entry in entries:
        try:
            fd = os.open(entry.path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its writer lives
            if os.stat(entry.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                os.unlink(entry.path)
                removed.append(entry.path)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


# ---------------------------------------------------------------------------
# Checks and reading

def check_writable_dir(directory, flag):
    """Create ``directory`` if need be and make sure a file can be written in it.

    Done before any work, so a bad ``flag`` (e.g. --out_dir) costs nothing; the
    InputError names the flag and the directory.
    """
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise InputError(f'{flag} {directory} is a file, not a directory')
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise InputError(f'{flag} {directory}: cannot write there ({e.strerror or e})')


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def read_file(path):
    """The bytes of the regular file ``path``; anything else is a one-line InputError.

    An OSError (missing, permissions, I/O) is reported, and so is a FIFO, a device or
    a directory where a file belongs: opened without blocking and refused before any
    read, since reading a FIFO nobody writes to would wait forever.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise InputError(f'{one_line(path)}: cannot be read ({e.strerror or e})')
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # before fdopen, which refuses a directory
        os.close(fd)
        raise InputError(f'{one_line(path)}: not a regular file')
    with os.fdopen(fd, 'rb') as f:
        try:
            return f.read()
        except OSError as e:
            raise InputError(f'{one_line(path)}: cannot be read ({e.strerror or e})')
