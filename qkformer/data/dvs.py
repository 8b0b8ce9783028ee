"""Neuromorphic data: CIFAR10-DVS and DVS128 Gesture (docs/original.md §6.3, §6.4) + DVS augmentation.

Raw parsing and frame integration are spikingjelly 0.0.0.0.14's own code
(``CIFAR10DVS.load_origin_data``, ``DVS128Gesture.split_aedat_files_to_np``,
``integrate_events_file_to_frames_file_by_fixed_frames_number``).  This module only
drives them, because spikingjelly's own driver (``NeuromorphicDatasetFolder.__init__``)
is unusable here:

* it always goes through its download step first -- CIFAR10-DVS is fetched from
  figshare (impossible offline), an ``extract/`` folder alone is not enough, and
  archives whose MD5 differs are *deleted*;
* its thread pools drop worker exceptions, so a failing parser leaves empty
  ``events_np``/``frames_*`` folders that later runs trust forever and that end in
  torchvision's obscure "Found no valid file for the classes ...";
* its CIFAR10-DVS AEDAT 2.0 reader calls ``np.fromstring`` in binary mode (see
  ``patched_aedat2_reader``).

So we validate the raw layout, extract/convert/integrate with per-file error reporting
into ``*.partial`` folders renamed when complete, and then construct spikingjelly's
dataset class, which finds everything prepared and only indexes the frame files.
"""
import contextlib
import math
import os
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor, as_completed
from unittest import mock

import numpy as np
import torch
from torchvision.datasets.utils import check_integrity, extract_archive
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

import spikingjelly.configure as sj_configure
import spikingjelly.datasets as sjds
import spikingjelly.datasets.cifar10_dvs as sj_cifar
from spikingjelly.datasets.cifar10_dvs import CIFAR10DVS
from spikingjelly.datasets.dvs128_gesture import DVS128Gesture

__all__ = ['build_dvs_datasets', 'DVSFrames', 'DVSTrainTransform', 'SNNAugmentWide',
           'CorruptEventFileError', 'patched_aedat2_reader', 'load_cifar10_dvs_events',
           'split_per_class', 'CIFAR10_DVS_CLASSES']

CIFAR10_DVS_CLASSES = tuple(sorted(os.path.splitext(f)[0] for f, _, _ in CIFAR10DVS.resource_url_md5()))
_ARCHIVES = {'cifar10_dvs': list(CIFAR10DVS.resource_url_md5()),
             'dvs128_gesture': [r for r in DVS128Gesture.resource_url_md5() if r[0] == 'DvsGesture.tar.gz']}


class CorruptEventFileError(ValueError):
    """A raw event file could not be parsed (truncated download / extraction)."""


# ----------------------------------------------------------------------------- numpy fix
def _load_raw_events_frombuffer(fp, bytes_skip=0, bytes_trim=0, filter_dvs=False, times_first=False):
    """Drop-in for ``spikingjelly.datasets.cifar10_dvs.load_raw_events``.

    The original decodes the records with ``np.fromstring(data, dtype='>u4')``.  Binary
    mode of ``fromstring`` was deprecated in numpy 1.14 and removed in numpy 2.3; on our
    numpy it raises ``ValueError: The binary mode of fromstring is removed, use
    frombuffer instead`` for every file (swallowed by spikingjelly's thread pool).
    ``np.frombuffer`` is the byte-identical replacement.  A size that is not a whole
    number of 8-byte records means a truncated file; report it by name."""
    p = sj_cifar.skip_header(fp)
    fp.seek(p + bytes_skip)
    data = fp.read()
    if bytes_trim > 0:
        data = data[:-bytes_trim]
    if len(data) % 8:
        raise CorruptEventFileError(
            f'{getattr(fp, "name", fp)}: {len(data)} data bytes is not a whole number of 8-byte '
            'AEDAT 2.0 records -- the file is truncated or corrupt; re-extract it')
    data = np.frombuffer(data, dtype='>u4')
    raw_addr, timestamp = data[::2], data[1::2]
    if times_first:
        timestamp, raw_addr = raw_addr, timestamp
    if filter_dvs:
        valid = sj_cifar.read_bits(raw_addr, sj_cifar.valid_mask, sj_cifar.valid_shift) == sj_cifar.EVT_DVS
        timestamp, raw_addr = timestamp[valid], raw_addr[valid]
    return timestamp, raw_addr


