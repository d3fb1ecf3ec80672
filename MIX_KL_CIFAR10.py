"""Train a network on CIFAR-10 with MIX-KL (PreActResNet-18 unless --arch says otherwise).

    python MIX_KL_CIFAR10.py --out_dir ./output/ --data-dir cifar10-data

All flags: --help. The method is mixkl.py; the run around it, training.py.
"""
import training

if __name__ == '__main__':
    training.main('cifar10')
