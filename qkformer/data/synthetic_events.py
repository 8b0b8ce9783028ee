"""Writers of small SYNTHETIC raw event recordings in the real on-disk formats.

They exist so that the neuromorphic data layer (``qkformer.data.dvs``) can be
exercised end to end -- through spikingjelly 0.0.0.0.14's own raw parsers --
without the real CIFAR10-DVS / DVS128 Gesture downloads.  The bit layouts below
are the ones those parsers decode (``spikingjelly.datasets.cifar10_dvs`` for
AEDAT 2.0 and ``spikingjelly.datasets.load_aedat_v3`` for AEDAT 3.1).

Events are class dependent (a Gaussian blob whose centre depends on the label)
so a tiny model could in principle separate the classes.
"""
import math
import os
import struct

import numpy as np

# class folders = spikingjelly's archive names (airplane.zip ...), sorted = label order
from .dvs import CIFAR10_DVS_CLASSES


def _blob_events(rng, n, label, num_classes, t0=0, t1=None, sigma=7.0):
    """n events around a label-dependent centre, time-sorted, polarity random."""
    ang = 2 * math.pi * label / num_classes
    cx, cy = 64 + 38 * math.cos(ang), 64 + 38 * math.sin(ang)
    x = np.clip(np.rint(rng.normal(cx, sigma, n)), 0, 127).astype(np.int64)
    y = np.clip(np.rint(rng.normal(cy, sigma, n)), 0, 127).astype(np.int64)
    p = rng.integers(0, 2, n)
    if t1 is None:  # strictly increasing timestamps, 1..20 us apart
        t = t0 + np.cumsum(rng.integers(1, 21, n))
    else:
        t = np.sort(rng.integers(t0, t1, n))
    return x, y, p, t.astype(np.int64)


def write_aedat2(path, x, y, p, t):
    """CIFAR10-DVS style AEDAT 2.0: '#' header lines, then big-endian (uint32 address,
    uint32 timestamp) records.  spikingjelly decodes x_raw = bits 1-7, y_raw = bits 8-14,
    pol_raw = bit 0 and returns x = 127 - y_raw, y = 127 - x_raw, p = 1 - pol_raw, so the
    address is built from the inverse of that mapping."""
    x, y, p, t = (np.asarray(a, dtype=np.int64) for a in (x, y, p, t))
    addr = ((127 - x) << 8) | ((127 - y) << 1) | (1 - p)
    rec = np.empty((len(t), 2), dtype='>u4')
    rec[:, 0], rec[:, 1] = addr, t
    with open(path, 'wb') as f:
        f.write(b'#!AER-DAT2.0\r\n'
                b'# synthetic recording written by qkformer.data.synthetic_events\r\n'
                b'# records: int32 address, int32 timestamp (us), big endian\r\n')
        f.write(rec.tobytes())


def write_aedat31(path, x, y, p, t, packet_events=1000):
    """DVS128 Gesture style AEDAT 3.1: '#' header ending in '#!END-HEADER\\r\\n', then
    packets of a 28-byte little-endian header (type, source, size, tsOffset, tsOverflow,
    capacity, number, valid) and 8-byte events (uint32 data, int32 timestamp).  Polarity
    packets (type 1) carry data = x<<17 | y<<2 | p<<1 | valid; a leading special-event
    packet (type 0) is included because real files have them and parsers must skip it."""
    x, y, p, t = (np.asarray(a, dtype=np.int64) for a in (x, y, p, t))
    ev = np.empty(len(t), dtype=[('data', '<u4'), ('ts', '<i4')])
    ev['data'] = (x << 17) | (y << 2) | (p << 1) | 1
    ev['ts'] = t
    with open(path, 'wb') as f:
        f.write(b'#!AER-DAT3.1\r\n#Format: RAW\r\n#Source 1: DVS128\r\n#!END-HEADER\r\n')
        special = np.zeros(1, dtype=ev.dtype)
        f.write(struct.pack('<HHIIIIII', 0, 1, 8, 4, 0, 1, 1, 1) + special.tobytes())
        for s in range(0, len(ev), packet_events):
            chunk = ev[s:s + packet_events]
            n = len(chunk)
            f.write(struct.pack('<HHIIIIII', 1, 1, 8, 4, 0, n, n, n) + chunk.tobytes())


def make_synthetic_cifar10_dvs(root, per_class=3, n_events=(1000, 2000), seed=0):
    """Write ``root/extract/<class>/cifar10_<class>_<k>.aedat`` (the unzipped layout of the
    official archives).  ``per_class`` is an int or one count per class.
    Returns {'<class>/<stem>': (label, number_of_events)}."""
    rng = np.random.default_rng(seed)
    counts = [per_class] * 10 if isinstance(per_class, int) else list(per_class)
    meta = {}
    for label, (cls, k_n) in enumerate(zip(CIFAR10_DVS_CLASSES, counts)):
        d = os.path.join(root, 'extract', cls)
        os.makedirs(d, exist_ok=True)
        for k in range(k_n):
            n = int(rng.integers(n_events[0], n_events[1] + 1))
            stem = f'cifar10_{cls}_{k}'
            write_aedat2(os.path.join(d, stem + '.aedat'), *_blob_events(rng, n, label, 10))
            meta[f'{cls}/{stem}'] = (label, n)
    return meta


def make_synthetic_dvs128_gesture(root, train_trials=('user01_fluorescent', 'user02_led'),
                                  test_trials=('user24_natural',), events_per_gesture=(200, 400),
                                  seed=0):
    """Write ``root/extract/DvsGesture/`` with one AEDAT 3.1 file per trial, its
    ``<trial>_labels.csv`` (class,startTime_usec,endTime_usec; all 11 gestures, classes 1..11)
    and ``trials_to_train.txt`` / ``trials_to_test.txt``.  Between gesture windows a few
    off-window events are written, which the per-gesture slicing must drop.
    Returns {'train'|'test': {trial: [(gesture 1..11, events inside its window), ...]}}."""
    rng = np.random.default_rng(seed)
    d = os.path.join(root, 'extract', 'DvsGesture')
    os.makedirs(d, exist_ok=True)
    meta = {'train': {}, 'test': {}}
    for split, trials in (('train', train_trials), ('test', test_trials)):
        with open(os.path.join(d, f'trials_to_{split}.txt'), 'w') as f:
            f.write(''.join(f'{tr}.aedat\n' for tr in trials))
        for tr in trials:
            parts, rows, t = [], [], 1_000_000
            for g in range(1, 12):
                parts.append(_blob_events(rng, 30, 0, 1, t, t + 50_000))  # off-window noise
                start, end = t + 100_000, t + 1_100_000
                n = int(rng.integers(events_per_gesture[0], events_per_gesture[1] + 1))
                parts.append(_blob_events(rng, n, g - 1, 11, start, end))
                rows.append((g, start, end, n))
                t = end + 200_000
            x, y, p, ts = (np.concatenate(a) for a in zip(*parts))
            write_aedat31(os.path.join(d, tr + '.aedat'), x, y, p, ts)
            with open(os.path.join(d, tr + '_labels.csv'), 'w') as f:
                f.write('class,startTime_usec,endTime_usec\n')
                f.write(''.join(f'{g},{s},{e}\n' for g, s, e, _ in rows))
            meta[split][tr] = [(g, n) for g, _, _, n in rows]
    return meta
