"""Neuromorphic data layer: synthetic raw files -> spikingjelly parsers -> frames; augmentation."""
import math
import os

import numpy as np
import pytest
import torch

import spikingjelly.datasets as sjds
from spikingjelly.datasets.cifar10_dvs import CIFAR10DVS
from spikingjelly.datasets.dvs128_gesture import DVS128Gesture

from qkformer.data.dvs import (CIFAR10_DVS_CLASSES, CorruptEventFileError, DVSTrainTransform, SNNAugmentWide,
                               build_dvs_datasets, load_cifar10_dvs_events, split_per_class)
from qkformer.data.synthetic_events import (make_synthetic_cifar10_dvs, make_synthetic_dvs128_gesture,
                                            write_aedat2)

# >= 10 recordings are needed for a non-empty 10 % test part; 11 and 12 exercise the
# lexicographic file order ('_10' sorts before '_2'), 1-5 give test parts of size 0.
CIFAR_COUNTS = [10, 11, 2, 3, 10, 4, 5, 12, 1, 10]


@pytest.fixture(scope='module')
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp('cifar10_dvs')
    meta = make_synthetic_cifar10_dvs(root, per_class=CIFAR_COUNTS, n_events=(500, 1500))
    return root, meta, build_dvs_datasets('cifar10_dvs', root)


@pytest.fixture(scope='module')
def gesture(tmp_path_factory):
    root = tmp_path_factory.mktemp('dvs128')
    meta = make_synthetic_dvs128_gesture(root)
    return root, meta, build_dvs_datasets('dvs128_gesture', root)


def _events(rng, n):
    return rng.integers(0, 128, n), rng.integers(0, 128, n), rng.integers(0, 2, n), np.cumsum(rng.integers(1, 9, n))


