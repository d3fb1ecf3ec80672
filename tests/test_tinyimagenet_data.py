"""Tiny-ImageNet-200 folders in, uint8 tensors out: layout, labels, the decode cache, bad input."""
import errno
import io
import json
import os
import shutil
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import tinyimagenet
from payloads import CreatesAFile
from synthetic import write_synthetic_cifar, write_synthetic_tiny_imagenet
from tinyimagenet import cache_paths, load_tiny_imagenet
from data import load_dataset
from utils import DATASETS, InputError, load_cifar

URL = 'http://cs231n.stanford.edu/tiny-imagenet-200.zip'


def make(tmp_path, **kwargs):
    """Write the synthetic release under tmp_path; return its tiny-imagenet-200 folder."""
    write_synthetic_tiny_imagenet(str(tmp_path), **kwargs)
    return os.path.join(str(tmp_path), 'tiny-imagenet-200')


def load(tmp_path, train):
    return load_tiny_imagenet(str(tmp_path), train=train, quiet=True)


def pil_pixels(path):
    """An image decoded by Pillow directly: the reference for the loader's pixels."""
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert('RGB'))).permute(2, 0, 1)


def listed_wnids(base):
    with open(os.path.join(base, 'wnids.txt')) as f:
        return f.read().split()


def save_jpeg(path, pixels, mode=None):
    """Write (64, 64, 3) uint8 pixels as a JPEG at path, with a later mtime than before."""
    old = os.stat(path).st_mtime_ns if os.path.exists(path) else None
    Image.fromarray(pixels).convert(mode or 'RGB').save(path, 'JPEG', quality=95)
    if old is not None:  # coarse file-system clocks could otherwise keep the mtime
        os.utime(path, ns=(old + 10 ** 9, old + 10 ** 9))


def random_pixels(seed, size=64):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------
# The layout

def test_train_split_is_the_class_folders_in_sorted_wnid_order_with_the_files_pixels(tmp_path):
    base = make(tmp_path, num_classes=4, per_class=6)
    wnids = listed_wnids(base)
    assert wnids != sorted(wnids), 'like the release, wnids.txt is not sorted'
    expected_x, expected_y = [], []
    for label, wnid in enumerate(sorted(wnids)):
        folder = os.path.join(base, 'train', wnid, 'images')
        for name in sorted(os.listdir(folder)):
            expected_x.append(pil_pixels(os.path.join(folder, name)))
            expected_y.append(label)
    x, y = load(tmp_path, train=True)
    assert x.shape == (24, 3, 64, 64) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert y.tolist() == expected_y
    assert torch.equal(x, torch.stack(expected_x))


def test_val_split_takes_its_labels_from_the_annotations(tmp_path):
    base = make(tmp_path, num_classes=4, n_val=12)
    index = {wnid: i for i, wnid in enumerate(sorted(listed_wnids(base)))}
    with open(os.path.join(base, 'val', 'val_annotations.txt')) as f:
        label_of = {line.split('\t')[0]: index[line.split('\t')[1]] for line in f}
    names = sorted(os.listdir(os.path.join(base, 'val', 'images')))
    x, y = load(tmp_path, train=False)
    assert x.shape == (12, 3, 64, 64) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert y.tolist() == [label_of[name] for name in names]
    assert len(set(y.tolist())) > 1
    assert torch.equal(x, torch.stack([pil_pixels(os.path.join(base, 'val', 'images', n))
                                       for n in names]))


@pytest.mark.parametrize('classes', [200, 201])
def test_the_classes_are_the_200_of_the_release_at_most(tmp_path, classes):
    wnids = [f'n{i:08d}' for i in range(classes, 0, -1)]
    for wnid in wnids:
        os.makedirs(tmp_path / 'train' / wnid / 'images')
    (tmp_path / 'wnids.txt').write_text('\n'.join(wnids) + '\n')
    if classes == 200:
        assert tinyimagenet.read_classes(str(tmp_path)) == sorted(wnids)
    else:
        with pytest.raises(InputError, match='201 classes; Tiny-ImageNet-200 has at most 200'):
            tinyimagenet.read_classes(str(tmp_path))


