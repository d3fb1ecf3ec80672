"""Evaluate checkpoints on Tiny-ImageNet-200's validation set: clean, PGD-10/20/50, C&W-20, AutoAttack.

    python test_tinyimagenet.py --model_path model.pth --out_dir ./output/ --data-dir tiny-imagenet-data

All flags: --help. The evaluation lives in evaluate.py.
"""
import evaluate

if __name__ == '__main__':
    evaluate.main('tinyimagenet')