def _check_frames(x, n):
    assert x.shape == (16, 2, 128, 128) and x.dtype == torch.float32
    per_frame = x.sum(dim=(1, 2, 3))
    assert per_frame.sum().item() == n
    assert (per_frame[:-1] == n // 16).all() and per_frame[-1].item() == n - 15 * (n // 16)


# ---------------------------------------------------------------- numpy 2 breakage and fix
def test_unpatched_cifar10_dvs_parser_fails_on_this_numpy(tmp_path):
    f = tmp_path / 'a.aedat'
    write_aedat2(f, *_events(np.random.default_rng(0), 100))
    try:
        CIFAR10DVS.load_origin_data(str(f))
    except ValueError as e:
        assert 'fromstring' in str(e)
    else:
        pytest.skip(f'np.fromstring binary mode still works on numpy {np.__version__}')
    # ... and spikingjelly's own conversion swallows that error: empty class folders remain.
    extract, out = tmp_path / 'extract' / 'airplane', tmp_path / 'events_np'
    extract.mkdir(parents=True)
    os.replace(f, extract / 'a.aedat')
    out.mkdir()
    CIFAR10DVS.create_events_np_files(str(tmp_path / 'extract'), str(out))
    assert os.listdir(out / 'airplane') == []


def test_patched_parser_roundtrip(tmp_path):
    x, y, p, t = _events(np.random.default_rng(1), 777)
    write_aedat2(tmp_path / 'a.aedat', x, y, p, t)
    ev = load_cifar10_dvs_events(str(tmp_path / 'a.aedat'))
    for k, v in zip('xypt', (x, y, p, t)):
        np.testing.assert_array_equal(ev[k].astype(np.int64), v)


# ---------------------------------------------------------------- CIFAR10-DVS
def test_cifar10_dvs_split_and_samples(cifar):
    root, meta, (train, test) = cifar
    assert len(train) + len(test) == sum(CIFAR_COUNTS)
    for label, n in enumerate(CIFAR_COUNTS):
        assert sum(1 for y in train.targets if y == label) == math.ceil(0.9 * n)
        assert sum(1 for y in test.targets if y == label) == n - math.ceil(0.9 * n)
    # dataset order = sorted file names, so of automobile's 11 files ('_0', '_1', '_10', '_2',
    # ..., '_9') the held-out one is '_9', not '_10'.
    test_names = [os.path.basename(test.path(i)) for i in range(len(test))]
    assert 'cifar10_automobile_9.npz' in test_names and 'cifar10_automobile_10.npz' not in test_names
    # identical to spikingjelly's split_to_train_test_set(0.9, ds, 10, random_split=False)
    sj_train, sj_test = sjds.split_to_train_test_set(0.9, train.base, 10, random_split=False)
    assert train.indices == list(sj_train.indices) and test.indices == list(sj_test.indices)
    for ds in (train, test):
        for i in (0, len(ds) - 1):
            x, y = ds[i]
            cls, stem = ds.path(i).split(os.sep)[-2:]
            label, n = meta[f'{cls}/{os.path.splitext(stem)[0]}']
            assert isinstance(y, int) and y == label == CIFAR10_DVS_CLASSES.index(cls)
            _check_frames(x, n)


def test_cifar10_dvs_pixels_match_written_events(cifar):
    root, meta, (train, _) = cifar
    x, _ = train[0]
    ev = load_cifar10_dvs_events(str(root / 'extract' / 'airplane' / 'cifar10_airplane_0.aedat'))
    hist = np.zeros((2, 128, 128))
    np.add.at(hist, (ev['p'].astype(int), ev['y'].astype(int), ev['x'].astype(int)), 1)
    assert train.path(0).endswith('cifar10_airplane_0.npz')
    np.testing.assert_array_equal(x.sum(0).numpy(), hist)


def test_cifar10_dvs_truncated_file_is_reported(tmp_path):
    make_synthetic_cifar10_dvs(tmp_path, per_class=1, n_events=(100, 100))
    bad = tmp_path / 'extract' / 'cat' / 'cifar10_cat_0.aedat'
    bad.write_bytes(bad.read_bytes()[:-3])
    with pytest.raises(CorruptEventFileError, match='cifar10_cat_0.aedat'):
        build_dvs_datasets('cifar10_dvs', tmp_path)
    assert not (tmp_path / 'events_np').exists()  # nothing half-done left for spikingjelly to trust


def test_cifar10_dvs_from_download_archives(tmp_path, monkeypatch):
    # zips laid out like the official ones (<class>/<file>.aedat inside); the test swaps in
    # their MD5s, the rest of the path (check, extract, convert, integrate) is the real one.
    import hashlib, shutil, zipfile
    import qkformer.data.dvs as dvs
    src = tmp_path / 'src'
    meta = make_synthetic_cifar10_dvs(src, per_class=1, n_events=(100, 200))
    (tmp_path / 'root' / 'download').mkdir(parents=True)
    archives = []
    for c, url, _ in dvs._ARCHIVES['cifar10_dvs']:
        z = tmp_path / 'root' / 'download' / c
        with zipfile.ZipFile(z, 'w') as zf:
            for f in (src / 'extract' / c[:-4]).iterdir():
                zf.write(f, f'{c[:-4]}/{f.name}')
        archives.append((c, url, hashlib.md5(z.read_bytes()).hexdigest()))
    monkeypatch.setitem(dvs._ARCHIVES, 'cifar10_dvs', archives)
    train, test = build_dvs_datasets('cifar10_dvs', tmp_path / 'root')
    assert len(train) == 10 and len(test) == 0
    assert (tmp_path / 'root' / 'extract' / 'truck').is_dir()
    _check_frames(train[9][0], meta['truck/cifar10_truck_0'][1])
    shutil.rmtree(src)


def test_cifar10_dvs_bad_archive_md5(tmp_path):
    (tmp_path / 'download').mkdir()
    for c in CIFAR10_DVS_CLASSES:
        (tmp_path / 'download' / f'{c}.zip').write_bytes(b'not a zip')
    with pytest.raises(CorruptEventFileError, match='MD5'):
        build_dvs_datasets('cifar10_dvs', tmp_path)
    assert len(os.listdir(tmp_path / 'download')) == 10  # spikingjelly would have deleted them


# ---------------------------------------------------------------- DVS128 Gesture
def test_dvs128_gesture_split_and_samples(gesture):
    root, meta, (train, test) = gesture
    for ds, split in ((train, 'train'), (test, 'test')):
        assert len(ds) == 11 * len(meta[split])
        for i in range(len(ds)):
            x, y = ds[i]
            parts = ds.path(i).split(os.sep)
            assert parts[-3] == split
            trial, k = os.path.splitext(parts[-1])[0].rsplit('_', 1)
            gesture_id = int(parts[-2]) + 1  # folder = csv class - 1
            assert k == '0' and trial in meta[split]
            # spikingjelly's DatasetFolder index of the folder name ('10' sorts after '1')
            assert y == sorted(str(c) for c in range(11)).index(parts[-2])
            _check_frames(x, dict(meta[split][trial])[gesture_id])


def test_dvs128_gesture_pixels_match_written_events(gesture):
    root, meta, (train, _) = gesture
    i = next(i for i in range(len(train)) if train.path(i).endswith(os.path.join('train', '3', 'user02_led_0.npz')))
    ev = DVS128Gesture.load_origin_data(str(root / 'extract' / 'DvsGesture' / 'user02_led.aedat'))
    rows = np.loadtxt(root / 'extract' / 'DvsGesture' / 'user02_led_labels.csv', delimiter=',', skiprows=1)
    g, s, e = rows[3]
    assert g == 4
    m = (ev['t'] >= s) & (ev['t'] < e)
    hist = np.zeros((2, 128, 128))
    np.add.at(hist, (ev['p'][m], ev['y'][m], ev['x'][m]), 1)
    np.testing.assert_array_equal(train[i][0].sum(0).numpy(), hist)


def test_dvs128_gesture_truncated_file_is_reported(tmp_path):
    make_synthetic_dvs128_gesture(tmp_path, train_trials=('user01_fluorescent',), test_trials=('user24_led',),
                                  events_per_gesture=(50, 60))
    bad = tmp_path / 'extract' / 'DvsGesture' / 'user24_led.aedat'
    bad.write_bytes(bad.read_bytes()[:-8])
    with pytest.raises(CorruptEventFileError, match='user24_led.aedat'):
        build_dvs_datasets('dvs128_gesture', tmp_path)
    assert not (tmp_path / 'events_np').exists()


# ---------------------------------------------------------------- missing data
@pytest.mark.parametrize('name, url, layout', [
    ('cifar10_dvs', 'https://ndownloader.figshare.com/files/7712788', 'extract/<class>/*.aedat'),
    ('dvs128_gesture', DVS128Gesture.resource_url_md5()[0][1], 'extract/DvsGesture/'),
])
def test_missing_root_message(tmp_path, name, url, layout):
    for root in (tmp_path / 'absent', tmp_path):
        with pytest.raises(FileNotFoundError) as e:
            build_dvs_datasets(name, root)
        msg = str(e.value)
        assert url in msg and layout in msg and 'download/' in msg
    assert os.listdir(tmp_path) == []  # no download attempt, no folders created


def test_incomplete_extract_message(tmp_path):
    make_synthetic_dvs128_gesture(tmp_path, train_trials=('user01_fluorescent',), test_trials=('user24_led',),
                                  events_per_gesture=(50, 60))
    os.remove(tmp_path / 'extract' / 'DvsGesture' / 'user24_led_labels.csv')
    with pytest.raises(FileNotFoundError, match='user24_led_labels.csv'):
        build_dvs_datasets('dvs128_gesture', tmp_path)


def test_split_per_class_rule():
    targets = [0] * 10 + [1] * 3 + [0] * 2 + [2] * 11
    tr, te = split_per_class(targets, 0.9, 3)
    assert tr == list(range(10)) + [13] + [10, 11, 12] + list(range(15, 25))
    assert te == [14, 25]
    by = lambda idx, c: [i for i in idx if targets[i] == c]
    for c, n in ((0, 12), (1, 3), (2, 11)):
        assert len(by(tr, c)) == math.ceil(0.9 * n)
        assert by(tr, c) + by(te, c) == [i for i, y in enumerate(targets) if y == c]


# ---------------------------------------------------------------- augmentation
def _framewise_constant():
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 4, (2, 128, 128), generator=g).float()
    return img.expand(16, 2, 128, 128).clone()