@contextlib.contextmanager
def patched_aedat2_reader():
    """Swap the numpy-2-safe reader into spikingjelly's cifar10_dvs module for the duration
    (the installed library stays untouched; ``load_origin_data`` -> ``load_events`` look the
    function up as a module global, so patching that name is enough).  Its
    ``parse_raw_address`` also uses ``np.bool``, absent in numpy 1.24-1.26 (back in 2.0):
    supply the alias there for the duration too."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(sj_cifar, 'load_raw_events', _load_raw_events_frombuffer))
        if not hasattr(np, 'bool'):
            stack.enter_context(mock.patch.object(np, 'bool', np.bool_, create=True))
        yield


def load_cifar10_dvs_events(path):
    """spikingjelly's CIFAR10-DVS parser (dict t, x, y, p) with the numpy fix applied."""
    with patched_aedat2_reader():
        return CIFAR10DVS.load_origin_data(path)


def _check_aedat3(path):
    """Walk the packet headers of an AEDAT 3.1 file the way ``sjds.load_aedat_v3`` does and
    fail if a packet runs past the end of the file.  spikingjelly would either die with a
    bare ``struct.error`` or silently keep a partial packet."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        line = f.readline()
        while line.startswith(b'#') and line != b'#!END-HEADER\r\n':
            line = f.readline()
        if not line.startswith(b'#'):  # header had no END line; data began on this line
            raise CorruptEventFileError(f'{path}: AEDAT 3.1 header has no "#!END-HEADER" line')
        while True:
            pos, head = f.tell(), f.read(28)
            if not head:
                return
            if len(head) < 28:
                raise CorruptEventFileError(f'{path}: truncated packet header at byte {pos}')
            ev_size, capacity = struct.unpack('<I', head[4:8])[0], struct.unpack('<I', head[16:20])[0]
            end = pos + 28 + ev_size * capacity
            if end > size:
                raise CorruptEventFileError(f'{path}: packet at byte {pos} needs {end} bytes, file has '
                                            f'{size} -- truncated or corrupt; re-extract it')
            f.seek(end)


# ----------------------------------------------------------------------------- raw layout
def _layout_help(name, root):
    if name == 'cifar10_dvs':
        urls = '\n'.join(f'        {f:<15} {u}' for f, u, _ in _ARCHIVES[name])
        return (f"CIFAR10-DVS raw data not found under '{root}'. spikingjelly 0.0.0.0.14 cannot download it "
                f"here, so provide ONE of:\n"
                f"  (a) {root}/download/<class>.zip  -- the 10 official archives, unchanged (MD5-checked):\n{urls}\n"
                f"  (b) {root}/extract/<class>/*.aedat  -- those archives unzipped, one folder per class "
                f"({', '.join(CIFAR10_DVS_CLASSES)}), e.g. extract/airplane/cifar10_airplane_0.aedat\n"
                f"  (c) {root}/events_np/<class>/*.npz  -- spikingjelly's converted events from an earlier run")
    (f, url, md5), = _ARCHIVES[name]
    return (f"DVS128 Gesture raw data not found under '{root}'. spikingjelly cannot download it (IBM Box "
            f"needs a manual download), so provide ONE of:\n"
            f"  (a) {root}/download/{f}  (MD5 {md5}) from {url}\n"
            f"  (b) {root}/extract/DvsGesture/  -- that archive unpacked: trials_to_train.txt, trials_to_test.txt, "
            f"userNN_<lighting>.aedat and userNN_<lighting>_labels.csv (e.g. user01_fluorescent.aedat)\n"
            f"  (c) {root}/events_np/{{train,test}}/<0..10>/*.npz  -- spikingjelly's converted events")


def _extract_problem(name, extract):
    """None if ``extract`` holds a complete raw layout, else what is wrong."""
    if not os.path.isdir(extract):
        return f'{extract} does not exist'
    if name == 'cifar10_dvs':
        for c in CIFAR10_DVS_CLASSES:
            d = os.path.join(extract, c)
            if not os.path.isdir(d) or not any(f.endswith('.aedat') for f in os.listdir(d)):
                return f'{d} is missing or holds no .aedat files'
        return None
    d = os.path.join(extract, 'DvsGesture')
    for split in ('train', 'test'):
        lst = os.path.join(d, f'trials_to_{split}.txt')
        if not os.path.isfile(lst):
            return f'{lst} is missing'
        for tr in _trials(lst):
            for f in (tr, os.path.splitext(tr)[0] + '_labels.csv'):
                if not os.path.isfile(os.path.join(d, f)):
                    return f'{os.path.join(d, f)} (listed in {lst}) is missing'
    return None


def _trials(lst):
    with open(lst) as f:
        return [ln.strip() for ln in f if ln.strip()]


def _npz_files(top):
    return sorted(os.path.relpath(os.path.join(r, f), top) for r, _, fs in os.walk(top) for f in fs
                  if f.endswith('.npz'))


def _run_jobs(jobs, desc):
    """Thread pool like spikingjelly's, but the first failing job is re-raised (spikingjelly's
    pools drop exceptions) and progress is shown with tqdm."""
    workers = max(1, min(os.cpu_count() or 1, sj_configure.max_threads_number_for_datasets_preprocess))
    ex = ThreadPoolExecutor(workers)
    try:
        futs = [ex.submit(*job) for job in jobs]
        for fut in tqdm(as_completed(futs), total=len(futs), desc=desc, leave=False):
            fut.result()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _convert_cifar_file(src, dst):
    try:
        events = CIFAR10DVS.load_origin_data(src)  # spikingjelly's parser (patched reader)
    except CorruptEventFileError:
        raise
    except Exception as e:
        raise CorruptEventFileError(f'{src}: cannot parse as AEDAT 2.0 ({e!r})') from e
    sjds.np_savez(dst, **events)  # what CIFAR10DVS.read_aedat_save_to_np writes, minus the print


def _convert_gesture_trial(aedat, out_dir):
    _check_aedat3(aedat)
    stem = os.path.splitext(os.path.basename(aedat))[0]
    csv = os.path.join(os.path.dirname(aedat), stem + '_labels.csv')
    try:
        DVS128Gesture.split_aedat_files_to_np(stem, aedat, csv, out_dir)
    except Exception as e:
        raise CorruptEventFileError(f'{aedat} / {csv}: cannot parse ({e!r})') from e


@contextlib.contextmanager
def _partial_dir(final):
    """Build into ``final + '.partial'`` and rename on success, so an interrupted run never
    leaves a half-filled folder that spikingjelly would accept as complete."""
    tmp = final + '.partial'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, final)


def _prepare_events_np(name, root):
    events_np, extract, download = (os.path.join(root, d) for d in ('events_np', 'extract', 'download'))
    if os.path.isdir(events_np):
        if not _npz_files(events_np):
            raise RuntimeError(f'{events_np} exists but holds no .npz files (left by a failed spikingjelly '
                               'conversion?); delete it and retry')
        return
    if not os.path.isdir(extract):
        archives = [(os.path.join(download, f), u, m) for f, u, m in _ARCHIVES[name]]
        if not all(os.path.isfile(p) for p, _, _ in archives):
            raise FileNotFoundError(_layout_help(name, root))
        for p, url, md5 in archives:
            if not check_integrity(p, md5):
                raise CorruptEventFileError(
                    f'{p}: MD5 differs from {md5} -- corrupt or incomplete download; fetch it again from {url} '
                    f'(or unpack a trusted copy yourself into {extract})')
        with _partial_dir(extract) as tmp:
            for p, _, _ in tqdm(archives, desc='extract', leave=False):
                extract_archive(p, tmp)
    problem = _extract_problem(name, extract)
    if problem:
        raise FileNotFoundError(f'{problem}.\n' + _layout_help(name, root))

    with _partial_dir(events_np) as tmp:
        if name == 'cifar10_dvs':
            jobs = []
            for c in CIFAR10_DVS_CLASSES:
                os.makedirs(os.path.join(tmp, c))
                for f in sorted(os.listdir(os.path.join(extract, c))):
                    if f.endswith('.aedat'):
                        jobs.append((_convert_cifar_file, os.path.join(extract, c, f),
                                     os.path.join(tmp, c, os.path.splitext(f)[0] + '.npz')))
            with patched_aedat2_reader():
                _run_jobs(jobs, 'CIFAR10-DVS aedat->npz')
        else:
            d, jobs = os.path.join(extract, 'DvsGesture'), []
            for split in ('train', 'test'):
                for label in range(11):  # the folders DVS128Gesture.create_events_np_files makes
                    os.makedirs(os.path.join(tmp, split, str(label)))
                jobs += [(_convert_gesture_trial, os.path.join(d, tr), os.path.join(tmp, split))
                         for tr in _trials(os.path.join(d, f'trials_to_{split}.txt'))]
            _run_jobs(jobs, 'DVS128 Gesture aedat->npz')


def _prepare_frames(cls, root, frames, split_by):
    """Integrate every events file with spikingjelly's
    ``integrate_events_file_to_frames_file_by_fixed_frames_number`` into the folder name
    spikingjelly's constructor looks for (``frames_number_<T>_split_by_<s>``)."""
    events_np = os.path.join(root, 'events_np')
    frames_root = os.path.join(root, f'frames_number_{frames}_split_by_{split_by}')
    want = _npz_files(events_np)
    if os.path.isdir(frames_root):
        if _npz_files(frames_root) != want:
            raise RuntimeError(f'{frames_root} does not match {events_np} (interrupted integration?); '
                               'delete it and retry')
        return
    H, W = cls.get_H_W()
    with _partial_dir(frames_root) as tmp:
        for r, _, _ in os.walk(events_np):
            os.makedirs(os.path.join(tmp, os.path.relpath(r, events_np)), exist_ok=True)
        jobs = [(sjds.integrate_events_file_to_frames_file_by_fixed_frames_number, cls.load_events_np,
                 os.path.join(events_np, rel), os.path.join(tmp, os.path.dirname(rel)), split_by, frames, H, W)
                for rel in want]
        _run_jobs(jobs, f'integrate {frames} frames')


