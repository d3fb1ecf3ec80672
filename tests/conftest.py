import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The tests run many tiny models: one thread is faster than two that synchronise on every op,
# and it keeps results identical however busy the machine is. Subprocesses inherit it.
os.environ['OMP_NUM_THREADS'] = '1'
torch.set_num_threads(1)
