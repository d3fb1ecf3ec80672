"""files.py: writes that never leave a partial file, new names that never replace one, and
what a kill leaves behind, removed only when its writer is dead."""
import errno
import fcntl
import hashlib
import os

import numpy as np
import pytest

import files
from utils import InputError


def test_only_the_temporaries_of_the_named_files_whose_writer_died_are_removed(tmp_path):
    def make(name):
        (tmp_path / name).write_bytes(b'partial')
        return str(tmp_path / name)
    dead = [make('.checkpoint.pth.ab_12xyz'), make('.metrics.csv.0123abcd')]
    kept = [make('checkpoint.pth'), make('.checkpoint.pth'), make('.checkpoint.pth.ABCDEFGH'),
            make('.checkpoint.pth.abc'), make('.other.txt.abcdefgh'),
            make('.metrics.csv.abcdefgh.x'), make('x.checkpoint.pth.abcdefgh')]
    live = make('.config.json.livewrit')
    os.symlink(dead[0], tmp_path / '.curves.png.symlink1')
    kept += [live, str(tmp_path / '.curves.png.symlink1')]
    with open(live, 'rb+') as writer:  # a write in progress: its writer holds the lock
        fcntl.flock(writer, fcntl.LOCK_EX)
        removed = files.remove_stale_temporaries(
            str(tmp_path), ['checkpoint.pth', 'metrics.csv', 'config.json', 'curves.png'])
    assert sorted(removed) == sorted(dead)
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in kept)
    assert files.remove_stale_temporaries(str(tmp_path / 'absent'), ['x']) == []


@pytest.mark.parametrize('hard_links', [True, False])
def test_a_new_file_never_replaces_one_and_takes_the_next_free_number(tmp_path, monkeypatch,
                                                                      hard_links):
    if not hard_links:  # a file system without them (some network or FUSE mounts)
        def link(source, destination):
            raise OSError(errno.EPERM, 'Operation not permitted', source)
        monkeypatch.setattr(os, 'link', link)
    paths = [files.create_new_text_file(str(tmp_path), 'results.json', f'{n}') for n in range(3)]
    assert [os.path.basename(p) for p in paths] == ['results.json', 'results-2.json',
                                                   'results-3.json']
    os.remove(paths[1])
    assert os.path.basename(files.create_new_text_file(str(tmp_path), 'results.json', 'x')) == \
        'results-2.json'
    assert [(tmp_path / n).read_text() for n in ('results.json', 'results-2.json',
                                                'results-3.json')] == ['0', 'x', '2']
    assert sorted(os.listdir(tmp_path)) == ['results-2.json', 'results-3.json', 'results.json']


def test_an_atomic_write_replaces_the_whole_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / 'metrics.csv')
    files.atomic_write_text(path, 'a' * 10)
    files.atomic_write_text(path, 'b')
    assert open(path).read() == 'b' and os.listdir(tmp_path) == ['metrics.csv']
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    files.atomic_write_array(str(tmp_path / 'a.npy'), array)
    assert np.array_equal(np.load(tmp_path / 'a.npy', allow_pickle=False), array)

    def fails(f):
        f.write(b'half')
        raise OSError(28, 'No space left on device')
    with pytest.raises(OSError) as failure:
        files._atomic_write(path, fails)
    assert failure.value.filename == path, 'the error names the file, not its temporary'
    assert open(path).read() == 'b' and sorted(os.listdir(tmp_path)) == ['a.npy', 'metrics.csv']


def test_an_atomic_write_reaches_the_disk_before_it_takes_the_files_name(tmp_path, monkeypatch):
    """fsync, then rename: after a power cut the name holds the old file or the whole new one."""
    calls = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(files.os, 'fsync', lambda fd: calls.append('fsync') or fsync(fd))
    monkeypatch.setattr(files.os, 'replace', lambda *a: calls.append('replace') or replace(*a))
    files.atomic_write_text(str(tmp_path / 'results.json'), '{}')
    assert calls == ['fsync', 'replace']


def test_an_atomic_write_stopped_by_ctrl_c_leaves_no_temporary(tmp_path):
    def interrupted(f):
        f.write(b'half')
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        files._atomic_write(str(tmp_path / 'metrics.csv'), interrupted)
    assert os.listdir(tmp_path) == []


def test_an_append_adds_to_the_end_and_keeps_what_was_there(tmp_path):
    path = str(tmp_path / 'train.log')
    files.append_text(path, 'one\n')
    files.append_text(path, 'two\n')
    assert open(path).read() == 'one\ntwo\n'


def test_a_file_is_read_whole_and_hashed_across_chunk_boundaries(tmp_path):
    data = os.urandom((1 << 20) * 2 + 7)
    (tmp_path / 'f').write_bytes(data)
    assert files.read_file(str(tmp_path / 'f')) == data
    assert files.sha256_file(str(tmp_path / 'f')) == hashlib.sha256(data).hexdigest()
    with pytest.raises(InputError, match='not a regular file'):
        files.read_file(str(tmp_path))
    with pytest.raises(InputError, match='cannot be read'):
        files.read_file(str(tmp_path / 'absent'))


def test_an_output_folder_is_made_and_a_file_in_its_place_is_refused(tmp_path):
    files.check_writable_dir(str(tmp_path / 'a' / 'b'), '--out_dir')
    assert os.path.isdir(tmp_path / 'a' / 'b') and os.listdir(tmp_path / 'a' / 'b') == []
    (tmp_path / 'f').write_text('')
    with pytest.raises(InputError, match=r'--out_dir .*f is a file, not a directory'):
        files.check_writable_dir(str(tmp_path / 'f'), '--out_dir')
