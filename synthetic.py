"""Synthetic data in the exact CIFAR python-pickle layout, for the tests and the benchmark.

The files go through the same ``utils.load_cifar`` as the real release: nothing
downstream knows they are synthetic.
"""
import os
import pickle

import numpy as np

from utils import DATASETS


def class_palette(num_classes, rng):
    """Distinct colours from an evenly spaced grid: classes stay apart under small attacks."""
    levels = next(k for k in range(2, 100) if k ** 3 >= num_classes)
    grid = np.stack(np.meshgrid(*[np.linspace(40, 216, levels).round()] * 3), -1).reshape(-1, 3)
    return grid[rng.permutation(len(grid))[:num_classes]].astype(np.int64)


def learnable_images(labels, num_classes, rng, palette=None):
    """Images a small model can classify: a class-specific colour plus noise.

    Pass the same ``palette`` (see class_palette) for every split of a dataset.
    """
    if palette is None:
        palette = class_palette(num_classes, rng)
    images = palette[labels][:, :, None, None] + rng.integers(-30, 31, size=(len(labels), 3, 32, 32))
    return np.clip(images, 0, 255).astype(np.uint8).reshape(len(labels), 3072)


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
            with open(os.path.join(root, folder, name), 'wb') as f:
                pickle.dump(batch, f, protocol=2)
    return root