def test_train_transform_same_for_all_frames():
    torch.manual_seed(0)
    t, x = DVSTrainTransform(), _framewise_constant()
    values = set(x.unique().tolist())
    for _ in range(40):
        y = t(x)
        assert y.shape == x.shape and y.dtype == torch.float32
        assert (y == y[:1]).all()
        assert set(y.unique().tolist()) <= values  # NEAREST + fill 0: no new values


@pytest.mark.parametrize('op, m', [('ShearX', 0.3), ('TranslateX', -4.7), ('TranslateY', 5.0), ('Rotate', -30.0),
                                   ('Cutout', 0.0), ('Identity', 0.0)])
def test_each_op_same_for_all_frames(op, m):
    torch.manual_seed(1)
    x = _framewise_constant()
    y = SNNAugmentWide().apply_op(x, op, m)
    assert y.shape == x.shape and (y == y[:1]).all()
    assert (op == 'Identity') == torch.equal(x, y)


def test_translate_moves_by_int_pixels():
    x = torch.zeros(16, 2, 128, 128)
    x[:, :, 40, 50] = 1
    aug = SNNAugmentWide()
    y = aug.apply_op(x, 'TranslateX', 3.6)  # int(3.6) = 3 px to the right
    assert y[:, :, 40, 53].eq(1).all() and y.sum() == x.sum()
    y = aug.apply_op(x, 'TranslateY', -2.9)  # int(-2.9) = -2 px (up)
    assert y[:, :, 38, 50].eq(1).all() and y.sum() == x.sum()


