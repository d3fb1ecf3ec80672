"""A split of any dataset by name: CIFAR through utils.load_cifar, Tiny-ImageNet through
tinyimagenet.py."""
from base import DATASETS, InputError, one_line
from tinyimagenet import load_tiny_imagenet
from utils import load_cifar


def load_dataset(dataset, data_dir, train, quiet=False):
    """Return (images uint8 (N, 3, S, S), labels int64 (N,)) of a split of any of DATASETS.

    S is DATASETS[dataset]['image_size']. CIFAR goes through load_cifar (downloaded
    when absent); Tiny-ImageNet-200 through tinyimagenet.load_tiny_imagenet, whose
    ``train=False`` is the labelled validation split.
    """
    if dataset not in DATASETS:
        raise InputError(f'unknown dataset {one_line(repr(dataset), 40)}; '
                         f'one of {", ".join(DATASETS)}')
    if dataset == 'tinyimagenet':
        return load_tiny_imagenet(data_dir, train, quiet=quiet)
    return load_cifar(dataset, data_dir, train, quiet=quiet)
