"""Tiny-ImageNet-200 from its official folder layout, decoded once into a uint8 cache.

The release is 110,000 small JPEG files; decoding them takes far longer than
reading 1.2 GB of raw pixels, so each split is decoded once into
``.mixkl-cache-{train,val}.npy`` (with a ``.json`` sidecar holding its key) in the
dataset folder. The key covers every file's path, size, mtime, ctime and inode, the
class order and the validation annotations: any change to the folder rebuilds the
cache. The cache is written atomically (files.py); a run killed while writing it
leaves a temporary that the next run removes.

Layout read (as extracted from tiny-imagenet-200.zip)::

    tiny-imagenet-200/wnids.txt                        the class ids (optional here)
    tiny-imagenet-200/train/<wnid>/images/*.JPEG       training images of class <wnid>
    tiny-imagenet-200/val/images/*.JPEG                validation images
    tiny-imagenet-200/val/val_annotations.txt          file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1

Labels are indices into the sorted wnids, as the authors' code assigns them;
``train=False`` gives the validation split, since the test split has no labels.
"""
import errno
import hashlib
import json
import os
import warnings

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from base import DATASETS, InputError, one_line
from files import atomic_write_array, atomic_write_text, read_file, remove_stale_temporaries

SPEC = DATASETS['tinyimagenet']
NAME = SPEC['name']
SIZE = SPEC['image_size']
MAX_CLASSES = SPEC['num_classes']
IMAGE_SUFFIXES = ('.jpeg', '.jpg')
# Bump when what the cache holds or how it is keyed changes: older caches are then rebuilt.
CACHE_FORMAT = 2
# Errors of a folder where no file can be made (read-only, not ours): the cache is then
# skipped with a note. Any other failed write (a full disk, ulimit -f) is an error.
CANNOT_CREATE = {errno.EACCES, errno.EPERM, errno.EROFS}
CACHE_PREFIX = '.mixkl-cache-'


def load_tiny_imagenet(data_dir, train, quiet=False):
    """Return (images uint8 (N, 3, 64, 64), labels int64 (N,)) of the train or val split.

    Every problem with the data is a one-line InputError naming the file. ``quiet``
    silences the notes and the progress bar (the non-main ranks of a distributed run).
    """
    root = dataset_root(data_dir)
    remove_killed_writes(root, quiet)
    wnids = read_classes(root)
    if train:
        split, (files, labels), annotations = 'train', list_train(root, wnids), b''
    else:
        split, (files, labels) = 'val', list_val(root, wnids)
        annotations = read_file(annotations_path(root))
    key = cache_key(root, split, files, wnids, annotations)
    images = cached_images(root, split, key, len(files), quiet)
    if images is None:
        images = decode_all(root, files, split, quiet)
        write_cache(root, split, key, images, quiet)
    return torch.from_numpy(images), torch.from_numpy(np.asarray(labels, dtype=np.int64))


# ---------------------------------------------------------------------------
# The folder: where it is, its classes, its files

def dataset_root(data_dir):
    """``data_dir`` if it holds train/ and val/, else data_dir/tiny-imagenet-200.

    Nothing is downloaded: the archive is large and its server slow, so the user
    fetches it once and points --data_dir at it.
    """
    if all(os.path.isdir(os.path.join(data_dir, d)) for d in ('train', 'val')):
        return data_dir
    root = os.path.join(data_dir, SPEC['folder'])
    if not all(os.path.isdir(os.path.join(root, d)) for d in ('train', 'val')):
        raise InputError(f'{NAME} is not in {root} (no train/ and val/ folders there); download '
                         f'{SPEC["url"]} and extract it into {data_dir}')
    return root