# ----------------------------------------------------------------------------- datasets
def split_per_class(targets, train_ratio=0.9, num_classes=10):
    """Indices of ``spikingjelly.datasets.split_to_train_test_set(train_ratio, ds, num_classes,
    random_split=False)``: per class, the first ceil(ratio*n) samples in dataset order go to
    train, the rest to test (train indices class by class, then test likewise).  Reads the
    labels from ``targets`` instead of loading every frame file as spikingjelly does."""
    per_class = [[] for _ in range(num_classes)]
    for i, y in enumerate(targets):
        per_class[int(y)].append(i)
    train, test = [], []
    for idx in per_class:
        k = math.ceil(len(idx) * train_ratio)
        train += idx[:k]
        test += idx[k:]
    return train, test


class DVSFrames(torch.utils.data.Dataset):
    """A view of a spikingjelly frame dataset (optionally a subset) yielding
    (float32 tensor [T, 2, H, W] of per-pixel event counts, int label)."""

    def __init__(self, base, indices=None, transform=None):
        self.base, self.transform = base, transform
        self.indices = list(range(len(base))) if indices is None else list(indices)

    def __len__(self):
        return len(self.indices)

    @property
    def targets(self):
        return [self.base.targets[i] for i in self.indices]

    @property
    def classes(self):
        return self.base.classes  # of the whole dataset, also for a split that misses a class

    def path(self, i):
        return self.base.samples[self.indices[i]][0]

    def __getitem__(self, i):
        x, y = self.base[self.indices[i]]  # sjds.load_npz_frames already casts to float32
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if self.transform is not None:
            x = self.transform(x)
        return x, int(y)