def test_cutout_zeroes_a_square():
    torch.manual_seed(2)
    y = SNNAugmentWide().apply_op(torch.ones(16, 2, 128, 128), 'Cutout')
    zero = y == 0
    assert (zero == zero[:1, :1]).all()  # same region in every frame and polarity
    rows, cols = zero[0, 0].any(1).nonzero(), zero[0, 0].any(0).nonzero()
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert h == w and zero[0, 0].sum() == h * w  # one filled square, ratio 1
    assert 0.001 * 128 * 128 <= h * w <= 0.11 * 128 * 128


def test_flip():
    x = torch.arange(16 * 2 * 128 * 128, dtype=torch.float32).reshape(16, 2, 128, 128)
    t = DVSTrainTransform(flip_p=1.0)
    assert torch.equal(t.flip(x), x.flip(-1))
    assert torch.equal(DVSTrainTransform(flip_p=0.0).flip(x), x)
    # with p = 0.5 roughly half of the draws flip
    torch.manual_seed(3)
    x, flip = x[:2, :, :2], DVSTrainTransform().flip
    flips = sum(torch.equal(flip(x), x.flip(-1)) for _ in range(200))
    assert 70 < flips < 130


def test_op_and_magnitude_distribution():
    torch.manual_seed(4)
    aug, seen, mags = SNNAugmentWide(), [], []
    aug.apply_op = lambda x, op, m=0.0: (seen.append(op), mags.append((op, m)), x)[-1]
    for _ in range(1200):
        aug(torch.zeros(1, 1, 4, 4))
    counts = {op: seen.count(op) for op in SNNAugmentWide.OPS}
    assert all(150 < c < 250 for c in counts.values()), counts
    rot = {round(m, 4) for op, m in mags if op == 'Rotate'}
    grid = {round(float(v), 4) for v in torch.linspace(-30, 30, 31)}
    assert rot <= grid | {-v for v in grid} and len(rot) > 20
