"""What every module of the project shares: the datasets it knows and the error for bad input.

It imports nothing of the project, so any module can import it without a cycle
(utils reads CIFAR and tinyimagenet.py Tiny-ImageNet, data.py dispatches to both: all
take DATASETS and InputError from here).
"""

# ---------------------------------------------------------------------------
# The datasets

DATASETS = {
    'cifar10': dict(folder='cifar-10-batches-py', num_classes=10, label_key='labels',
                    train_files=[f'data_batch_{i}' for i in range(1, 6)],
                    test_files=['test_batch'], name='CIFAR-10', image_size=32,
                    url='https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'),
    'cifar100': dict(folder='cifar-100-python', num_classes=100, label_key='fine_labels',
                     train_files=['train'], test_files=['test'], name='CIFAR-100', image_size=32,
                     url='https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz'),
    # Read by tinyimagenet.py from the official folder layout; its labelled validation
    # split is what train=False gives (the test split has no labels). Never downloaded.
    'tinyimagenet': dict(folder='tiny-imagenet-200', num_classes=200, name='Tiny-ImageNet-200',
                         image_size=64, test_split='val',
                         url='http://cs231n.stanford.edu/tiny-imagenet-200.zip'),
}


# ---------------------------------------------------------------------------
# Bad input, reported in one line

class InputError(Exception):
    """Bad input from the user (data, checkpoint, flags): reported in one line."""


def one_line(text, limit=300):
    """``text`` on one line (whitespace runs become one space), cut at ``limit`` characters."""
    text = ' '.join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + '...'