def build_dvs_datasets(name, root, frames=16, split_by='number', train_transform=None, test_transform=None):
    """(train_ds, test_ds) for 'cifar10_dvs' (per-class 90/10 split, docs/original.md §6.3) or
    'dvs128_gesture' (official trials_to_train/test split, docs/original.md §6.4).

    Samples are float32 [frames, 2, 128, 128] event counts, labels are spikingjelly's
    DatasetFolder indices (sorted folder names: CIFAR10 class order for CIFAR10-DVS; for
    DVS128 Gesture the folders '0'..'10' sort as strings, so '10' is index 2 -- kept as is
    because the reference runs trained with that mapping).  Pass ``DVSTrainTransform()`` as
    ``train_transform`` for the training recipe; the test transform is the identity."""
    if name not in _ARCHIVES:
        raise ValueError(f'unknown DVS dataset {name!r}; expected one of {sorted(_ARCHIVES)}')
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"'{root}' does not exist.\n" + _layout_help(name, root))
    _prepare_events_np(name, root)
    cls = CIFAR10DVS if name == 'cifar10_dvs' else DVS128Gesture
    _prepare_frames(cls, root, frames, split_by)
    kw = dict(data_type='frame', frames_number=frames, split_by=split_by)
    if name == 'cifar10_dvs':
        full = CIFAR10DVS(root, **kw)
        tr, te = split_per_class(full.targets, 0.9, 10)
        return DVSFrames(full, tr, train_transform), DVSFrames(full, te, test_transform)
    return (DVSFrames(DVS128Gesture(root, train=True, **kw), None, train_transform),
            DVSFrames(DVS128Gesture(root, train=False, **kw), None, test_transform))