def test_hidden_files_beside_the_images_are_not_images(tmp_path):
    base = make(tmp_path, num_classes=2, per_class=3, n_val=4)
    x, _ = load(tmp_path, train=True)
    wnid = sorted(listed_wnids(base))[0]
    # What macOS leaves beside copied files: AppleDouble '._' files with the same suffix.
    (tmp_path / 'tiny-imagenet-200' / 'train' / wnid / 'images' / '._0.JPEG').write_bytes(b'x')
    (tmp_path / 'tiny-imagenet-200' / 'val' / 'images' / '._0.JPEG').write_bytes(b'x')
    train_x, train_y = load(tmp_path, train=True)
    assert len(train_y) == 6 and torch.equal(train_x, x)
    assert len(load(tmp_path, train=False)[1]) == 4


def test_images_named_jpg_or_jpeg_in_any_case_are_images_and_other_files_are_not(tmp_path):
    base = make(tmp_path, num_classes=2, per_class=4, n_val=4)
    x, y = load(tmp_path, train=True)
    wnid = sorted(listed_wnids(base))[0]
    folder = tmp_path / 'tiny-imagenet-200' / 'train' / wnid / 'images'
    names = sorted(os.listdir(folder))
    # Renamed (the same images): .jpg, .JPG, .jpeg; a README beside them is not an image.
    for name, suffix in zip(names[1:], ('.jpg', '.JPG', '.jpeg')):
        (folder / name).rename(folder / (name.rsplit('.', 1)[0] + suffix))
    (folder / 'README.txt').write_text('not an image')
    x2, y2 = load(tmp_path, train=True)
    assert torch.equal(y2, y) and torch.equal(x2, x)


def test_without_wnids_txt_the_classes_are_the_sorted_train_folders(tmp_path):
    make(tmp_path / 'listed', seed=3)
    unlisted = make(tmp_path / 'unlisted', seed=3, wnids_file=False)
    # A hidden folder beside the classes (a notebook's checkpoints) is not a class, nor a file.
    os.makedirs(os.path.join(unlisted, 'train', '.ipynb_checkpoints', 'images'))
    with open(os.path.join(unlisted, 'train', 'README.txt'), 'w') as f:
        f.write('the training images, a folder per class\n')
    for train in (True, False):
        x, y = load(tmp_path / 'unlisted', train)
        x_ref, y_ref = load(tmp_path / 'listed', train)
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_data_dir_may_be_the_dataset_folder_itself(tmp_path):
    base = make(tmp_path)
    x, y = load_tiny_imagenet(base, train=False, quiet=True)
    x_ref, y_ref = load(tmp_path, train=False)
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    os.makedirs(tmp_path / 'train')  # a stray train/ beside the dataset folder, no val/
    x, y = load(tmp_path, train=False)
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_grayscale_and_cmyk_jpegs_come_back_as_rgb(tmp_path):
    base = make(tmp_path)
    wnid = sorted(listed_wnids(base))[0]
    gray = os.path.join(base, 'train', wnid, 'images', f'{wnid}_0.JPEG')
    cmyk = os.path.join(base, 'train', wnid, 'images', f'{wnid}_1.JPEG')
    save_jpeg(gray, random_pixels(1), mode='L')
    save_jpeg(cmyk, random_pixels(2), mode='CMYK')
    with Image.open(gray) as a, Image.open(cmyk) as b:
        assert (a.mode, b.mode) == ('L', 'CMYK')
        gray_pixels = torch.from_numpy(np.array(a))
    x, _ = load(tmp_path, train=True)
    assert all(torch.equal(x[0, c], gray_pixels) for c in range(3))
    assert torch.equal(x[1], pil_pixels(cmyk))


def test_synthetic_release_has_every_file_of_the_real_layout(tmp_path):
    base = make(tmp_path, num_classes=3, per_class=2, n_val=5)
    wnids = listed_wnids(base)
    assert len(wnids) == 3 and all(len(w) == 9 and w[0] == 'n' and w[1:].isdigit() for w in wnids)
    with open(os.path.join(base, 'words.txt')) as f:
        assert [line.split('\t')[0] for line in f] == wnids
    for wnid in wnids:
        with open(os.path.join(base, 'train', wnid, f'{wnid}_boxes.txt')) as f:
            assert [line.split('\t')[0] for line in f] == [f'{wnid}_{i}.JPEG' for i in range(2)]
    with open(os.path.join(base, 'val', 'val_annotations.txt')) as f:
        assert all(len(line.rstrip('\n').split('\t')) == 6 for line in f)
    tests = sorted(os.listdir(os.path.join(base, 'test', 'images')))
    assert tests == sorted(f'test_{i}.JPEG' for i in range(5))
    with Image.open(os.path.join(base, 'test', 'images', tests[0])) as image:
        assert (image.format, image.size, image.mode) == ('JPEG', (64, 64), 'RGB')


