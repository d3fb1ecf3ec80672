"""CIFAR files in, device batches out: layout checks, safe unpickling, augmentation."""
import codecs
import hashlib
import io
import os
import pickle
import re
import socket
import threading
import time
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import files
import utils
from data import load_dataset
from payloads import (FROMBUFFER, RECONSTRUCT, CreatesAFile, Reduce, array_with_state,
                      forged_dtype, hex_chain)
from synthetic import write_synthetic_cifar
from utils import CifarLoader, InputError, crop_flip, load_cifar


def naive_crop_flip(image, dy, dx, flip):
    crop = F.pad(image, (4, 4, 4, 4))[:, dy:dy + 32, dx:dx + 32]
    return crop.flip(-1) if flip else crop


def test_crop_flip_matches_a_per_image_reference_for_every_offset_and_flip():
    images = torch.randint(1, 256, (2 * 81, 3, 32, 32), dtype=torch.uint8)
    dy = torch.arange(9).repeat_interleave(9).repeat(2)
    dx = torch.arange(9).repeat(9).repeat(2)
    flip = torch.arange(2).repeat_interleave(81).bool()
    out = crop_flip(images, dy, dx, flip)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    for i in range(len(images)):
        assert torch.equal(out[i], naive_crop_flip(images[i], dy[i], dx[i], flip[i]))


def test_training_batches_cover_every_offset_and_flip_uniformly():
    n = 4000
    # Pixel values encode (image, row, column), so each output crop identifies its source.
    images = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    loader = CifarLoader(images, torch.zeros(n, dtype=torch.long), 500, 'cpu', train=True, seed=3)
    order, (offsets, flips) = loader.epoch_plan(0)
    assert sorted(order.tolist()) == list(range(n))
    counts = torch.zeros(9, 9, 2)
    for dy, dx, f in zip(offsets[0], offsets[1], flips.long()):
        counts[dy, dx, f] += 1
    expected = n / 162
    assert (counts > 0).all(), 'every offset and flip is reachable'
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 230, f'not uniform: chi2 {chi2:.0f} with 161 degrees of freedom'


