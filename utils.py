"""Data loading, attacks, evaluation and checkpoint loading, shared by training and evaluation.

Images are uint8 tensors of shape (N, 3, S, S) kept on the compute device (S is the
dataset's image_size: 32 for CIFAR, 64 for Tiny-ImageNet-200); batches handed to
models are float in [0, 1]. Every attack works in that space.
"""
import contextlib
import hashlib
import io
import os
import pickle
import socket

import numpy as np
import torch
import torch.nn.functional as F

from base import DATASETS, InputError, one_line
from cli import backend_switches_kept, set_backend_switches
# The file writers live in files.py (tinyimagenet.py imports them from there); the scripts
# import them from here, as before they moved.
from files import (atomic_save, atomic_write_array, atomic_write_bytes, atomic_write_text,
                   check_writable_dir, create_new_text_file, read_file, sha256_file)
from models import ARCHS, NORMALIZATION, build_model, detect_arch, num_classes_of, width_of

# ---------------------------------------------------------------------------
# Reading CIFAR without executing code from the data files

# The globals the official CIFAR pickles (Python 2) and copies written by Python 3's pickle,
# protocols 0 to 5, name. Each maps to a checked stand-in (a method name of _CifarUnpickler):
# the real callables would let a file of a few hundred bytes allocate gigabytes (a declared
# shape, a chain of codecs) or crash the interpreter (an object array, a forged dtype).
_CIFAR_PICKLE_GLOBALS = {
    ('numpy.core.multiarray', '_reconstruct'): '_reconstruct',    # ndarray, protocols 0-4
    ('numpy._core.multiarray', '_reconstruct'): '_reconstruct',
    ('numpy.core.numeric', '_frombuffer'): '_frombuffer',          # ndarray, protocol 5
    ('numpy._core.numeric', '_frombuffer'): '_frombuffer',
    ('numpy.core.multiarray', 'scalar'): '_scalar',                # a numpy integer
    ('numpy._core.multiarray', 'scalar'): '_scalar',
    ('numpy', 'ndarray'): '_ndarray',
    ('numpy', 'dtype'): '_dtype',
    ('_codecs', 'encode'): '_latin1_encode',  # bytes in protocols 0-2, written by Python 3
    ('__builtin__', 'bytes'): '_empty_bytes',  # b'' in protocols 0-2 (an empty array's data)
    ('builtins', 'bytes'): '_empty_bytes',
}
# Array element types a CIFAR file can hold: numbers and strings, never Python objects.
_ARRAY_KINDS = 'biufcSU'
_NDARRAY = object()  # what the pickle's numpy.ndarray stands for: only _reconstruct takes it


class _DtypeStandIn:
    """numpy.dtype as a CIFAR pickle builds it: a type code, then a byte order (its BUILD).

    Only those two are kept: the state's flags, sizes and fields never reach numpy,
    so a forged dtype cannot make numpy read raw bytes as object pointers.
    """

    def __init__(self, loader, spec, align=False, copy=False):
        if not isinstance(spec, str) or len(spec) > 16:
            raise InputError(f'{loader.path}: refused numpy dtype {one_line(repr(spec), 40)}')
        self.loader, self.spec, self.byteorder = loader, spec, '='

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ('<', '>', '=', '|'):
            self.byteorder = state[1]

    def resolve(self):
        """The numpy dtype, if it holds plain numbers or strings; else an InputError."""
        try:
            dtype = np.dtype(self.spec)
        except (TypeError, ValueError):
            dtype = None
        if dtype is None or dtype.kind not in _ARRAY_KINDS or dtype.fields is not None \
                or dtype.subdtype is not None:
            raise InputError(f'{self.loader.path}: refused an array of numpy dtype '
                             f'{one_line(repr(self.spec), 40)}; a CIFAR batch file holds '
                             'numeric arrays only')
        return dtype.newbyteorder(self.byteorder) if self.byteorder in '<>' else dtype