def test_learnable_synthetic_images_are_told_apart_by_their_colour(tmp_path):
    make(tmp_path, num_classes=6, per_class=5, n_val=30, learnable=True)
    x, y = load(tmp_path, train=True)
    x_val, y_val = load(tmp_path, train=False)
    colour = lambda images: images.float().mean((2, 3))  # noqa: E731
    centroids = torch.stack([colour(x[y == c]).mean(0) for c in range(6)])
    predicted = torch.cdist(colour(x_val), centroids).argmin(1)
    assert torch.equal(predicted, y_val)


def test_load_dataset_dispatches_on_the_dataset_name(tmp_path, capsys):
    make(tmp_path / 'tiny')
    write_synthetic_cifar(str(tmp_path / 'cifar'), 'cifar10', n_train=20, n_test=10)
    capsys.readouterr()
    x, y = load_dataset('tinyimagenet', str(tmp_path / 'tiny'), train=False, quiet=True)
    assert capsys.readouterr() == ('', ''), 'quiet: no decoding note (torchrun ranks > 0)'
    x_ref, y_ref = load(tmp_path / 'tiny', train=False)
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    assert x.shape[-1] == DATASETS['tinyimagenet']['image_size'] == 64
    x, y = load_dataset('cifar10', str(tmp_path / 'cifar'), train=True, quiet=True)
    x_ref, y_ref = load_cifar('cifar10', str(tmp_path / 'cifar'), train=True, quiet=True)
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    assert x.shape[-1] == DATASETS['cifar10']['image_size'] == DATASETS['cifar100']['image_size']
    with pytest.raises(InputError, match="unknown dataset 'imagenet'"):
        load_dataset('imagenet', str(tmp_path), train=True)


# ---------------------------------------------------------------------------
# The decode cache

def count_decodes(monkeypatch):
    """Make every image decode go through a counter; returns the list it appends to."""
    calls, decode = [], tinyimagenet._decode_image

    def counted(path):
        calls.append(path)
        return decode(path)
    monkeypatch.setattr(tinyimagenet, '_decode_image', counted)
    return calls


def forbid_decoding(monkeypatch):
    def refuse(path):
        raise AssertionError(f'decoded {path}: the cache was not used')
    monkeypatch.setattr(tinyimagenet, '_decode_image', refuse)


@pytest.mark.parametrize('train', [True, False])
def test_the_second_load_reads_the_cache_without_decoding(tmp_path, monkeypatch, train):
    base = make(tmp_path)
    calls = count_decodes(monkeypatch)
    x, y = load(tmp_path, train)
    assert len(calls) == len(y)
    split = 'train' if train else 'val'
    assert all(os.path.isfile(p) for p in cache_paths(base, split))
    assert [os.path.basename(p) for p in cache_paths(base, split)] == \
        [f'.mixkl-cache-{split}.npy', f'.mixkl-cache-{split}.json']
    forbid_decoding(monkeypatch)
    x2, y2 = load(tmp_path, train)
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_a_changed_or_added_image_rebuilds_the_cache(tmp_path):
    base = make(tmp_path, per_class=6)
    wnid = sorted(listed_wnids(base))[0]
    folder = os.path.join(base, 'train', wnid, 'images')
    load(tmp_path, train=True)
    changed = os.path.join(folder, f'{wnid}_2.JPEG')
    save_jpeg(changed, random_pixels(7))
    x, y = load(tmp_path, train=True)
    assert torch.equal(x[2], pil_pixels(changed))
    added = os.path.join(folder, f'{wnid}_9.JPEG')  # sorts last in class 0
    save_jpeg(added, random_pixels(8))
    x, y = load(tmp_path, train=True)
    assert len(y) == 25 and y[6] == 0 and y[7] == 1
    assert torch.equal(x[6], pil_pixels(added)) and torch.equal(x[2], pil_pixels(changed))