def read_classes(root):
    """The class wnids, sorted: from wnids.txt when present, else the folders in train/.

    Sorted because the labels are indices in sorted wnid order, which is not the
    order of the official wnids.txt. Each class needs its train/<wnid>/images folder.
    """
    listing = os.path.join(root, 'wnids.txt')
    if os.path.exists(listing):
        wnids = _wnids_from_file(listing)
    else:
        train = os.path.join(root, 'train')
        wnids = sorted(d.name for d in os.scandir(train)
                       if d.is_dir() and not d.name.startswith('.'))
        if not wnids:
            raise InputError(f'{train}: no class folders (and no {listing})')
        listing = f'the folders in {train}'
    if len(wnids) > MAX_CLASSES:
        raise InputError(f'{listing}: {len(wnids)} classes; {NAME} has at most {MAX_CLASSES}')
    for wnid in wnids:
        folder = os.path.join(root, 'train', wnid, 'images')
        if not os.path.isdir(folder):
            raise InputError(f'missing class folder {folder} (class {wnid} of {listing})')
    return sorted(wnids)


def _wnids_from_file(path):
    """The wnids listed one per line in ``path``, each checked to be a plain folder name."""
    text = _text(path)
    wnids = [line.strip() for line in text.splitlines() if line.strip()]
    if not wnids:
        raise InputError(f'{path}: lists no classes')
    for wnid in wnids:
        if wnid.startswith('.') or any(c in wnid for c in '/\\\t '):
            raise InputError(f'{path}: {one_line(repr(wnid), 60)} is not a class folder name')
    seen = set()
    for wnid in wnids:
        if wnid in seen:
            raise InputError(f'{path}: {one_line(wnid, 60)} is listed more than once')
        seen.add(wnid)
    return wnids


def _text(path):
    """The UTF-8 text of ``path``, or a one-line InputError naming it."""
    try:
        return read_file(path).decode('utf-8-sig')  # a byte-order mark, if any, is not text
    except UnicodeDecodeError as e:
        raise InputError(f'{path}: not UTF-8 text ({one_line(e, 120)})')


def _image_names(folder):
    """The image file names in ``folder``, sorted (hidden files such as ._x.JPEG left out)."""
    try:
        return sorted(e.name for e in os.scandir(folder)
                      if e.is_file() and not e.name.startswith('.')
                      and e.name.lower().endswith(IMAGE_SUFFIXES))
    except OSError as e:
        raise InputError(f'{folder}: cannot be listed ({e.strerror or e})')


def list_train(root, wnids):
    """(relative paths, labels) of the training images, sorted by class then file name."""
    files, labels = [], []
    for label, wnid in enumerate(wnids):
        folder = f'train/{wnid}/images'
        names = _image_names(os.path.join(root, folder))
        if not names:  # a partial extraction: the class would silently never be trained
            raise InputError(f'{os.path.join(root, folder)}: no images of class {wnid} '
                             f'(*.JPEG files)')
        files += [f'{folder}/{name}' for name in names]
        labels += [label] * len(names)
    return files, labels


def annotations_path(root):
    return os.path.join(root, 'val', 'val_annotations.txt')


def list_val(root, wnids):
    """(relative paths, labels) of the validation images, sorted by file name.

    Each label comes from the image's line in val_annotations.txt; an image without
    one, or a line naming a missing image or an unknown class, is refused: either
    means a partial or mixed-up extraction, which would skew every accuracy.
    """
    folder = os.path.join(root, 'val', 'images')
    if not os.path.isdir(folder):
        raise InputError(f'{folder}: missing; the {NAME} validation images belong there')
    names = _image_names(folder)
    if not names:
        raise InputError(f'{folder}: the {NAME} validation split has no images')
    wnid_of = read_annotations(annotations_path(root), wnids)
    unlabelled = [name for name in names if name not in wnid_of]
    if unlabelled:
        raise InputError(f'{os.path.join(folder, unlabelled[0])}: no line in '
                         f'{annotations_path(root)} gives its class')
    absent = sorted(set(wnid_of) - set(names))
    if absent:
        raise InputError(f'{annotations_path(root)}: names {one_line(absent[0], 80)}, which is '
                         f'not in {folder}')
    index = {wnid: i for i, wnid in enumerate(wnids)}
    return [f'val/images/{name}' for name in names], [index[wnid_of[name]] for name in names]


