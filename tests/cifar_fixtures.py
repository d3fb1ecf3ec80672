"""Small datasets written in the exact on-disk CIFAR layout (python pickles)."""
import os
import pickle

import numpy as np

LAYOUT = {
    'cifar10': ('cifar-10-batches-py', 'labels', 10,
                [f'data_batch_{i}' for i in range(1, 6)], ['test_batch']),
    'cifar100': ('cifar-100-python', 'fine_labels', 100, ['train'], ['test']),
}


def learnable_images(labels, num_classes, rng):
    """Images a small model can classify: a class-specific colour plus noise."""
    palette = rng.integers(40, 216, size=(num_classes, 3))
    images = palette[labels][:, :, None, None] + rng.integers(-30, 31, size=(len(labels), 3, 32, 32))
    return np.clip(images, 0, 255).astype(np.uint8).reshape(len(labels), 3072)


def write_cifar(root, dataset='cifar10', n_train=200, n_test=100, seed=0, learnable=False,
                num_classes=None):
    """Write a CIFAR-layout copy with n_train/n_test images under ``root``; returns root."""
    folder, label_key, classes, train_files, test_files = LAYOUT[dataset]
    classes = num_classes or classes
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    splits = [(train_files, n_train), (test_files, n_test)]
    for files, n in splits:
        labels = rng.integers(0, classes, size=n)
        images = learnable_images(labels, classes, rng) if learnable else \
            rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        for i, name in enumerate(files):
            part = slice(i * n // len(files), (i + 1) * n // len(files))
            batch = {b'batch_label': b'fixture', b'data': images[part],
                     label_key.encode(): labels[part].tolist()}
            with open(os.path.join(root, folder, name), 'wb') as f:
                pickle.dump(batch, f, protocol=2)
    return root