def test_an_image_rewritten_with_the_same_byte_size_rebuilds_the_cache(tmp_path):
    base = make(tmp_path)
    path = first_train_image(base)
    load(tmp_path, train=True)
    size = os.path.getsize(path)
    buffer = io.BytesIO()
    Image.fromarray(random_pixels(9)).save(buffer, 'JPEG', quality=50)
    assert len(buffer.getvalue()) < size
    old = os.stat(path).st_mtime_ns
    write_bytes(path, buffer.getvalue().ljust(size, b'\0'))  # bytes after the end are ignored
    os.utime(path, ns=(old + 10 ** 9, old + 10 ** 9))
    assert os.path.getsize(path) == size
    x, _ = load(tmp_path, train=True)
    assert torch.equal(x[0], pil_pixels(path))


def test_an_image_rewritten_with_its_size_and_mtime_kept_rebuilds_the_cache(tmp_path):
    """The key holds each file's ctime and inode: an mtime set back (cp -p, tar) still counts."""
    base = make(tmp_path)
    path = first_train_image(base)
    load(tmp_path, train=True)
    before = os.stat(path)
    buffer = io.BytesIO()
    Image.fromarray(random_pixels(10)).save(buffer, 'JPEG', quality=50)
    replacement = path + '.new'
    write_bytes(replacement, buffer.getvalue().ljust(before.st_size, b'\0'))
    os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(replacement, path)  # a new inode, the old size and mtime
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    x, _ = load(tmp_path, train=True)
    assert torch.equal(x[0], pil_pixels(path))
    # The same file, rewritten in place: its inode is kept, its ctime is not.
    buffer = io.BytesIO()
    Image.fromarray(random_pixels(11)).save(buffer, 'JPEG', quality=50)
    with open(path, 'r+b') as f:
        f.write(buffer.getvalue().ljust(before.st_size, b'\0'))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_ino == after.st_ino
    x, _ = load(tmp_path, train=True)
    assert torch.equal(x[0], pil_pixels(path))


@pytest.mark.parametrize('edit', [
    lambda text: '\ufeff' + text,  # a UTF-8 byte order mark, as editors on Windows write
    lambda text: '\n' + text.replace('\n', '\n\n', 2) + '\n  \n',  # blank lines
    lambda text: text.replace('\n', '\r\n'),  # Windows line ends
], ids=['byte order mark', 'blank lines', 'crlf'])
def test_text_files_as_editors_leave_them_load_all_the_same(tmp_path, edit):
    base = make(tmp_path)
    x, y = load(tmp_path, train=False)
    for name in ('wnids.txt', os.path.join('val', 'val_annotations.txt')):
        rewrite(os.path.join(base, name), edit)
    x_edited, y_edited = load(tmp_path, train=False)
    assert torch.equal(x_edited, x) and torch.equal(y_edited, y)
    _, y_train = load(tmp_path, train=True)
    assert y_train.unique().tolist() == list(range(4))


def test_changed_annotations_change_the_val_labels(tmp_path):
    base = make(tmp_path)
    _, y = load(tmp_path, train=False)
    path = os.path.join(base, 'val', 'val_annotations.txt')
    with open(path) as f:
        lines = f.readlines()
    wnids = sorted(listed_wnids(base))
    other = (y[0].item() + 1) % len(wnids)
    fields = lines[0].split('\t')
    lines[0] = '\t'.join([fields[0], wnids[other]] + fields[2:])
    with open(path, 'w') as f:
        f.writelines(lines)
    _, y2 = load(tmp_path, train=False)
    assert y2[0] == other and torch.equal(y2[1:], y[1:])