def read_annotations(path, wnids):
    """{file name: wnid} from val_annotations.txt, every line checked."""
    if not os.path.isfile(path):
        raise InputError(f'{path}: missing; the {NAME} validation labels are read from it')
    known, wnid_of = set(wnids), {}
    for number, line in enumerate(_text(path).splitlines(), 1):
        if not line.strip():
            continue
        fields = line.rstrip('\r').split('\t')
        if len(fields) != 6 or not fields[0].strip() \
                or not all(f.strip().lstrip('-').isdigit() for f in fields[2:]):
            raise InputError(f'{path}: line {number} is not file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1'
                             f'<TAB>y1: {one_line(repr(line), 80)}')
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in known:
            raise InputError(f'{path}: line {number} names class {one_line(wnid, 40)}, which is '
                             f'not one of the {len(wnids)} classes')
        if name in wnid_of:
            raise InputError(f'{path}: line {number} annotates {one_line(name, 80)} a second time')
        wnid_of[name] = wnid
    return wnid_of


# ---------------------------------------------------------------------------
# Decoding

def decode_all(root, files, split, quiet):
    """The images at ``files`` (relative to ``root``) as one uint8 array (N, 3, 64, 64)."""
    images = np.empty((len(files), 3, SIZE, SIZE), dtype=np.uint8)
    if not quiet:
        print(f'note: decoding the {NAME} {split} split ({len(files)} images) once; later runs '
              f'read {cache_paths(root, split)[0]}')
    with warnings.catch_warnings():
        # Sizes are checked before decoding: PIL's own decompression-bomb warning adds nothing.
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)
        for i, rel in enumerate(tqdm(files, desc=f'Decoding {NAME} {split}', unit='img',
                                     disable=quiet, leave=False)):
            images[i] = _decode_image(os.path.join(root, rel))
    return images


def _decode_image(path):
    """One JPEG as uint8 (3, 64, 64), RGB whatever its mode (the release has grayscale ones).

    The declared size is checked on the header, before any pixel is decoded: a
    file claiming 60000x60000 pixels never gets its gigabytes allocated.
    """
    try:
        with Image.open(path, formats=['JPEG']) as image:
            if image.size != (SIZE, SIZE):
                raise InputError(f'{path}: the image is {image.size[0]}x{image.size[1]}; {NAME} '
                                 f'images are {SIZE}x{SIZE} (refused before decoding)')
            pixels = np.asarray(image.convert('RGB'))
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f'{path}: not a {SIZE}x{SIZE} image ({one_line(e, 120)}); refused '
                         'before decoding')
    except Exception as e:  # unreadable, truncated or not a JPEG: PIL raises many kinds
        raise InputError(f'{path}: not a readable JPEG image ({type(e).__name__}: '
                         f'{one_line(e, 160)})')
    return pixels.transpose(2, 0, 1)


# ---------------------------------------------------------------------------
# The cache: .mixkl-cache-<split>.npy (raw uint8) and .mixkl-cache-<split>.json (its key)

def cache_paths(root, split):
    """(array file, sidecar) of a split's cache, in the dataset folder."""
    return (os.path.join(root, f'{CACHE_PREFIX}{split}.npy'),
            os.path.join(root, f'{CACHE_PREFIX}{split}.json'))


def cache_key(root, split, files, wnids, annotations):
    """SHA-256 naming exactly what a split's images and labels are made from.

    Path, size, mtime, ctime and inode of each image (not its bytes: hashing 110,000
    files would cost as much as decoding them), the class order and the annotations'
    bytes. The mtime can be set back (os.utime, cp -p, tar); the ctime cannot and
    changes with every write to the file, and a file replaced by another (rename,
    copy) has another inode. All come from the one stat call the key already made.
    """
    digest = hashlib.sha256(f'mixkl tiny-imagenet cache {CACHE_FORMAT} {split} {SIZE}\n'.encode())
    digest.update(('\n'.join(wnids) + '\n\n').encode())
    for rel in files:
        try:
            stat = os.stat(os.path.join(root, rel))
        except OSError as e:
            raise InputError(f'{os.path.join(root, rel)}: cannot be read ({e.strerror or e})')
        digest.update(f'{rel}\t{stat.st_size}\t{stat.st_mtime_ns}\t{stat.st_ctime_ns}\t'
                      f'{stat.st_ino}\n'.encode())
    digest.update(b'\n' + annotations)
    return digest.hexdigest()


