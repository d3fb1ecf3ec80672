"""CIFAR files in, device batches out: layout checks, safe unpickling, augmentation."""
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from payloads import CreatesAFile
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


def test_test_batches_are_unaugmented_and_in_order():
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    loader = CifarLoader(images, torch.arange(10), 4, 'cpu', train=False)
    x = torch.cat([b[0] for b in loader.batches()])
    assert torch.equal((x * 255).round().to(torch.uint8), images)


@pytest.mark.parametrize('dataset,classes', [('cifar10', 10), ('cifar100', 100)])
def test_load_cifar_reads_the_pickle_layout(tmp_path, capsys, dataset, classes):
    write_synthetic_cifar(str(tmp_path), dataset, n_train=60, n_test=20, seed=1)
    x, y = load_cifar(dataset, str(tmp_path), train=True)
    assert x.shape == (60, 3, 32, 32) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and 0 <= y.min() and y.max() < classes
    x_test, _ = load_cifar(dataset, str(tmp_path), train=False)
    assert x_test.shape == (20, 3, 32, 32)
    assert 'not the official' in capsys.readouterr().out


def rewrite_batch(tmp_path, changes):
    path = os.path.join(tmp_path, 'cifar-10-batches-py', 'data_batch_2')
    with open(path, 'rb') as f:
        batch = pickle.load(f)
    batch.update(changes)
    with open(path, 'wb') as f:
        pickle.dump(batch, f, protocol=2)
    return path


def test_label_out_of_range_is_reported_with_the_file(tmp_path):
    write_synthetic_cifar(str(tmp_path), 'cifar10', n_train=50, n_test=10)
    path = rewrite_batch(tmp_path, {'labels': [3] * 9 + [10]})
    with pytest.raises(InputError, match=f'{path}: label 10 is outside 0..9'):
        load_cifar('cifar10', str(tmp_path), train=True)


def test_wrong_array_shape_is_reported(tmp_path):
    write_synthetic_cifar(str(tmp_path), 'cifar10', n_train=50, n_test=10)
    rewrite_batch(tmp_path, {'data': np.zeros((10, 1024), np.uint8)})
    with pytest.raises(InputError, match=r'data_batch_2: "data" must be a uint8 array .*\(10, 1024\)'):
        load_cifar('cifar10', str(tmp_path), train=True)


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
