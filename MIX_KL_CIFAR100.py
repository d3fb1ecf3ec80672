"""Train a network on CIFAR-100 with MIX-KL (PreActResNet-18 unless --arch says otherwise).

    python MIX_KL_CIFAR100.py --out_dir ./output/ --data-dir cifar100-data

All flags: --help. The method is mixkl.py; the run around it, training.py.
"""
import training

if __name__ == '__main__':
    training.main('cifar100')
