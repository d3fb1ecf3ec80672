"""Several processes under torchrun: the process group, the collectives, the wrapped student and teacher.

``torchrun --nproc_per_node=N MIX_KL_CIFAR10.py ...`` starts N copies of the
training script with RANK, LOCAL_RANK and WORLD_SIZE in their environment.
``Distributed.from_env`` joins them into one process group (NCCL on CUDA, each
process on cuda:LOCAL_RANK; gloo on CPU). Without torchrun, or with
WORLD_SIZE=1, it returns a stand-in for a single process: ``enabled`` is False,
and the trainer then runs no distributed code at all.

Under torchrun the trainer hands mixkl's step the student wrapped by
``wrap_ddp`` and a ``SyncedTeacher``; the step itself is the single-process one.
"""
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from cli import resolve_device
from mixkl import ConditionalEMA
from utils import InputError


class Distributed:
    """This process's place in the group (rank, world size, device) and its collectives.

    Every collective must be called by all ranks in the same order.
    """

    def __init__(self, rank=0, world_size=1, local_rank=0, device=None):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = device  # where the tensors of collectives live (cuda:LOCAL_RANK for NCCL)

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    @classmethod
    def from_env(cls, device_name=None):
        """Join torchrun's process group if this process was started by torchrun.

        ``device_name`` is --device: under torchrun it only chooses cuda or cpu,
        the GPU is always cuda:LOCAL_RANK.
        """
        world_size = int(os.environ.get('WORLD_SIZE', '1'))
        if world_size <= 1 or 'RANK' not in os.environ or 'LOCAL_RANK' not in os.environ:
            return cls()
        rank, local_rank = int(os.environ['RANK']), int(os.environ['LOCAL_RANK'])
        requested = resolve_device(device_name)
        if requested.type == 'cuda':
            if requested.index is not None:
                raise InputError(f'--device {device_name}: under torchrun each process uses '
                                 'cuda:LOCAL_RANK; pass --device cuda (or leave it out)')
            if local_rank >= torch.cuda.device_count():
                raise InputError(f'LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} '
                                 'GPUs are visible: use --nproc_per_node <= the number of GPUs')
            device = torch.device('cuda', local_rank)
            torch.cuda.set_device(device)
            dist.init_process_group('nccl', device_id=device)
        elif requested.type == 'cpu':
            device = torch.device('cpu')
            dist.init_process_group('gloo')
        else:
            raise InputError(f'--device {device_name}: torchrun runs use cuda (NCCL) or cpu (gloo)')
        return cls(rank, world_size, local_rank, device)

    def close(self):
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    # -- collectives; each returns its input unchanged for a single process --

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def all_sum(self, values):
        """Sum a 1-d tensor (or a list of ints) over the ranks; same type back."""
        if not self.enabled:
            return values
        if isinstance(values, torch.Tensor):
            summed = values.to(self.device)
            dist.all_reduce(summed)
            return summed.to(values.device)
        summed = torch.tensor(values, dtype=torch.int64, device=self.device)
        dist.all_reduce(summed)
        return summed.tolist()

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast_(self, tensors):
        """Overwrite ``tensors`` (on this process's device) with rank 0's, one message per dtype."""
        if not self.enabled:
            return
        for group in _by_dtype(tensors):
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.broadcast(flat, src=0)
            for t, part in zip(group, flat.split([t.numel() for t in group])):
                t.copy_(part.view_as(t))

    def identical(self, tensors):
        """True on every rank if ``tensors`` are bitwise equal to rank 0's on all ranks."""
        if not self.enabled:
            return True
        same = True
        for group in _by_dtype(tensors):
            mine = torch.cat([t.detach().reshape(-1) for t in group]).view(torch.uint8)
            theirs = mine.clone()
            dist.broadcast(theirs, src=0)
            same = same and torch.equal(mine, theirs)
        return self.all_sum([0 if same else 1])[0] == 0


def wrap_ddp(student, device):
    """PyTorch's DistributedDataParallel around the student: gradients averaged over the ranks.

    A MIX-KL step calls the wrapped student three times, then backward() once;
    the FGSM step in between asks autograd for the input gradient only, which
    runs no parameter hook, so the gradient all-reduce runs once, in backward().
    BN buffers are rank 0's at the start of every forward (DDP's default).
    """
    return DistributedDataParallel(student, device_ids=[device.index] if device.type == 'cuda'
                                   else None)


class SyncedTeacher(ConditionalEMA):
    """The MIX-KL teacher under torchrun, identical on every rank.

    It decides on the global batch (the ranks' counts summed), and it averages
    rank 0's BatchNorm running statistics: each rank's student updates its own
    from its share of the batch. ``student`` is the DDP-wrapped student.
    """

    def __init__(self, student, threshold, max_decay, dist_):
        super().__init__(student, threshold, max_decay)
        self.dist = dist_

    def maybe_update(self, student, clean_ok, adv_ok):
        clean_ok, adv_ok = self.dist.all_sum([int(clean_ok), int(adv_ok)])
        return super().maybe_update(student, clean_ok, adv_ok)

    def update(self, student):
        student = student.module
        self.dist.broadcast_(list(student.buffers()))
        super().update(student)


def _by_dtype(tensors):
    groups = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return list(groups.values())