# ----------------------------------------------------------------------------- augmentation
class SNNAugmentWide(torch.nn.Module):
    """docs/original.md §6.3: one op uniformly from {Identity, ShearX, TranslateX, TranslateY, Rotate,
    Cutout}; magnitude uniformly one of 31 bins, sign flipped with probability 1/2.  The
    same geometric warp is applied to every frame/polarity of the [..., C, H, W] input.
    ShearX follows the torchvision autoaugment op of the original code's era: shear angle
    degrees(m) about the image centre."""

    OPS = ('Identity', 'ShearX', 'TranslateX', 'TranslateY', 'Rotate', 'Cutout')

    def __init__(self, num_bins=31, interpolation=InterpolationMode.NEAREST, fill=0.0):
        super().__init__()
        self.interpolation, self.fill = interpolation, fill
        self.bins = {'ShearX': torch.linspace(-0.3, 0.3, num_bins),
                     'TranslateX': torch.linspace(-5.0, 5.0, num_bins),
                     'TranslateY': torch.linspace(-5.0, 5.0, num_bins),
                     'Rotate': torch.linspace(-30.0, 30.0, num_bins)}
        self.cutout = v2.RandomErasing(p=1.0, scale=(0.001, 0.11), ratio=(1.0, 1.0), value=0)

    def apply_op(self, x, op, m=0.0):
        kw = dict(interpolation=self.interpolation, fill=self.fill)
        if op == 'Identity':
            return x
        if op == 'ShearX':
            return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[math.degrees(m), 0.0], **kw)
        if op == 'TranslateX':
            return TF.affine(x, angle=0.0, translate=[int(m), 0], scale=1.0, shear=[0.0, 0.0], **kw)
        if op == 'TranslateY':
            return TF.affine(x, angle=0.0, translate=[0, int(m)], scale=1.0, shear=[0.0, 0.0], **kw)
        if op == 'Rotate':
            return TF.rotate(x, float(m), **kw)
        if op == 'Cutout':
            return self.cutout(x)
        raise ValueError(op)

    def forward(self, x):
        op = self.OPS[int(torch.randint(len(self.OPS), ()))]
        m = 0.0
        if op in self.bins:
            b = self.bins[op]
            m = float(b[int(torch.randint(len(b), ()))])
            if torch.rand(()) < 0.5:
                m = -m
        return self.apply_op(x, op, m)


class DVSTrainTransform(torch.nn.Module):
    """Per-sample train augmentation on a [T, 2, H, W] tensor: RandomHorizontalFlip(p) then
    SNNAugmentWide, one draw shared by all frames (docs/original.md §6.3; Mixup happens on the batch)."""

    def __init__(self, flip_p=0.5):
        super().__init__()
        self.flip = v2.RandomHorizontalFlip(flip_p)
        self.augment = SNNAugmentWide()

    def forward(self, x):
        return self.augment(self.flip(x))