class _CheckedArray(np.ndarray):
    """An ndarray being unpickled: numpy sees its state (shape, dtype, data) only once checked."""

    def __setstate__(self, state):
        loader = self.__dict__.pop('_loader')  # so the array does not keep the unpickler alive
        super().__setstate__(loader.array_state(state))


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles what CIFAR files hold (dicts, lists, strings, numbers, numpy arrays), nothing else.

    The arrays declared in a file may not hold more bytes, all together, than the
    file has: a real array's data is in the file. Codec output is bounded the same way.
    """

    def __init__(self, file, path, size):
        super().__init__(file, encoding='latin1')
        self.path = path
        self.budget = {'array': size, 'bytes': size}

    def find_class(self, module, name):
        attribute = _CIFAR_PICKLE_GLOBALS.get((module, name))
        if attribute is None:
            raise InputError(f'{self.path}: refused to load {one_line(module, 80)}.'
                             f'{one_line(name, 80)}; a CIFAR batch file holds only dicts, '
                             'lists, strings, ints and numpy arrays')
        return getattr(self, attribute)

    _ndarray = _NDARRAY  # find_class hands out attributes: this one is a marker, not a class

    def _dtype(self, *args):
        return _DtypeStandIn(self, *args)

    def spend(self, kind, nbytes, what):
        """Count ``nbytes`` more of ``kind`` against the file's size, refusing more than it has."""
        if nbytes > self.budget[kind]:
            raise InputError(f'{self.path}: {what} ({nbytes} bytes) is larger than the file '
                             'could hold; refused before allocating it')
        self.budget[kind] -= nbytes

    def checked_size(self, shape, dtype):
        """``shape`` as a tuple, refused if an array of it and ``dtype`` cannot be in the file."""
        if isinstance(shape, int) and not isinstance(shape, bool):
            shape = (shape,)
        if not isinstance(shape, tuple) or len(shape) > 32 or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
            raise InputError(f'{self.path}: an array has a malformed shape '
                             f'{one_line(repr(shape), 60)}')
        count = 1
        for n in shape:
            count *= n
        self.spend('array', count * max(dtype.itemsize, 1),
                   f'an array of shape {shape} and dtype {dtype}')
        return shape

    def _reconstruct(self, subtype, shape, typecode):
        # numpy writes _reconstruct(ndarray, (0,), b'b'); the real shape comes with BUILD.
        if subtype is not _NDARRAY or typecode not in (b'b', 'b'):
            raise InputError(f'{self.path}: refused a numpy _reconstruct call that numpy '
                             'does not write')
        array = _CheckedArray(self.checked_size(shape, np.dtype(np.int8)), np.int8)
        array._loader = self
        return array

    def array_state(self, state):
        """An ndarray's pickled state, checked, with a dtype numpy makes from its type code."""
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise InputError(f'{self.path}: an array has a malformed state')
        version = state[:-4]
        shape, dtype, fortran, data = state[-4:]
        if not isinstance(dtype, _DtypeStandIn) or not isinstance(data, (bytes, bytearray, str)):
            raise InputError(f'{self.path}: an array holds something other than raw numbers')
        dtype = dtype.resolve()
        shape = self.checked_size(shape, dtype)
        return (*version, shape, dtype, bool(fortran), data)

    def _frombuffer(self, buffer, dtype, shape, order, axis_order=None):
        # numpy._core.numeric._frombuffer, for an array pickled with protocol 5
        if not isinstance(buffer, (bytes, bytearray)) or not isinstance(dtype, _DtypeStandIn) \
                or order not in ('C', 'F', 'K'):
            raise InputError(f'{self.path}: an array holds something other than raw numbers')
        dtype = dtype.resolve()
        shape = self.checked_size(shape, dtype)
        array = np.frombuffer(buffer, dtype=dtype)
        if order == 'K' and axis_order is not None:
            return array.reshape(shape, order='C').transpose(axis_order)
        return array.reshape(shape, order=order)

    def _scalar(self, dtype, data):
        # numpy._core.multiarray.scalar: one numpy number, e.g. in a list of labels
        if not isinstance(dtype, _DtypeStandIn) or not isinstance(data, (bytes, str)):
            raise InputError(f'{self.path}: a numpy number holds something other than raw bytes')
        dtype = dtype.resolve()
        self.checked_size((), dtype)
        data = data.encode('latin1') if isinstance(data, str) else data
        return np.frombuffer(data, dtype=dtype, count=1)[0]

    def _latin1_encode(self, text, encoding='utf-8'):
        # Python 3 writes bytes as _codecs.encode(text, 'latin1') for protocols 0-2; other
        # codecs (hex, base64) expand their input and chain, so they are refused.
        if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
            raise InputError(f'{self.path}: refused _codecs.encode with '
                             f'{one_line(repr(encoding), 40)}; only latin1 text is bytes in a '
                             'CIFAR batch file')
        self.spend('bytes', len(text), 'a byte string')
        return text.encode('latin1')

    def _empty_bytes(self, *args):
        if args:  # bytes(n) would allocate n bytes
            raise InputError(f'{self.path}: refused bytes() with arguments')
        return b''