def cached_images(root, split, key, n, quiet):
    """The cached images if the cache matches ``key`` and holds n uint8 images; else None.

    Nothing read here can run code or allocate more than n images: the sidecar is
    JSON, and the array's header is checked (dtype, shape, file size) before its
    bytes are read. A damaged cache is reported in a note and rebuilt, never fatal.
    """
    array_path, sidecar_path = cache_paths(root, split)
    if not os.path.exists(sidecar_path):
        return None
    try:
        images = _read_cache(array_path, sidecar_path, key, n)
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: a deeply nested sidecar
        if not quiet:
            print(f'note: {array_path} is damaged ({one_line(e, 160)}); decoding again')
        return None
    if images is None and not quiet:
        print(f'note: {root} changed since {array_path} was written; decoding again')
    return images


def _read_cache(array_path, sidecar_path, key, n):
    """The cache's images; None if it was made from other files; ValueError if damaged."""
    with open(sidecar_path, 'rb') as f:
        sidecar = json.loads(f.read(1 << 16).decode('utf-8'))
    if not isinstance(sidecar, dict) or not isinstance(sidecar.get('array'), dict):
        raise ValueError(f'{sidecar_path} is not a cache sidecar')
    if sidecar.get('key') != key:
        return None
    shape = (n, 3, SIZE, SIZE)
    with open(array_path, 'rb') as f:
        stat = os.fstat(f.fileno())
        # Written together: another array (a concurrent rebuild) has another size or mtime.
        if sidecar['array'] != {'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns}:
            raise ValueError(f'it is not the array {sidecar_path} describes')
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f'npy format {version}')
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        found_shape, fortran, dtype = read_header(f)
        if found_shape != shape or fortran or dtype != np.dtype(np.uint8):
            raise ValueError(f'holds a {dtype} array of shape {found_shape}, '
                             f'expected uint8 {shape}')
        if stat.st_size != f.tell() + images_nbytes(shape):
            raise ValueError(f'{stat.st_size} bytes, expected {f.tell() + images_nbytes(shape)}')
        images = np.empty(shape, dtype=np.uint8)
        if f.readinto(memoryview(images).cast('B')) != images.nbytes:
            raise ValueError('truncated')
    return images


def images_nbytes(shape):
    return int(np.prod(shape, dtype=np.int64))


def write_cache(root, split, key, images, quiet):
    """Write a split's cache atomically, array first; a folder we cannot write costs a note.

    Any other failed write (a full disk, a file-size limit) raises its OSError, naming
    the file: the run stops with one line, and no partial cache file is left.
    """
    array_path, sidecar_path = cache_paths(root, split)
    try:
        atomic_write_array(array_path, images)
        stat = os.stat(array_path)
        sidecar = {'format': CACHE_FORMAT, 'key': key, 'split': split,
                   'shape': list(images.shape), 'dtype': 'uint8',
                   'array': {'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns}}
        atomic_write_text(sidecar_path, json.dumps(sidecar, indent=1) + '\n')
    except OSError as e:
        if e.errno not in CANNOT_CREATE:
            raise
        if not quiet:
            print(f'note: cannot write the cache {array_path} ({e.strerror or e}); the {split} '
                  'split is kept in memory only and will be decoded again next time')


def remove_killed_writes(root, quiet):
    """Remove the temporaries of cache files that a killed run left in ``root`` (only those).

    A kill during write_cache leaves a full-size ``..mixkl-cache-train.npy.XXXXXXXX``;
    files.remove_stale_temporaries keeps any that a live process is still writing.
    """
    names = [os.path.basename(path)
             for split in ('train', 'val') for path in cache_paths(root, split)]
    removed = remove_stale_temporaries(root, names)
    if removed and not quiet:
        print(f'note: removed {len(removed)} temporary cache file(s) that an interrupted run '
              f'left in {root}')