def npy_bytes(array, allow_pickle=False):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def npy_header_only(shape):
    """An .npy header declaring a uint8 array of ``shape``, followed by 64 bytes of data."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {'descr': '|u1', 'fortran_order': False, 'shape': shape})
    return buffer.getvalue() + bytes(64)


def damage(base, how, victim):
    """Damage the train cache in ``base``. Forged arrays get a sidecar that matches their
    file, so that only the checks on the array itself can catch them."""
    array_path, sidecar_path = cache_paths(base, 'train')
    with open(array_path, 'rb') as f:
        good = f.read()
    forged = {
        'forged: truncated': good[:len(good) // 2],
        'forged: not an npy file': b'garbage' * 100,
        # as many bytes as the right array: only the header's shape or dtype is wrong
        'forged: another shape': npy_bytes(np.zeros((24, 3, 32, 128), np.uint8)),
        'forged: another dtype': npy_bytes(np.zeros((24, 3, 64, 16), np.float32)),
        'forged: fortran order': npy_bytes(np.asfortranarray(np.zeros((24, 3, 64, 64), np.uint8))),
        'forged: a pickle that would create a file':
            npy_bytes(np.array([CreatesAFile(victim)], dtype=object), allow_pickle=True),
        'forged: a huge declared shape': npy_header_only((10 ** 9, 3, 64, 64)),
    }
    if how in forged:
        with open(array_path, 'wb') as f:
            f.write(forged[how])
        with open(sidecar_path) as f:
            sidecar = json.load(f)
        stat = os.stat(array_path)
        sidecar['array'] = {'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns}
        with open(sidecar_path, 'w') as f:
            json.dump(sidecar, f)
    elif how == 'replaced by another array, the sidecar untouched':
        with open(array_path, 'wb') as f:  # the right shape and dtype, other pixels
            f.write(npy_bytes(np.zeros((24, 3, 64, 64), np.uint8)))
    elif how == 'truncated':
        with open(array_path, 'wb') as f:
            f.write(good[:len(good) - 1000])
    elif how == 'sidecar garbage':
        with open(sidecar_path, 'wb') as f:
            f.write(b'\xff\x00{not json')
    elif how == 'sidecar not an object':
        with open(sidecar_path, 'w') as f:
            f.write('[]')
    elif how == 'sidecar nested too deep':  # json's parser recurses: RecursionError
        with open(sidecar_path, 'w') as f:
            f.write('[' * 50000 + ']' * 50000)
    elif how == 'array deleted':
        os.remove(array_path)
    else:
        raise ValueError(how)


@pytest.mark.parametrize('how', [
    'truncated', 'sidecar garbage', 'sidecar not an object', 'sidecar nested too deep',
    'array deleted',
    'replaced by another array, the sidecar untouched',
    'forged: truncated',
    'forged: not an npy file', 'forged: another shape', 'forged: another dtype',
    'forged: fortran order', 'forged: a pickle that would create a file',
    'forged: a huge declared shape'])
def test_a_damaged_cache_is_rebuilt_with_a_note(tmp_path, monkeypatch, capsys, how):
    base = make(tmp_path)
    x, y = load(tmp_path, train=True)
    victim = tmp_path / 'created-by-payload'
    damage(base, how, str(victim))
    capsys.readouterr()
    tracemalloc.start()
    try:
        x2, y2 = load_tiny_imagenet(str(tmp_path), train=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    out = capsys.readouterr().out
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert f'note: {cache_paths(base, "train")[0]} is damaged' in out, out
    assert not victim.exists()
    assert peak < 20 * 2 ** 20, f'{peak / 2 ** 20:.0f} MiB allocated'
    forbid_decoding(monkeypatch)
    x3, _ = load(tmp_path, train=True)  # the rebuilt cache is sound
    assert torch.equal(x, x3)


@pytest.mark.parametrize('code', [errno.EACCES, errno.EPERM, errno.EROFS])
def test_a_folder_that_cannot_be_written_is_decoded_into_memory_with_one_note(
        tmp_path, monkeypatch, capsys, code):
    base = make(tmp_path)

    def read_only(*args):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(tinyimagenet, 'atomic_write_array', read_only)
    x, y = load_tiny_imagenet(str(tmp_path), train=False)
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if 'cannot write the cache' in line]
    assert notes == [f'note: cannot write the cache {cache_paths(base, "val")[0]} '
                     f'({os.strerror(code)}); the val split is kept in memory only and will be '
                     'decoded again next time']
    assert not any(name.startswith('.mixkl-cache') for name in os.listdir(base))
    assert x.shape == (12, 3, 64, 64) and len(y) == 12


def test_quiet_prints_nothing(tmp_path, capsys):
    make(tmp_path)
    load(tmp_path, train=True)
    assert capsys.readouterr() == ('', '')


# ---------------------------------------------------------------------------
# Bad input: one line, naming the file

def rewrite(path, edit):
    with open(path) as f:
        text = f.read()
    with open(path, 'w') as f:
        f.write(edit(text))


def first_train_image(base):
    wnid = sorted(listed_wnids(base))[0]
    return os.path.join(base, 'train', wnid, 'images', f'{wnid}_0.JPEG')


def write_bytes(path, data):
    with open(path, 'wb') as f:
        f.write(data)


def half_of(path):
    with open(path, 'rb') as f:
        data = f.read()
    return data[:len(data) // 2]


def unparseable(base, line):
    path = os.path.join(base, 'val', 'val_annotations.txt')
    rewrite(path, lambda text: line + '\n' + text.split('\n', 1)[1])
    return path


def empty_folder(folder):
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    return folder


def bad_missing_class_folder(base):
    rewrite(os.path.join(base, 'wnids.txt'), lambda text: text + 'n00000001\n')
    return True, os.path.join(base, 'train', 'n00000001', 'images'), 'missing class folder'


def bad_corrupt_image(base):
    path = first_train_image(base)
    write_bytes(path, b'\xff\xd8\xff\xe0 not really a JPEG' * 10)
    return True, path, 'not a readable JPEG image'


def bad_truncated_image(base):
    path = first_train_image(base)
    write_bytes(path, half_of(path))
    return True, path, 'not a readable JPEG image'


def bad_png_named_jpeg(base):
    path = first_train_image(base)
    Image.fromarray(random_pixels(0)).save(path, 'PNG')
    return True, path, 'not a readable JPEG image'


def bad_wrong_size(base):
    path = os.path.join(base, 'val', 'images', 'val_3.JPEG')
    Image.fromarray(random_pixels(0, size=32)).save(path, 'JPEG')
    return False, path, 'the image is 32x32; Tiny-ImageNet-200 images are 64x64'


def bad_missing_annotations(base):
    path = os.path.join(base, 'val', 'val_annotations.txt')
    os.remove(path)
    return False, path, 'missing'


def bad_annotation_without_tabs(base):
    path = unparseable(base, 'val_0.JPEG n01443537 1 2 3 4')
    return False, path, 'line 1 is not file<TAB>wnid<TAB>x0'


def bad_annotation_with_a_non_integer_box(base):
    wnid = listed_wnids(base)[0]
    path = unparseable(base, f'val_0.JPEG\t{wnid}\t1\t2\tthree\t4')
    return False, path, 'line 1 is not file<TAB>wnid<TAB>x0'


def bad_annotation_with_a_non_integer_x0(base):
    wnid = listed_wnids(base)[0]
    path = unparseable(base, f'val_0.JPEG\t{wnid}\tone\t2\t3\t4')
    return False, path, 'line 1 is not file<TAB>wnid<TAB>x0'


def bad_annotation_with_a_seventh_field(base):
    wnid = listed_wnids(base)[0]
    path = unparseable(base, f'val_0.JPEG\t{wnid}\t1\t2\t3\t4\t5')
    return False, path, 'line 1 is not file<TAB>wnid<TAB>x0'


def bad_annotation_with_five_fields(base):
    wnid = listed_wnids(base)[0]
    path = unparseable(base, f'val_0.JPEG\t{wnid}\t1\t2\t3')
    return False, path, 'line 1 is not file<TAB>wnid<TAB>x0'


def bad_annotation_of_an_unknown_class(base):
    path = unparseable(base, 'val_0.JPEG\tn99999999\t1\t2\t3\t4')
    return False, path, 'line 1 names class n99999999, which is not one of the 4 classes'


def bad_annotation_twice(base):
    path = os.path.join(base, 'val', 'val_annotations.txt')
    rewrite(path, lambda text: text + text.split('\n', 1)[0] + '\n')
    return False, path, 'annotates val_0.JPEG a second time'


def bad_val_image_without_annotation(base):
    path = os.path.join(base, 'val', 'images', 'val_99.JPEG')
    shutil.copy(os.path.join(base, 'val', 'images', 'val_0.JPEG'), path)
    return False, path, 'no line in'


def bad_annotation_of_a_missing_image(base):
    os.remove(os.path.join(base, 'val', 'images', 'val_3.JPEG'))
    return False, os.path.join(base, 'val', 'val_annotations.txt'), 'names val_3.JPEG'


def bad_empty_train_split(base):
    for wnid in listed_wnids(base):
        empty_folder(os.path.join(base, 'train', wnid, 'images'))
    first = sorted(listed_wnids(base))[0]
    return True, os.path.join(base, 'train', first, 'images'), f'no images of class {first}'


def bad_one_class_folder_without_images(base):
    wnid = sorted(listed_wnids(base))[2]  # a partial extraction: the class would never be seen
    folder = empty_folder(os.path.join(base, 'train', wnid, 'images'))
    return True, folder, f'no images of class {wnid}'


def bad_empty_val_split(base):
    folder = empty_folder(os.path.join(base, 'val', 'images'))
    return False, folder, 'validation split has no images'


def bad_more_than_200_classes(base):
    path = os.path.join(base, 'wnids.txt')
    rewrite(path, lambda text: text + ''.join(f'n{i:08d}\n' for i in range(1, 198)))
    return True, path, '201 classes; Tiny-ImageNet-200 has at most 200'


def bad_class_listed_twice(base):
    path = os.path.join(base, 'wnids.txt')
    rewrite(path, lambda text: text + text.split('\n', 1)[0] + '\n')
    return True, path, 'is listed more than once'


def bad_wnids_without_a_class(base):
    path = os.path.join(base, 'wnids.txt')
    rewrite(path, lambda text: '\n \n')
    return True, path, 'lists no classes'


def bad_wnids_not_utf8(base):
    path = os.path.join(base, 'wnids.txt')
    write_bytes(path, b'n0144\xff3537\n')
    return True, path, 'not UTF-8 text'


def bad_no_val_images_folder(base):
    folder = os.path.join(base, 'val', 'images')
    shutil.rmtree(folder)
    return False, folder, 'missing; the Tiny-ImageNet-200 validation images belong there'


def bad_hidden_class_name(base):
    path = os.path.join(base, 'wnids.txt')
    rewrite(path, lambda text: text + '.n00000001\n')  # hidden, like ._x.JPEG: not a class
    return True, path, "'.n00000001' is not a class folder name"


def bad_no_class_folders_and_no_wnids_txt(base):
    os.remove(os.path.join(base, 'wnids.txt'))
    for wnid in os.listdir(os.path.join(base, 'train')):
        shutil.rmtree(os.path.join(base, 'train', wnid))
    return True, os.path.join(base, 'train'), 'no class folders'


def bad_no_val_folder(base):
    shutil.rmtree(os.path.join(base, 'val'))
    return True, base, URL


BAD_INPUT = [f for name, f in sorted(globals().items()) if name.startswith('bad_')]


@pytest.mark.parametrize('spoil', BAD_INPUT, ids=lambda f: f.__name__[4:])
def test_bad_input_is_one_line_naming_the_file(tmp_path, spoil):
    base = make(tmp_path)
    train, path, expected = spoil(base)
    with pytest.raises(InputError) as error:
        load(tmp_path, train)
    message = str(error.value)
    assert '\n' not in message and len(message) < 400
    assert path in message and expected in message, message


def test_absent_data_says_where_it_was_looked_for_and_where_to_get_it(tmp_path):
    with pytest.raises(InputError) as error:
        load_dataset('tinyimagenet', str(tmp_path / 'data'), train=True)
    message = str(error.value)
    assert '\n' not in message
    assert str(tmp_path / 'data' / 'tiny-imagenet-200') in message and URL in message


def declare_size(path, width, height):
    """Rewrite the frame header (SOF0) of the JPEG at path to declare width x height pixels."""
    with open(path, 'rb') as f:
        data = bytearray(f.read())
    sof = data.index(b'\xff\xc0')
    data[sof + 5:sof + 9] = height.to_bytes(2, 'big') + width.to_bytes(2, 'big')
    write_bytes(path, bytes(data))


@pytest.mark.parametrize('size', [10000, 65000])
def test_a_huge_declared_size_is_refused_without_decoding(tmp_path, monkeypatch, size):
    base = make(tmp_path)
    path = first_train_image(base)
    declare_size(path, size, size)
    with monkeypatch.context() as m:  # PIL's own limit would refuse, or warn on, opening it here
        m.setattr(Image, 'MAX_IMAGE_PIXELS', None)
        with Image.open(path) as image:
            assert image.size == (size, size)
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, 'load', lambda self: decoded.append(self))
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as error:
            load(tmp_path, train=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(error.value)
    assert '\n' not in message and message.startswith(f'{path}: ')
    assert 'refused before decoding' in message and not decoded
    assert peak < 20 * 2 ** 20, f'{peak / 2 ** 20:.0f} MiB allocated'


def test_a_cache_sidecar_without_its_key_is_another_datasets_and_decoded_again(tmp_path,
                                                                             capsys):
    base = make(tmp_path)
    x, y = load(tmp_path, train=True)
    array_path, sidecar_path = cache_paths(base, 'train')
    with open(sidecar_path) as f:
        sidecar = json.load(f)
    del sidecar['key']
    with open(sidecar_path, 'w') as f:
        json.dump(sidecar, f)
    capsys.readouterr()
    x2, y2 = load_tiny_imagenet(str(tmp_path), train=True)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert f'note: {base} changed since {array_path} was written' in capsys.readouterr().out
