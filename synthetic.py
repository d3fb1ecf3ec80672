"""Synthetic data in the exact layouts of the real releases, for the tests and the benchmark.

CIFAR's python pickles and Tiny-ImageNet-200's JPEG folders. The files go through
the same ``utils.load_cifar`` / ``tinyimagenet.load_tiny_imagenet`` as the real
releases: nothing downstream knows they are synthetic.
"""
import os
import pickle

import numpy as np
from PIL import Image

from base import DATASETS
from files import atomic_write_bytes


def class_palette(num_classes, rng):
    """Distinct colours from an evenly spaced grid: classes stay apart under small attacks."""
    levels = next(k for k in range(2, 100) if k ** 3 >= num_classes)
    grid = np.stack(np.meshgrid(*[np.linspace(40, 216, levels).round()] * 3), -1).reshape(-1, 3)
    return grid[rng.permutation(len(grid))[:num_classes]].astype(np.int64)


def learnable_images(labels, num_classes, rng, palette=None, size=32):
    """Images a small model can classify: a class-specific colour plus noise.

    Pass the same ``palette`` (see class_palette) for every split of a dataset.
    Returns (N, 3 * size * size) uint8, CIFAR's row layout.
    """
    if palette is None:
        palette = class_palette(num_classes, rng)
    noise = rng.integers(-30, 31, size=(len(labels), 3, size, size))
    images = palette[labels][:, :, None, None] + noise
    return np.clip(images, 0, 255).astype(np.uint8).reshape(len(labels), 3 * size * size)


def write_synthetic_cifar(root, dataset='cifar10', n_train=200, n_test=100, seed=0,
                          learnable=False, num_classes=None):
    """Write synthetic images in the exact CIFAR python-pickle layout under ``root``.

    For tests and benchmarks: the files go through the same ``load_cifar`` as
    the real release. ``learnable`` gives images a small model can classify.
    ``num_classes`` (default: the dataset's) limits the labels used.
    """
    spec = DATASETS[dataset]
    folder, label_key = spec['folder'], spec['label_key']
    train_files, test_files = spec['train_files'], spec['test_files']
    classes = num_classes or spec['num_classes']
    rng = np.random.default_rng(seed)
    palette = class_palette(classes, rng)
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    splits = [(train_files, n_train), (test_files, n_test)]
    for files, n in splits:
        labels = rng.integers(0, classes, size=n)
        images = learnable_images(labels, classes, rng, palette) if learnable else \
            rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        for i, name in enumerate(files):
            part = slice(i * n // len(files), (i + 1) * n // len(files))
            # str keys: what the official files give when unpickled with encoding='latin1'
            batch = {'batch_label': 'synthetic', 'data': images[part],
                     label_key: labels[part].tolist()}
            atomic_write_bytes(os.path.join(root, folder, name), pickle.dumps(batch, protocol=2))
    return root


def synthetic_wnids(num_classes, rng):
    """Distinct ImageNet-style class ids ('n01443537'), in an order that is not sorted.

    The official wnids.txt is not sorted either: labels must follow the sorted order.
    """
    numbers = rng.choice(10 ** 8, size=num_classes, replace=False)
    wnids = [f'n{n:08d}' for n in numbers]
    return wnids[::-1] if num_classes > 1 and wnids == sorted(wnids) else wnids


def _tiny_images(labels, num_classes, rng, palette, learnable):
    """(N, 64, 64, 3) uint8 pixels for Pillow: class colour plus noise, or pure noise."""
    if learnable:
        flat = learnable_images(labels, num_classes, rng, palette, size=64)
        return flat.reshape(len(labels), 3, 64, 64).transpose(0, 2, 3, 1)
    return rng.integers(0, 256, size=(len(labels), 64, 64, 3), dtype=np.uint8)


def _box(rng):
    x0, y0 = rng.integers(0, 32, size=2)
    x1, y1 = rng.integers(32, 64, size=2)
    return f'{x0}\t{y0}\t{x1}\t{y1}'


def _write_jpegs(folder, names, pixels):
    os.makedirs(folder, exist_ok=True)
    for name, image in zip(names, pixels):
        # High quality: JPEG loss stays well below the class colour differences.
        Image.fromarray(np.ascontiguousarray(image)).save(os.path.join(folder, name), 'JPEG',
                                                          quality=95)


def write_synthetic_tiny_imagenet(root, num_classes=4, per_class=6, n_val=12, seed=0,
                                  learnable=False, wnids_file=True):
    """Write synthetic 64x64 JPEGs in the exact Tiny-ImageNet-200 layout under ``root``.

    ``root/tiny-imagenet-200/`` gets wnids.txt (unless not ``wnids_file``), words.txt,
    train/<wnid>/images/<wnid>_<i>.JPEG with train/<wnid>/<wnid>_boxes.txt,
    val/images/val_<i>.JPEG with val/val_annotations.txt, and n_val unlabelled
    test/images/test_<i>.JPEG. ``learnable`` gives images a small model can classify.
    Returns ``root``.
    """
    base = os.path.join(root, DATASETS['tinyimagenet']['folder'])
    rng = np.random.default_rng(seed)
    wnids = synthetic_wnids(num_classes, rng)
    palette = class_palette(num_classes, rng)
    os.makedirs(base, exist_ok=True)
    if wnids_file:
        _write_text(os.path.join(base, 'wnids.txt'), ''.join(f'{w}\n' for w in wnids))
    _write_text(os.path.join(base, 'words.txt'),
                ''.join(f'{w}\tsynthetic class {i}\n' for i, w in enumerate(wnids)))
    for label, wnid in enumerate(wnids):
        names = [f'{wnid}_{i}.JPEG' for i in range(per_class)]
        folder = os.path.join(base, 'train', wnid)
        _write_jpegs(os.path.join(folder, 'images'), names,
                     _tiny_images(np.full(per_class, label), num_classes, rng, palette, learnable))
        _write_text(os.path.join(folder, f'{wnid}_boxes.txt'),
                    ''.join(f'{name}\t{_box(rng)}\n' for name in names))
    labels = rng.integers(0, num_classes, size=n_val)
    names = [f'val_{i}.JPEG' for i in range(n_val)]
    _write_jpegs(os.path.join(base, 'val', 'images'), names,
                 _tiny_images(labels, num_classes, rng, palette, learnable))
    _write_text(os.path.join(base, 'val', 'val_annotations.txt'),
                ''.join(f'{name}\t{wnids[y]}\t{_box(rng)}\n' for name, y in zip(names, labels)))
    test_labels = rng.integers(0, num_classes, size=n_val)
    _write_jpegs(os.path.join(base, 'test', 'images'), [f'test_{i}.JPEG' for i in range(n_val)],
                 _tiny_images(test_labels, num_classes, rng, palette, learnable))
    return root


def _write_text(path, text):
    with open(path, 'w') as f:
        f.write(text)
