"""Evaluate checkpoints on CIFAR-100: clean, PGD-10/20/50, C&W-20 and AutoAttack.

    python test_cifar100.py --model_path model.pth --out_dir ./output/ --data-dir cifar100-data

All flags: --help. The evaluation lives in evaluate.py.
"""
import evaluate

if __name__ == '__main__':
    evaluate.main('cifar100')