def test_training_batches_are_the_planned_crops_of_the_shuffled_images():
    torch.manual_seed(0)
    images = torch.randint(1, 256, (50, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(50)
    loader = CifarLoader(images, labels, 16, 'cpu', train=True, seed=1)
    batches = list(loader.batches(epoch=2))
    assert [len(y) for _, y in batches] == [16, 16, 16, 2], 'the last, smaller batch is kept'
    order, (offsets, flips) = loader.epoch_plan(2)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert torch.equal(y, labels[order])
    assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    for k in range(50):
        i = order[k]
        expected = naive_crop_flip(images[i], offsets[0, k], offsets[1, k], flips[k])
        assert torch.equal((x[k] * 255).round().to(torch.uint8), expected)
    # Epochs differ; an epoch replays identically from any step (what resuming needs).
    assert not torch.equal(loader.epoch_plan(3)[0], order)
    tail = list(loader.batches(epoch=2, start_step=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(tail, batches[2:]))


def test_without_augmentation_the_training_batches_are_the_shuffled_images_as_they_are():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(20)
    loader = CifarLoader(images, labels, 8, 'cpu', train=True, seed=1, augment=False)
    x, order = (torch.cat(parts) for parts in zip(*loader.batches(epoch=1)))  # labels: indices
    assert sorted(order.tolist()) == list(range(20)) and not torch.equal(order, labels)
    assert torch.equal(x, images[order].float() / 255)


def test_the_shuffle_follows_the_seed_and_the_epoch():
    """The plan of epoch e from seed s is torch's permutation from seed s * 100003 + e: a
    run's order is known from its flags alone, and two seeds never share one."""
    images, labels = torch.zeros(30, 3, 32, 32, dtype=torch.uint8), torch.arange(30)
    for seed, epoch in ((0, 0), (0, 4), (2, 0), (2, 4)):
        order, _ = CifarLoader(images, labels, 8, 'cpu', train=True, seed=seed).epoch_plan(epoch)
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        assert torch.equal(order, torch.randperm(30, generator=g)), (seed, epoch)


@pytest.mark.parametrize('world_size', [2, 3])
def test_under_torchrun_the_ranks_split_each_global_batch_between_them(world_size):
    """Rank r takes images r, r + N, ... of every global batch: together the ranks see the
    single-process batch, each image once, cropped and flipped as it would be there."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(50)
    alone = list(CifarLoader(images, labels, 16, 'cpu', train=True, seed=1).batches(epoch=1))
    shares = [list(CifarLoader(images, labels, 16, 'cpu', train=True, seed=1, rank=r,
                               world_size=world_size).batches(epoch=1))
              for r in range(world_size)]
    for step, (x, y) in enumerate(alone):
        for r in range(world_size):
            xr, yr = shares[r][step]
            assert torch.equal(yr, y[r::world_size]) and torch.equal(xr, x[r::world_size])


def test_test_batches_are_unaugmented_and_in_order():
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    images[0, 0, 0, :2] = torch.tensor([0, 255], dtype=torch.uint8)
    labels = torch.randperm(10)
    loader = CifarLoader(images, labels, 4, 'cpu', train=False)
    batches = list(loader.batches())
    assert [len(y) for _, y in batches] == [4, 4, 2] == [len(x) for x, _ in batches]
    x = torch.cat([b[0] for b in batches])
    assert torch.equal(x, images.float() / 255), 'pixel / 255, exactly'
    assert torch.equal(torch.cat([b[1] for b in batches]), labels)


@pytest.mark.parametrize('dataset,classes', [('cifar10', 10), ('cifar100', 100)])
def test_load_cifar_reads_the_pickle_layout(tmp_path, capsys, dataset, classes):
    write_synthetic_cifar(str(tmp_path), dataset, n_train=60, n_test=20, seed=1)
    spec = utils.DATASETS[dataset]
    for train, names, n in ((True, spec['train_files'], 60), (False, spec['test_files'], 20)):
        x, y = load_cifar(dataset, str(tmp_path), train=train)
        assert x.shape == (n, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
        # The files' rows, in file order, each 3072 bytes as 3 planes of 32 rows of 32.
        batches = [pickle.load(open(os.path.join(tmp_path, spec['folder'], name), 'rb'))
                   for name in names]
        data = np.concatenate([b['data'] for b in batches])
        labels = np.concatenate([b[spec['label_key']] for b in batches])
        assert torch.equal(y, torch.from_numpy(labels).long())
        assert len(set(y.tolist())) > 1 and y.max() < classes
        assert torch.equal(x[:, 1, 2, 3], torch.from_numpy(data[:, 1024 + 2 * 32 + 3]))
        assert torch.equal(x.reshape(n, -1), torch.from_numpy(data))
    assert 'not the official' in capsys.readouterr().out


def test_data_that_is_not_the_official_release_is_noted_unless_asked_to_be_quiet(tmp_path,
                                                                                capsys):
    write_synthetic_cifar(str(tmp_path), 'cifar100', n_train=20, n_test=10, seed=1)
    load_dataset('cifar100', str(tmp_path), train=False)
    assert capsys.readouterr().out == (f'note: {tmp_path / "cifar-100-python"} is not the '
                                       'official CIFAR-100 release (10 test images)\n')
    load_dataset('cifar100', str(tmp_path), train=False, quiet=True)
    assert capsys.readouterr().out == ''


def test_the_note_names_a_split_with_any_file_not_the_official_one(tmp_path, capsys,
                                                                    monkeypatch):
    write_synthetic_cifar(str(tmp_path), 'cifar10', n_train=50, n_test=10)
    folder = tmp_path / 'cifar-10-batches-py'
    md5s = {name: hashlib.md5((folder / name).read_bytes()).hexdigest()
            for name in os.listdir(folder)}
    monkeypatch.setattr(utils, '_official_md5s', lambda dataset: dict(md5s))
    load_cifar('cifar10', str(tmp_path), train=True)
    assert capsys.readouterr().out == '', 'every file is the official one'
    # One training file of five differs: the split is not the official release.
    monkeypatch.setattr(utils, '_official_md5s',
                        lambda dataset: dict(md5s, data_batch_3='0' * 32))
    load_cifar('cifar10', str(tmp_path), train=True)
    assert capsys.readouterr().out == f'note: {folder} is not the official CIFAR-10 release ' \
                                      '(50 train images)\n'
    load_cifar('cifar10', str(tmp_path), train=False)
    assert capsys.readouterr().out == '', 'the test file is still the official one'


@pytest.mark.parametrize('dataset, num_classes, classes', [('cifar10', None, 10),
                                                         ('cifar100', None, 100),
                                                         ('cifar10', 3, 3)])
def test_synthetic_cifar_draws_every_class_in_both_splits(tmp_path, dataset, num_classes,
                                                          classes):
    write_synthetic_cifar(str(tmp_path), dataset, n_train=1000, n_test=1000, seed=4,
                          num_classes=num_classes)
    for train in (True, False):
        _, y = load_cifar(dataset, str(tmp_path), train=train)
        assert sorted(set(y.tolist())) == list(range(classes))


def test_synthetic_cifar_holds_every_image_asked_for_across_its_files(tmp_path):
    write_synthetic_cifar(str(tmp_path), 'cifar10', n_train=53, n_test=7, seed=1)
    x, _ = load_cifar('cifar10', str(tmp_path), train=True)
    counts = [len(pickle.load(open(tmp_path / 'cifar-10-batches-py' / f'data_batch_{i}',
                                   'rb'))['labels']) for i in range(1, 6)]
    assert len(x) == 53 and sum(counts) == 53 and max(counts) - min(counts) <= 1
    assert len(load_cifar('cifar10', str(tmp_path), train=False)[0]) == 7


def test_the_official_file_names_and_label_keys_are_read(tmp_path):
    """Written by hand as the releases are (not through DATASETS): CIFAR-10's data_batch_1..5
    and test_batch with 'labels'; CIFAR-100's train and test with 'fine_labels' (100
    classes) beside 'coarse_labels' (20 superclasses), which must not be read."""
    rng = np.random.default_rng(0)

    def write(path, n, **labels):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        batch = {'batch_label': 'x', 'filenames': [f'{i}.png' for i in range(n)],
                 'data': rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), **labels}
        with open(path, 'wb') as f:
            pickle.dump(batch, f, protocol=2)
    c10 = tmp_path / 'c10' / 'cifar-10-batches-py'
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        write(str(c10 / name), 4, labels=[int(name[-1]) if name[-1].isdigit() else 7] * 4)
    assert load_cifar('cifar10', str(tmp_path / 'c10'), train=True)[1].tolist() == \
        [i for i in range(1, 6) for _ in range(4)]
    assert load_cifar('cifar10', str(tmp_path / 'c10'), train=False)[1].tolist() == [7] * 4
    c100 = tmp_path / 'c100' / 'cifar-100-python'
    for name, fine in (('train', [99, 50, 3]), ('test', [42, 0, 98])):
        write(str(c100 / name), 3, fine_labels=fine, coarse_labels=[f // 5 for f in fine])
    assert load_cifar('cifar100', str(tmp_path / 'c100'), train=True)[1].tolist() == [99, 50, 3]
    assert load_cifar('cifar100', str(tmp_path / 'c100'), train=False)[1].tolist() == [42, 0, 98]


def rewrite_batch(tmp_path, changes, name='data_batch_2', protocol=2):
    """Rewrite one CIFAR-10 batch file with ``changes`` to its dict, in pickle ``protocol``."""
    path = os.path.join(tmp_path, 'cifar-10-batches-py', name)
    with open(path, 'rb') as f:
        batch = pickle.load(f)
    batch.update(changes)
    with open(path, 'wb') as f:
        pickle.dump(batch, f, protocol=protocol)
    return path


def load_error(tmp_path, train=True):
    """The message of the InputError load_cifar raises on the CIFAR-10 in ``tmp_path``: one line."""
    with pytest.raises(InputError) as error:
        load_cifar('cifar10', str(tmp_path), train=train)
    message = str(error.value)
    assert '\n' not in message
    return message


def test_label_out_of_range_is_reported_with_the_file(tmp_path):
    write_synthetic_cifar(str(tmp_path), 'cifar10', n_train=50, n_test=10)
    path = rewrite_batch(tmp_path, {'labels': [3] * 9 + [10]})
    with pytest.raises(InputError, match=f'{path}: label 10 is outside 0..9'):
        load_cifar('cifar10', str(tmp_path), train=True)


@pytest.mark.parametrize('labels', [9, 11])
def test_a_label_count_other_than_the_image_count_is_reported(tmp_path, labels):
    write_synthetic_cifar(str(tmp_path), 'cifar10', n_train=50, n_test=10)
    path = rewrite_batch(tmp_path, {'labels': [3] * labels})
    with pytest.raises(InputError, match=f'{path}: 10 images but {labels} labels'):
        load_cifar('cifar10', str(tmp_path), train=True)


def test_wrong_array_shape_is_reported(tmp_path):
    write_synthetic_cifar(str(tmp_path), 'cifar10', n_train=50, n_test=10)
    rewrite_batch(tmp_path, {'data': np.zeros((10, 1024), np.uint8)})
    with pytest.raises(InputError, match=r'data_batch_2: "data" must be a uint8 array .*\(10, 1024\)'):
        load_cifar('cifar10', str(tmp_path), train=True)


def test_a_one_dimensional_data_array_is_reported_in_one_line(tmp_path):
    write_synthetic_cifar(str(tmp_path), 'cifar10', n_train=50, n_test=10)
    path = rewrite_batch(tmp_path, {'data': np.zeros(30720, np.uint8)})
    assert load_error(tmp_path) == (f'{path}: "data" must be a uint8 array of shape (N, 3072), '
                                    'found uint8 array of shape (30720,)')


def test_truncated_file_is_reported(tmp_path):
    write_synthetic_cifar(str(tmp_path), 'cifar10', n_train=50, n_test=10)
    path = os.path.join(tmp_path, 'cifar-10-batches-py', 'test_batch')
    with open(path, 'rb') as f:
        head = f.read(5000)
    with open(path, 'wb') as f:
        f.write(head)
    with pytest.raises(InputError, match='test_batch: not a readable CIFAR batch file'):
        load_cifar('cifar10', str(tmp_path), train=False)


def test_missing_file_is_named(tmp_path):
    write_synthetic_cifar(str(tmp_path), 'cifar10', n_train=50, n_test=10)
    os.remove(os.path.join(tmp_path, 'cifar-10-batches-py', 'data_batch_4'))
    with pytest.raises(InputError, match='data_batch_4 is missing'):
        load_cifar('cifar10', str(tmp_path), train=True)


def test_a_pickle_with_a_code_payload_is_refused_without_running_it(tmp_path):
    write_synthetic_cifar(str(tmp_path), 'cifar10', n_train=50, n_test=10)
    victim = tmp_path / 'created-by-payload'
    path = rewrite_batch(tmp_path, {'payload': CreatesAFile(str(victim))})
    with pytest.raises(InputError, match=f'{path}: refused to load io.open'):
        load_cifar('cifar10', str(tmp_path), train=True)
    assert not victim.exists()


def test_absent_data_without_network_says_how_to_get_it(tmp_path, monkeypatch):
    import torchvision.datasets

    def no_network(*args, **kwargs):
        raise OSError('network is unreachable')
    monkeypatch.setattr(torchvision.datasets, 'CIFAR100', no_network)
    with pytest.raises(InputError) as error:
        load_cifar('cifar100', str(tmp_path / 'nothing-here'), train=True)
    message = str(error.value)
    assert 'cifar-100-python.tar.gz' in message and 'network is unreachable' in message
    assert str(tmp_path / 'nothing-here' / 'cifar-100-python') in message


# ---------------------------------------------------------------------------
# Labels, empty splits, one-line errors

@pytest.mark.parametrize('byte_order', ['>', '<'])
def test_label_arrays_of_either_byte_order_are_read_as_their_numbers(tmp_path, byte_order):
    write_synthetic_cifar(str(tmp_path), 'cifar10', n_train=50, n_test=10)
    labels = np.arange(10, dtype=f'{byte_order}i4')
    rewrite_batch(tmp_path, {'labels': labels}, name='test_batch')
    _, y = load_cifar('cifar10', str(tmp_path), train=False)
    assert y.tolist() == list(range(10))


@pytest.mark.parametrize('labels,found', [
    ([3] * 9 + [3.7], "float 3.7"),
    ([3] * 9 + [4.0], "float 4.0"),
    ([3] * 9 + ['3'], "str '3'"),
    ([3] * 9 + [True], 'bool True'),
    ([3] * 9 + [None], 'NoneType None'),
    (np.full(10, 3.0), 'float64 array'),
    (np.ones(10, bool), 'bool array'),
    (np.full(10, '3'), '<U1 array'),
    (np.zeros((10, 1), np.int64), 'int64 array of shape (10, 1)'),
    ('3333333333', 'found str'),
])
def test_labels_that_are_not_integers_are_refused_with_the_file_named(tmp_path, labels, found):
    write_synthetic_cifar(str(tmp_path), 'cifar10', n_train=50, n_test=10)
    path = rewrite_batch(tmp_path, {'labels': labels})
    message = load_error(tmp_path)
    assert message.startswith(f'{path}: "labels" must') and found in message


@pytest.mark.parametrize('labels,shown', [
    ([3] * 9 + [10 ** 30], str(10 ** 30)),
    ([3] * 9 + [-1], '-1'),
    ([3] * 9 + [2 ** 20000], 'of 20001 bits'),
    (np.array([3] * 9 + [2 ** 64 - 1], np.uint64), str(2 ** 64 - 1)),
    ([np.int64(3)] * 9 + [np.int64(-5)], '-5'),
    (np.array([3] * 9 + [-1]), '-1'),
    (np.array([3] * 9 + [10], np.int16), '10'),
])
def test_labels_out_of_range_however_large_are_one_line_naming_the_file(tmp_path, labels, shown):
    write_synthetic_cifar(str(tmp_path), 'cifar10', n_train=50, n_test=10)
    path = rewrite_batch(tmp_path, {'labels': labels})
    assert load_error(tmp_path) == f'{path}: label {shown} is outside 0..9'


@pytest.mark.parametrize('train', [True, False])
def test_an_empty_split_is_refused_with_its_files_named(tmp_path, train):
    write_synthetic_cifar(str(tmp_path), 'cifar10', n_train=0 if train else 50,
                          n_test=10 if train else 0)
    folder = os.path.join(tmp_path, 'cifar-10-batches-py')
    message = load_error(tmp_path, train)
    if train:
        assert message == (f'{folder}: the CIFAR-10 training split has no images in '
                           'data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5')
    else:
        assert message == f'{folder}/test_batch: the CIFAR-10 test split has no images'


def test_data_errors_are_one_line_naming_the_file(tmp_path, monkeypatch):
    write_synthetic_cifar(str(tmp_path), 'cifar10', n_train=50, n_test=10)
    path = rewrite_batch(tmp_path, {'labels\nsecond line': [1] * 10})
    with open(path, 'rb') as f:
        batch = pickle.load(f)
    del batch['labels']
    with open(path, 'wb') as f:
        pickle.dump(batch, f)
    message = load_error(tmp_path)
    assert message.startswith(f'{path}: no "labels" entry (found: ') and 'second line' in message

    class Unreadable:  # files.py's os, whose open fails as without the permission (root has it)
        def __getattr__(self, name):
            return getattr(os, name)

        def open(self, *args, **kwargs):
            raise PermissionError(13, 'Permission denied')
    monkeypatch.setattr(files, 'os', Unreadable())  # files.read_file
    assert load_error(tmp_path).endswith('data_batch_1: cannot be read (Permission denied)')


# ---------------------------------------------------------------------------
# Every pickle protocol; nothing the file cannot hold is allocated

def reference_split(tmp_path, train):
    x, y = load_cifar('cifar10', str(tmp_path), train=train, quiet=True)
    return x.clone(), y.clone()


@pytest.mark.parametrize('protocol', range(6))
@pytest.mark.parametrize('labels', ['list', 'array', 'numpy ints'])
def test_a_copy_saved_with_any_pickle_protocol_loads(tmp_path, protocol, labels):
    write_synthetic_cifar(str(tmp_path), 'cifar10', n_train=50, n_test=10)
    expected = {train: reference_split(tmp_path, train) for train in (True, False)}
    folder = tmp_path / 'cifar-10-batches-py'
    for name in os.listdir(folder):
        with open(folder / name, 'rb') as f:
            batch = pickle.load(f)
        y = np.array(batch['labels'])
        batch['labels'] = {'list': y.tolist(), 'array': y, 'numpy ints': list(y)}[labels]
        with open(folder / name, 'wb') as f:
            pickle.dump(batch, f, protocol=protocol)
    for train in (True, False):
        x, y = load_cifar('cifar10', str(tmp_path), train=train, quiet=True)
        assert torch.equal(x, expected[train][0]) and torch.equal(y, expected[train][1])


def test_a_copy_resaved_with_bytes_keys_loads(tmp_path):
    # pickle.load(f, encoding='bytes') then pickle.dump, as some conversion scripts do:
    # the keys become b'data', b'labels', b'batch_label', ...
    write_synthetic_cifar(str(tmp_path), 'cifar100', n_train=20, n_test=10)
    expected = load_cifar('cifar100', str(tmp_path), train=True, quiet=True)
    path = tmp_path / 'cifar-100-python' / 'train'
    batch = pickle.loads(path.read_bytes())
    path.write_bytes(pickle.dumps({k.encode(): v for k, v in batch.items()}))
    x, y = load_cifar('cifar100', str(tmp_path), train=True, quiet=True)
    assert torch.equal(x, expected[0]) and torch.equal(y, expected[1])


def test_arrays_pickled_by_python_2_with_their_data_as_text_load(tmp_path):
    # The official release was written by Python 2: an array's data is a str there, which
    # Python 3 reads back as latin-1 text.
    write_synthetic_cifar(str(tmp_path), 'cifar10', n_train=50, n_test=10)
    images = np.arange(10 * 3072).astype(np.uint8).reshape(10, 3072)
    data = array_with_state((10, 3072), np.dtype('u1'), images.tobytes().decode('latin1'))
    rewrite_batch(tmp_path, {'data': data})
    x, _ = load_cifar('cifar10', str(tmp_path), train=True, quiet=True)
    assert torch.equal(x[10:20].reshape(10, 3072), torch.from_numpy(images))


class Python2Pickler(pickle._Pickler):
    """Pickles text and bytes as Python 2's str (BINSTRING), as the official files hold them."""
    dispatch = dict(pickle._Pickler.dispatch)

    def save_python2_str(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode('latin1')
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + len(data).to_bytes(4, 'little') + data)
        self.memoize(obj)
    dispatch[bytes] = dispatch[str] = save_python2_str


def test_a_batch_written_by_python_2_and_an_older_numpy_loads_as_its_pixels(tmp_path):
    """The official release: str keys and text, numpy.core, the array's bytes as latin-1."""
    write_synthetic_cifar(str(tmp_path), 'cifar10', n_train=50, n_test=10)
    images = (np.arange(10 * 3072) % 256).astype(np.uint8).reshape(10, 3072)
    out = io.BytesIO()
    Python2Pickler(out, protocol=2).dump({'batch_label': 'testing batch 1 of 1', 'data': images,
                                          'labels': list(range(10)),
                                          'filenames': [f'{i}.png' for i in range(10)]})
    raw = out.getvalue()
    assert raw.count(b'cnumpy._core.multiarray\n') == 1
    with open(os.path.join(tmp_path, 'cifar-10-batches-py', 'test_batch'), 'wb') as f:
        f.write(raw.replace(b'cnumpy._core.multiarray\n', b'cnumpy.core.multiarray\n'))
    x, y = load_cifar('cifar10', str(tmp_path), train=False, quiet=True)
    assert torch.equal(x.reshape(10, 3072), torch.from_numpy(images))
    assert y.tolist() == list(range(10))


def test_an_array_pickled_with_permuted_axes_unpickles_as_its_numbers():
    """Protocol 5 writes such an array as its buffer, order 'K' and the axes' order."""
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4).transpose(1, 0, 2)
    raw = pickle.dumps({'x': array}, protocol=5)
    loaded = utils._CifarUnpickler(io.BytesIO(raw), 'batch', len(raw)).load()['x']
    assert np.array_equal(loaded, array)


@pytest.mark.parametrize('protocol', [2, 5])  # 5 keeps the array's buffer out of band
def test_an_array_pickled_in_fortran_order_loads_as_its_numbers(tmp_path, protocol):
    write_synthetic_cifar(str(tmp_path), 'cifar10', n_train=50, n_test=10)
    images = np.arange(10 * 3072).astype(np.uint8).reshape(10, 3072)
    rewrite_batch(tmp_path, {'data': np.asfortranarray(images)}, protocol=protocol)
    x, _ = load_cifar('cifar10', str(tmp_path), train=True, quiet=True)
    assert torch.equal(x[10:20].reshape(10, 3072), torch.from_numpy(images))


def test_data_that_is_not_uint8_is_refused_naming_what_it_is(tmp_path):
    write_synthetic_cifar(str(tmp_path), 'cifar10', n_train=50, n_test=10)
    path = rewrite_batch(tmp_path, {'data': np.zeros((10, 3072), np.float32)})
    assert load_error(tmp_path) == (f'{path}: "data" must be a uint8 array of shape (N, 3072), '
                                    'found float32 array of shape (10, 3072)')


HUGE = (10 ** 6, 10 ** 6)
TEXT = 'x' * 50000


@pytest.mark.parametrize('payload,protocol,message', [
    (array_with_state(HUGE, np.dtype('u1'), b'x'), 2, 'an array of shape (1000000, 1000000)'),
    (Reduce(RECONSTRUCT, (np.ndarray, HUGE, b'b')), 2, 'an array of shape (1000000, 1000000)'),
    (Reduce(FROMBUFFER, (bytearray(b'x'), np.dtype('u1'), HUGE, 'C')), 5,
     'an array of shape (1000000, 1000000)'),
    (Reduce(RECONSTRUCT, (np.ndarray, (10 ** 4, 10 ** 4), b'O')), 2,
     'refused a numpy _reconstruct'),
    (array_with_state((2,), np.dtype('O'), ['a', 'b']), 2, 'an array holds something other'),
    (array_with_state((2,), np.dtype('O'), b'x' * 16), 2, "refused an array of numpy dtype 'O8'"),
    (hex_chain(25), 2, "refused _codecs.encode with 'hex'"),
    (Reduce(bytes, (10 ** 12,)), 2, 'refused bytes() with arguments'),
    (Reduce(bytes, (10 ** 12,)), 5, 'refused bytes() with arguments'),
    # 20000 float64 numbers are 160 kB, more than the file's 130 kB, though fewer than its bytes.
    ([b'\0' * 100000, array_with_state((20000,), np.dtype('f8'), b'x')], 2,
     'an array of shape (20000,) and dtype float64'),
    # Each array fits in the file, all of them together do not: the budget is for the file.
    ([Reduce(RECONSTRUCT, (np.ndarray, (2 ** 14,), b'b')) for _ in range(2000)], 2,
     'an array of shape (16384,)'),
    # The same for bytes: one stored text decoded again and again.
    ([Reduce(codecs.encode, (TEXT, 'latin1')) for _ in range(2000)], 2,
     'a byte string (50000 bytes) is larger than the file'),
])
def test_a_tiny_pickle_declaring_a_huge_array_is_refused_before_allocating(
        tmp_path, payload, protocol, message):
    write_synthetic_cifar(str(tmp_path), 'cifar10', n_train=50, n_test=10)
    path = rewrite_batch(tmp_path, {'payload': payload}, name='test_batch', protocol=protocol)
    tracemalloc.start()
    start = time.time()
    try:
        error = load_error(tmp_path, train=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert error.startswith(f'{path}: {message}')
    assert time.time() - start < 5 and peak < 20 * 2 ** 20, f'{peak / 2 ** 20:.0f} MiB allocated'


def test_a_dtype_never_takes_its_flags_from_the_pickle(tmp_path):
    # A dtype whose pickled flags say "holds Python objects" made numpy read the data as
    # object pointers (a crash at best). Only the type code and byte order are used.
    write_synthetic_cifar(str(tmp_path), 'cifar10', n_train=50, n_test=10)
    images = np.arange(10 * 3072).astype(np.uint8).reshape(10, 3072)
    rewrite_batch(tmp_path, {'data': array_with_state((10, 3072), forged_dtype('u1', 63),
                                                      images.tobytes())})
    x, _ = load_cifar('cifar10', str(tmp_path), train=True, quiet=True)
    assert torch.equal(x[10:20].reshape(10, 3072), torch.from_numpy(images))


# ---------------------------------------------------------------------------
# Downloading

def test_a_download_from_a_server_that_never_answers_times_out(tmp_path, monkeypatch):
    import torchvision.datasets
    server = socket.socket()
    server.bind(('127.0.0.1', 0))
    server.listen(8)  # the kernel accepts connections; nothing ever answers them
    # Should the timeout be missing, closing the socket resets the connection: the test
    # then fails on the message instead of hanging.
    reset = threading.Timer(20, server.close)
    reset.start()
    port = server.getsockname()[1]
    monkeypatch.setattr(torchvision.datasets.CIFAR10, 'url',
                        f'http://127.0.0.1:{port}/cifar-10-python.tar.gz')
    monkeypatch.setattr(utils, 'DOWNLOAD_TIMEOUT_S', 1)
    for variable in ('no_proxy', 'NO_PROXY'):
        monkeypatch.setenv(variable, '*')  # the request must go to the local server itself
    start = time.time()
    try:
        message = load_error(tmp_path / 'data')
    finally:
        reset.cancel()
        server.close()
    assert time.time() - start < 10
    assert 'could not be downloaded (no answer from the server within 1 s' in message
    assert socket.getdefaulttimeout() is None, 'the default timeout is restored'


@pytest.mark.parametrize('dataset, files', [
    ('cifar10', {*(f'data_batch_{i}' for i in range(1, 6)), 'test_batch'}),
    ('cifar100', {'train', 'test'})])
def test_the_official_release_is_known_by_its_train_and_test_files(dataset, files):
    md5s = utils._official_md5s(dataset)
    assert set(md5s) == files and all(re.fullmatch('[0-9a-f]{32}', m) for m in md5s.values())


def test_labels_pickled_as_numpy_integers_by_an_older_numpy_load(tmp_path):
    """numpy 1 names a numpy integer's class numpy.core.multiarray.scalar."""
    write_synthetic_cifar(str(tmp_path), 'cifar10', n_train=50, n_test=10)
    expected = reference_split(tmp_path, False)
    path = tmp_path / 'cifar-10-batches-py' / 'test_batch'
    batch = pickle.loads(path.read_bytes())
    batch['labels'] = list(np.array(batch['labels']))
    raw = pickle.dumps(batch, protocol=2).replace(b'cnumpy._core.multiarray\nscalar\n',
                                                  b'cnumpy.core.multiarray\nscalar\n')
    assert raw.count(b'cnumpy.core.multiarray\nscalar\n') == 1
    path.write_bytes(raw)
    x, y = load_cifar('cifar10', str(tmp_path), train=False, quiet=True)
    assert torch.equal(x, expected[0]) and torch.equal(y, expected[1])
