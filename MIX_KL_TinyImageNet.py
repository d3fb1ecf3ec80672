"""Train a network on Tiny-ImageNet-200 with MIX-KL, with the authors' Tiny-ImageNet defaults.

    python MIX_KL_TinyImageNet.py --out_dir ./output/ --data-dir tiny-imagenet-data

--data-dir holds tiny-imagenet-200/ (http://cs231n.stanford.edu/tiny-imagenet-200.zip,
unzipped). All flags: --help. The method is mixkl.py; the run around it, training.py.
"""
import training

if __name__ == '__main__':
    training.main('tinyimagenet')