def _plain(value):
    """An unpickled array as a plain ndarray (the checks are done); anything else unchanged."""
    return value.view(np.ndarray) if isinstance(value, _CheckedArray) else value


def read_cifar_pickle(raw, path):
    """Unpickle one CIFAR batch file's bytes, allowing only what the format contains."""
    try:
        batch = _CifarUnpickler(io.BytesIO(raw), path, len(raw)).load()
    except InputError:
        raise
    except Exception as e:  # truncated or garbled files raise many different errors
        raise InputError(f'{path}: not a readable CIFAR batch file '
                         f'({type(e).__name__}: {one_line(e, 200)})')
    return {k: _plain(v) for k, v in batch.items()} if isinstance(batch, dict) else batch


def _official_md5s(dataset):
    from torchvision import datasets as tv_datasets
    cls = tv_datasets.CIFAR10 if dataset == 'cifar10' else tv_datasets.CIFAR100
    return dict(cls.train_list + cls.test_list)


# Seconds a download may wait for the server at each step (connecting, each read): a network
# that accepts the connection and never answers would otherwise hang the run forever.
DOWNLOAD_TIMEOUT_S = 60


@contextlib.contextmanager
def _socket_timeout(seconds):
    """Sockets made inside time out after ``seconds`` (torchvision's urlopen takes no timeout)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _download(dataset, data_dir):
    """Download the official release into ``data_dir`` through torchvision, or say how to."""
    spec = DATASETS[dataset]
    try:
        from torchvision import datasets as tv_datasets
        cls = tv_datasets.CIFAR10 if dataset == 'cifar10' else tv_datasets.CIFAR100
        print(f'{spec["name"]} not found in {data_dir}: downloading it there')
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            cls(root=data_dir, train=True, download=True)
    except Exception as e:
        reason = f'{type(e).__name__}: {one_line(e, 200)}'
        if isinstance(e, TimeoutError) or 'timed out' in reason:
            reason = f'no answer from the server within {DOWNLOAD_TIMEOUT_S} s; {reason}'
        raise InputError(
            f'{spec["name"]} is not in {os.path.join(data_dir, spec["folder"])} and could not be '
            f'downloaded ({reason}). Download {spec["url"]} and extract it into '
            f'{data_dir}, so that {os.path.join(data_dir, spec["folder"])}/ holds '
            f'{", ".join(spec["train_files"] + spec["test_files"])}')


def _check_batch(batch, path, label_key, num_classes):
    """The (data, labels) of one unpickled batch file, checked against the CIFAR layout."""
    if not isinstance(batch, dict):
        raise InputError(f'{path}: expected a dict, found {type(batch).__name__}')
    batch = {k.decode('latin1') if isinstance(k, bytes) else k: v for k, v in batch.items()}
    for key in ('data', label_key):
        if key not in batch:
            found = one_line(', '.join(map(str, batch)), 120)
            raise InputError(f'{path}: no "{key}" entry (found: {found})')
    data = batch['data']
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072:
        desc = f'{data.dtype} array of shape {data.shape}' if isinstance(data, np.ndarray) \
            else type(data).__name__
        raise InputError(f'{path}: "data" must be a uint8 array of shape (N, 3072), found {desc}')
    labels = _check_labels(batch[label_key], path, label_key, num_classes)
    if len(labels) != len(data):
        raise InputError(f'{path}: {len(data)} images but {len(labels)} labels')
    return data, labels


def _check_labels(labels, path, label_key, num_classes):
    """Labels as an int64 array, if they are integers in 0..num_classes-1.

    Only integers: np.asarray(..., int64) would truncate 3.7 to 3 and read '3'
    as 3, and a bool is no class either. Checked before converting, so a huge
    integer is reported, not an OverflowError.
    """
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1 or labels.dtype.kind not in 'iu':
            raise InputError(f'{path}: "{label_key}" must be a list or 1-d array of integers, '
                             f'found a {labels.dtype} array of shape {labels.shape}')
    elif isinstance(labels, (list, tuple)):
        for value in labels:
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise InputError(f'{path}: "{label_key}" must hold integers, found '
                                 f'{type(value).__name__} {one_line(repr(value), 40)}')
    else:
        raise InputError(f'{path}: "{label_key}" must be a list of integers, found '
                         f'{type(labels).__name__}')
    bad = _first_out_of_range(labels, num_classes)
    if bad is not None:
        raise InputError(f'{path}: label {bad} is outside 0..{num_classes - 1}')
    return np.asarray(labels, dtype=np.int64).reshape(-1)


def _first_out_of_range(labels, num_classes):
    """The first label outside 0..num_classes-1, as text; None if there is none."""
    if isinstance(labels, np.ndarray):
        bad = labels[(labels < 0) | (labels >= num_classes)][:1].tolist()
    else:
        bad = [v for v in labels if not 0 <= v < num_classes][:1]
    if not bad:
        return None
    value = int(bad[0])
    # str() refuses integers of more than 4300 digits, and the line should stay short
    return str(value) if value.bit_length() <= 128 else f'of {value.bit_length()} bits'


def load_cifar(dataset, data_dir, train, download=True, quiet=False):
    """Return (images uint8 (N,3,32,32), labels int64 (N,)) of a CIFAR split.

    Reads the standard python-pickle layout under ``data_dir``; downloads the
    official release there through torchvision when the folder is absent.
    An empty split is refused: training or evaluating on it would only fail later.
    """
    spec = DATASETS[dataset]
    folder = os.path.join(data_dir, spec['folder'])
    if not os.path.isdir(folder):
        if not download:
            raise InputError(f'{spec["name"]} is not in {folder}; download {spec["url"]} and '
                             f'extract it into {data_dir}')
        _download(dataset, data_dir)
    files = spec['train_files'] if train else spec['test_files']
    images, labels, md5s = [], [], {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise InputError(f'{path} is missing; {folder}/ should hold '
                             f'{", ".join(spec["train_files"] + spec["test_files"])}')
        raw = read_file(path)
        md5s[name] = hashlib.md5(raw).hexdigest()
        data, y = _check_batch(read_cifar_pickle(raw, path), path, spec['label_key'],
                               spec['num_classes'])
        images.append(data)
        labels.append(y)
    images = np.concatenate(images).reshape(-1, 3, 32, 32)
    labels = np.concatenate(labels)
    if not len(labels):
        split = 'training' if train else 'test'
        if len(files) == 1:
            raise InputError(f'{path}: the {spec["name"]} {split} split has no images')
        raise InputError(f'{folder}: the {spec["name"]} {split} split has no images in '
                         f'{", ".join(files)}')
    official = _official_md5s(dataset)
    if any(official.get(name) != md5 for name, md5 in md5s.items()):
        if not quiet:
            print(f'note: {folder} is not the official {spec["name"]} release '
                  f'({len(labels)} {"train" if train else "test"} images)')
    return torch.from_numpy(images), torch.from_numpy(labels)


# ---------------------------------------------------------------------------
# Batches on the device

def crop_flip(images, dy, dx, flip, pad=4):
    """Crop each image at offset (dy, dx) of its zero-padded copy, then mirror where flip.

    ``images`` is (B, C, H, W); offsets range over 0..2*pad. Batched gather: no
    per-image Python.
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device).expand(b, w)
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - cols, cols)
    batch = torch.arange(b, device=images.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


class CifarLoader:
    """Batches of a CIFAR split that lives on ``device`` as uint8.

    With ``train=True`` every epoch has its own order, crop offsets and flips
    (``augment=False``: the order alone), drawn from a generator seeded by
    (seed, epoch): an epoch can be replayed from any step, which is what
    resuming needs. The last, smaller batch is kept. Under ``world_size > 1``
    each rank takes its share of every global batch.
    """

    def __init__(self, images, labels, batch_size, device, train, seed=0, rank=0, world_size=1,
                 augment=True):
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size, self.device, self.train, self.seed = batch_size, device, train, seed
        self.rank, self.world_size, self.augment = rank, world_size, augment

    def __len__(self):
        return -(-len(self.labels) // self.batch_size)

    def epoch_plan(self, epoch):
        n = len(self.labels)
        if not self.train:
            return torch.arange(n), None
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        order = torch.randperm(n, generator=g)
        if not self.augment:
            return order, None
        offsets = torch.randint(0, 9, (2, n), generator=g)
        flips = torch.randint(0, 2, (n,), generator=g).bool()
        return order, (offsets, flips)

    def batches(self, epoch=0, start_step=0):
        """Yield (images float in [0, 1], labels) from ``start_step`` to the end of the epoch."""
        order, augment = self.epoch_plan(epoch)
        order = order.to(self.device)
        if augment is not None:
            offsets, flips = augment[0].to(self.device), augment[1].to(self.device)
        for step in range(start_step, len(self)):
            span = slice(step * self.batch_size, (step + 1) * self.batch_size)
            share = slice(self.rank, None, self.world_size)
            idx = order[span][share]
            x = self.images[idx]
            if augment is not None:
                x = crop_flip(x, offsets[0, span][share], offsets[1, span][share],
                              flips[span][share])
            yield x.float().div_(255), self.labels[idx]


# ---------------------------------------------------------------------------
# Attacks (L-inf, inputs in [0, 1])

class NonFiniteLogits(InputError):
    """A model gave NaN or inf logits: no prediction, loss or accuracy can be read from them.

    argmax would pick an arbitrary class and count it right or wrong; an attack
    would step along NaN gradients. An InputError: it is the model's fault.
    """


def clamp(x, lower, upper):
    return torch.max(torch.min(x, upper), lower)


def margin_loss(logits, y):
    """Per-example C&W margin loss -(z_y - max_{j != y} z_j)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float('-inf')).amax(1)
    return others - true


ATTACK_LOSSES = {
    'ce': lambda logits, y: F.cross_entropy(logits, y, reduction='none'),
    'cw': margin_loss,
}


def attack_pgd(model, X, y, epsilon, alpha, attack_iters, restarts, loss='ce'):
    """L-inf PGD from a uniform random start, as in the fast adversarial training code.

    Each iteration steps only the examples the model still classifies
    correctly (the others are already broken and stay frozen), and forwards
    only those: the result is the same as stepping a masked full batch. Across
    restarts an example keeps a perturbation that misclassifies it if any
    restart found one, else the one with the highest loss. Returns delta.
    The model should be in eval mode: then examples do not interact.
    """
    loss_fn = ATTACK_LOSSES[loss]
    lower, upper = -X, 1 - X
    best_delta = torch.zeros_like(X)
    best_fooled = torch.zeros(len(X), dtype=torch.bool, device=X.device)
    best_loss = torch.full((len(X),), float('-inf'), device=X.device)
    for _ in range(restarts):
        delta = clamp(torch.empty_like(X).uniform_(-epsilon, epsilon), lower, upper)
        active = torch.arange(len(X), device=X.device)
        for _ in range(attack_iters):
            d = delta[active].requires_grad_(True)
            logits = model(X[active] + d)
            correct = logits.argmax(1) == y[active]
            any_correct, finite = torch.stack([correct.any(),
                                               torch.isfinite(logits).all()]).tolist()
            if not finite:  # checked with the stop test: one host sync, as before
                raise NonFiniteLogits('the model gives NaN or inf logits on examples under '
                                      'attack; no accuracy is computed from them')
            if not any_correct:
                break
            grad, = torch.autograd.grad(loss_fn(logits, y[active]).sum(), d)
            active = active[correct]
            stepped = (d.detach() + alpha * grad.sign())[correct].clamp(-epsilon, epsilon)
            delta[active] = clamp(stepped, lower[active], upper[active])
        with torch.no_grad():
            logits = model(X + delta)
            if not torch.isfinite(logits).all():
                raise NonFiniteLogits('the model gives NaN or inf logits on attacked examples; '
                                      'no accuracy is computed from them')
            fooled = logits.argmax(1) != y
            final_loss = loss_fn(logits, y)
        better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (final_loss > best_loss))
        best_delta[better] = delta[better]
        best_fooled |= fooled
        best_loss = torch.where(better, final_loss, best_loss)
    return best_delta


def attack_fgsm(model, X, y, epsilon):
    """One signed-gradient step of size epsilon from X itself (no random start)."""
    delta = torch.zeros_like(X, requires_grad=True)
    grad, = torch.autograd.grad(F.cross_entropy(model(X + delta), y), delta)
    return clamp(epsilon * grad.sign(), -X, 1 - X)


# ---------------------------------------------------------------------------
# Evaluation

@contextlib.contextmanager
def attack_backend():
    """Inside: the backend settings attacks run under; outside, the settings as they were.

    TF32 off in matmuls and cuDNN convolutions: attacks run in full fp32 (TF32
    keeps 10 mantissa bits, and the checks read gradients as exact as fp32 has
    them). cuDNN autotuning off: attack_pgd forwards only the examples it has not
    broken yet, so nearly every PGD step has a new batch size, and with
    autotuning on cuDNN would time every convolution anew for each one.
    """
    with backend_switches_kept():
        set_backend_switches((False, False, False))
        yield


def evaluate_batches(model, batches, attack=None):
    """Accuracy counts of ``model`` (put in eval mode) on (X, y) batches.

    ``attack`` maps (model, X, y) to a perturbation; None measures clean
    accuracy. Returns (correct, total) as ints.
    """
    model.eval()
    correct = total = 0
    for X, y in batches:
        if attack is not None:
            X = X + attack(model, X, y)
        with torch.no_grad():
            logits = model(X)
            right, not_finite = torch.stack([(logits.argmax(1) == y).sum(),
                                             (~torch.isfinite(logits)).any(1).sum()]).tolist()
        if not_finite:
            raise NonFiniteLogits(f'{not_finite} of {len(y)} '
                                  f'{"attacked " if attack is not None else ""}examples get NaN '
                                  'or inf logits; no accuracy is computed from them')
        correct += right
        total += len(y)
    return correct, total


def robust_mask(model, batches, attack=None):
    """Per example, in batch order: is it classified correctly (after ``attack``)?

    ``evaluate_batches`` one example at a time, as a bool tensor: checks.py compares
    attacks example by example (an example PGD-50 leaves that PGD-10 broke).
    """
    model.eval()
    masks = []
    for X, y in batches:
        if attack is not None:
            X = X + attack(model, X, y)
        with torch.no_grad():
            masks.append(model(X).argmax(1) == y)
    return torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)


def evaluate_robustness(model, batches, epsilon, alpha, attack_iters, dist=None, seed=None):
    """Clean and PGD accuracy (one restart) of ``model`` on the same batches.

    With ``dist`` (torchrun, world size N) rank r evaluates batches r, r + N, ...
    and the counts are summed over the ranks. With ``seed`` each batch's random
    starts come from a generator seeded by (seed, batch index), leaving the
    global RNG as it was: the result then does not depend on the number of
    processes. Without either, this is the single-process evaluation.
    """
    rank, world_size = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    clean = robust = total = 0
    for i, (X, y) in enumerate(batches):
        if i % world_size != rank:
            continue
        with batch_rng(seed, i, X.device):
            c, n = evaluate_batches(model, [(X, y)])
            r, _ = evaluate_batches(model, [(X, y)], pgd_attack(epsilon, alpha, attack_iters, 1))
        clean, robust, total = clean + c, robust + r, total + n
    if dist is not None:
        clean, robust, total = dist.all_sum([clean, robust, total])
    return clean / total, robust / total


def batch_rng(seed, index, device):
    """Global RNGs seeded by (seed, index) inside, restored on exit; nothing when seed is None."""
    if seed is None:
        return contextlib.nullcontext()
    return _seeded_rng(hash((seed, index)) & 0x7fffffffffffffff, device)


@contextlib.contextmanager
def _seeded_rng(seed, device):
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        torch.manual_seed(seed)
        yield


def pgd_attack(epsilon, alpha, attack_iters, restarts, loss='ce'):
    """``attack_pgd`` with its settings bound, for ``evaluate_batches``."""
    return lambda model, X, y: attack_pgd(model, X, y, epsilon, alpha, attack_iters,
                                          restarts, loss)


# ---------------------------------------------------------------------------
# Checkpoints: read without executing code, checked before a model is built

def safe_torch_load(path, map_location='cpu'):
    """torch.load with weights_only=True, reporting unreadable files as InputError."""
    if not os.path.isfile(path):
        raise InputError(f'{path}: no such file')
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise InputError(f'{path}: not a loadable PyTorch weights file '
                         f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})')


# A float parameter or buffer (BN statistics too) beyond this in absolute value counts as
# diverged, in training (after every step) and in a checkpoint given for evaluation.
# Trained CIFAR networks stay many orders of magnitude below it; a run whose
# weights grow past it (too large a learning rate) is not going to come back.
WEIGHT_LIMIT = 1e8
PREFIXES = ('module.', '_orig_mod.')  # DDP's and torch.compile's key prefixes
# The dtypes a saved model's tensors may have: real floating point weights and statistics
# (in any common precision: load_state_dict casts them) and integer counters.
FLOAT_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64}
INTEGER_DTYPES = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}


def strip_prefixes(state_dict, path='the state_dict'):
    """Drop the 'module.' (DDP) and '_orig_mod.' (torch.compile) key prefixes.

    Two keys that become one (``module.x`` and ``x``) are refused: which of the two
    tensors is the model's cannot be told, and keeping either would be a guess.
    """
    out, original = {}, {}
    for key, value in state_dict.items():
        stripped = key
        while stripped.startswith(PREFIXES):
            stripped = stripped[len(next(p for p in PREFIXES if stripped.startswith(p))):]
        if stripped in out:
            raise InputError(f'{path}: the keys {one_line(repr(original[stripped]), 80)} and '
                             f'{one_line(repr(key), 80)} both name '
                             f'{one_line(repr(stripped), 80)} once the module./_orig_mod. '
                             'prefixes are dropped; which one is the model is ambiguous')
        out[stripped], original[stripped] = value, key
    return out


def _refuse(path, keys, what):
    if keys:
        raise InputError(f'{path}: {len(keys)} tensor(s) {what} '
                         f'({one_line(", ".join(keys), 120)}); these weights are unusable')


def check_tensor_kinds(path, state):
    """Refuse tensors no saved model holds, before any is used.

    A model's state_dict holds dense (strided) tensors on a real device, of
    FLOAT_DTYPES (weights, statistics) or INTEGER_DTYPES (counters). Sparse,
    quantized and meta tensors and any other dtype (complex, bool, float8, ...)
    are refused: load_state_dict would cast or drop what they hold. So are
    tensors whose shape the file does not back with data (an expanded view
    stores one element for a shape of any size), before a model of that size is built.
    """
    _refuse(path, [k for k, v in state.items()
                   if v.layout != torch.strided or v.is_quantized or v.is_meta],
            'are sparse, quantized or meta tensors')
    _refuse(path, [f'{k} ({str(v.dtype).replace("torch.", "")})' for k, v in state.items()
                   if v.dtype not in FLOAT_DTYPES | INTEGER_DTYPES],
            'are not real floating point or integer tensors')
    hollow = [k for k, v in state.items()
              if v.untyped_storage().nbytes() < v.numel() * v.element_size()]
    if hollow:
        raise InputError(f'{path}: {one_line(", ".join(hollow), 120)} hold(s) less data than '
                         'their shape; not a saved model')


def check_weight_values(path, state):
    """Refuse weights that training would have stopped at (utils.WEIGHT_LIMIT), and more.

    NaN or inf, or beyond WEIGHT_LIMIT in absolute value, as training checks its
    own weights after every step; and a negative BatchNorm running variance,
    which no training writes (BatchNorm would take the square root of it).
    """
    floats = {k: v for k, v in state.items() if v.dtype in FLOAT_DTYPES}
    _refuse(path, [k for k, v in floats.items() if not torch.isfinite(v).all()],
            'hold NaN or inf')
    _refuse(path, [k for k, v in floats.items() if not (v.abs() <= WEIGHT_LIMIT).all()],
            f'hold values beyond {WEIGHT_LIMIT:g} in absolute value, where training stops a '
            'run as diverged')
    _refuse(path, [k for k, v in floats.items()
                   if k.endswith('running_var') and not (v >= 0).all()],
            'are BatchNorm running variances with negative values')


def check_kinds_fit(path, state, model):
    """Each tensor of ``state`` is of the kind (floating point or integer) ``model`` holds there."""
    expected = model.state_dict()
    _refuse(path, [k for k, v in state.items()
                   if k in expected
                   and (v.dtype in FLOAT_DTYPES) != expected[k].is_floating_point()],
            'are integers where the model has floating point values, or the reverse')


def load_model_weights(path, dataset, arch=None, width=None, script=''):
    """Build the network a checkpoint's state_dict holds, checking it fits ``dataset``.

    The architecture is read from the state_dict's keys (``arch`` overrides it),
    the width and the number of classes from its shapes (``width``, if given,
    must match). Raises InputError, naming the problem, for anything that is
    not a matching state_dict of dense real tensors with unambiguous keys, and
    for weights training would have refused (NaN, inf, beyond WEIGHT_LIMIT, a
    negative BatchNorm variance): their model would be evaluated as if it were
    a result.
    """
    state = safe_torch_load(path)
    if isinstance(state, dict) and 'teacher' in state and 'student' in state:
        raise InputError(f'{path} is a resumable training checkpoint; evaluate best_model.pth '
                         'or final_model.pth from the same run directory')
    if not isinstance(state, dict) or not state or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise InputError(f'{path} does not hold a state_dict (a dict of tensors)')
    state = strip_prefixes(state, path)
    check_tensor_kinds(path, state)
    arch = arch or detect_arch(state)
    if arch is None:
        raise InputError(f'{path} is not a checkpoint of {", ".join(ARCHS)} (its keys are '
                         f'none of theirs); --arch names the architecture')
    spec, head, width_key = DATASETS[dataset], f'{ARCHS[arch].head}.weight', ARCHS[arch].width_key
    if head not in state or width_key not in state or state[head].dim() != 2 or \
            state[width_key].dim() != 4:
        raise InputError(f'{path} is not a {arch} checkpoint (no {head} and {width_key} of '
                         'the right kind)')
    found_classes, found_width = num_classes_of(arch, state), width_of(arch, state)
    if found_classes != spec['num_classes']:
        raise InputError(f'{path} is a {found_classes}-class model; {script} evaluates '
                         f'{spec["num_classes"]}-class models')
    if width is not None and width != found_width:
        raise InputError(f'{path} has width {found_width}, not --width {width}')
    check_weight_values(path, state)
    try:
        # Shapes and kinds first, on the meta device (no memory), then the model for real.
        with torch.device('meta'):
            shapes = build_model(arch, found_classes, found_width, spec['image_size'])
        check_kinds_fit(path, state, shapes)
        shapes.load_state_dict(state, assign=True)
        model = build_model(arch, found_classes, found_width, spec['image_size'],
                            NORMALIZATION.get(dataset))
        model.load_state_dict(state)
    except RuntimeError as e:
        raise InputError(f'{path} does not fit {arch} of width {found_width} for '
                         f'{spec["image_size"]}x{spec["image_size"]} images: '
                         + ' '.join(str(e).split())[:300])
    model.arch = arch
    return model
