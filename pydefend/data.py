"""Datasets for training and evaluating backdoored classifiers.

Every loader returns a :class:`Dataset` whose images are float32 tensors in
[0, 1] laid out NCHW and whose labels are int64. Nothing is downloaded: the
sources are the Debian package ``dataset-fashion-mnist``, scikit-learn's
bundled ``load_digits``, and the user's own ``.npz`` files, image folders or
torch Datasets (whose images may be normalised any way; the others lie in [0, 1]).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# IDX type codes (third byte of the magic number) -> numpy big-endian dtype.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclass
class Dataset:
    """Train and test images (N, C, H, W) in [0, 1] with int64 labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dim() != 4:
                raise ValueError(f"{self.name}: x_{split} must be N×C×H×W, got shape {tuple(x.shape)}")
            if y.shape != (x.shape[0],):
                raise ValueError(
                    f"{self.name}: y_{split} has shape {tuple(y.shape)}, expected ({x.shape[0]},)")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(f"{self.name}: train images {tuple(self.x_train.shape[1:])} and test "
                             f"images {tuple(self.x_test.shape[1:])} differ in shape")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image."""
        return tuple(self.x_train.shape[1:])

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.x_train.shape[2:])

    def subset(self, n_train: int | None = None, n_test: int | None = None,
               seed: int | None = None) -> "Dataset":
        """A smaller copy: the first n samples, or n drawn at random when ``seed`` is given."""
        return Dataset(
            name=self.name,
            x_train=_take(self.x_train, n_train, seed), y_train=_take(self.y_train, n_train, seed),
            x_test=_take(self.x_test, n_test, seed), y_test=_take(self.y_test, n_test, seed),
            num_classes=self.num_classes,
        )


def _take(t: torch.Tensor, n: int | None, seed: int | None) -> torch.Tensor:
    if n is None or n >= t.shape[0]:
        return t
    if n <= 0:
        raise ValueError(f"subset size must be positive, got {n}")
    if seed is None:
        return t[:n]
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(t.shape[0], generator=generator)[:n]
    return t[index.sort().values]


def stratified_split(labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (selected, rest) so each class keeps ``fraction`` of its samples.

    Every class with at least two samples contributes at least one index to
    each side. Both arrays are sorted.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    selected = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        count = int(round(fraction * len(members)))
        if len(members) >= 2:
            count = min(max(count, 1), len(members) - 1)
        selected.append(members[:count])
    selected = np.sort(np.concatenate(selected)).astype(np.int64)
    rest = np.setdiff1d(np.arange(len(labels)), selected).astype(np.int64)
    return selected, rest


def clean_split(dataset: Dataset, fraction: float = 0.05, seed: int = 0) -> torch.Tensor:
    """Indices into the *training* set for the defender's clean data.

    The defender only ever sees clean training images; the test set is kept
    for metrics. Stratified by class, sorted, deterministic in ``seed``.
    """
    if fraction == 1:  # the whole training set is the defender's clean data
        return torch.arange(dataset.y_train.shape[0])
    selected, _ = stratified_split(dataset.y_train.numpy(), fraction, seed)
    return torch.from_numpy(selected)


# ----------------------------------------------------------------------------
# Fashion-MNIST (IDX files from the Debian package)

def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one IDX file (optionally gzip-compressed) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header promises {expected} data bytes, file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}; install the Debian package "
        f"'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist) or pass its directory")


def load_fashion_mnist(root: str | os.PathLike | None = None) -> Dataset:
    """Fashion-MNIST: 60,000 train / 10,000 test images, 1×28×28, 10 classes."""
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.shape != (images.shape[0],):
            raise ValueError(f"{root}: unexpected {split} shapes {images.shape} / {labels.shape}")
        arrays[split] = (_to_image_tensor(images, f"fashion_mnist {split}"),
                         torch.from_numpy(labels.astype(np.int64)))
    return Dataset("fashion_mnist", *arrays["train"], *arrays["test"], num_classes=10)


# ----------------------------------------------------------------------------
# scikit-learn digits

def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 8×8 digits (1,797 images, values 0..16), stratified split."""
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as exc:
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn") from exc
    bunch = sklearn_load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    test_idx, train_idx = stratified_split(labels.numpy(), test_fraction, seed)
    return Dataset("digits", images[train_idx], labels[train_idx], images[test_idx], labels[test_idx],
                   num_classes=10)


# ----------------------------------------------------------------------------
# User data

def _to_image_tensor(x: np.ndarray, source: str) -> torch.Tensor:
    """uint8 0..255 or float 0..1 arrays, N×H×W or N×C×H×W -> float32 NCHW in [0, 1]."""
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"{source}: images must be N×H×W or N×C×H×W, got shape {x.shape}")
    if x.dtype == np.uint8:
        return torch.from_numpy(x.astype(np.float32) / 255.0)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{source}: images must be uint8 (0..255) or float (0..1), got {x.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{source}: images contain NaN or infinite values")
    if x.size and (x.min() < 0.0 or x.max() > 1.0):
        raise ValueError(f"{source}: float images must lie in [0, 1], got range "
                         f"[{x.min():.3g}, {x.max():.3g}]; pass uint8 for 0..255 data")
    return torch.from_numpy(x)


# Classes a label may index: ImageNet-21k's 21,841 with room to spare, never a count that exhausts memory.
MAX_CLASSES = 1_000_000


def _to_labels(y: np.ndarray, count: int, source: str) -> torch.Tensor:
    y = np.asarray(y)
    if y.shape != (count,):
        raise ValueError(f"{source}: labels must have shape ({count},), got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{source}: labels must be integers, got {y.dtype}")
    if y.size and y.min() < 0:
        raise ValueError(f"{source}: labels must be non-negative, got {y.min()}")
    if y.size and y.max() >= MAX_CLASSES:
        raise ValueError(f"{source}: labels must be class indices below {MAX_CLASSES:,}, got {y.max()}")
    return torch.from_numpy(y.astype(np.int64))


def load_npz(path: str | os.PathLike, test: str | None = None) -> Dataset:
    """Arrays ``x_train``/``y_train``/``x_test``/``y_test``, or ``x`` and ``y`` with the test set from ``test``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such .npz file: {path}")
    with _open_npz(path) as archive:
        keys = set(archive.files)
        if {"x_train", "y_train", "x_test", "y_test"} <= keys:
            if test is not None:
                raise ValueError(f"{path} holds its own test split (x_test, y_test): drop --test-data")
            return _dataset(path.stem, *_npz_pair(archive, path, "_train"), *_npz_pair(archive, path, "_test"))
        if not {"x", "y"} <= keys:
            raise ValueError(f"{path} must contain arrays 'x' and 'y' (or x_train, y_train, x_test, "
                             f"y_test); found {sorted(keys)}")
        x, y = _npz_pair(archive, path)
    return _with_test(path.stem, x, y, test)


@contextlib.contextmanager
def _open_npz(path: Path):
    """An .npz archive, with a broken or foreign file reported as a ValueError naming it."""
    try:
        # allow_pickle=False: object arrays in an untrusted file could run code.
        archive = np.load(path, allow_pickle=False)
    except (EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path} is not a readable .npz archive: {exc}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds one array, not an .npz archive of named arrays (np.savez writes one)")
    with archive:
        try:
            yield archive
        except (EOFError, zipfile.BadZipFile, KeyError) as exc:
            raise ValueError(f"{path} is a damaged .npz archive: {exc}") from None


def _npz_pair(archive, path: Path, suffix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Arrays x{suffix} and y{suffix} of an open .npz as images and labels."""
    x = _to_image_tensor(archive[f"x{suffix}"], f"{path}:x{suffix}")
    return x, _to_labels(archive[f"y{suffix}"], x.shape[0], f"{path}:y{suffix}")


def _dataset(name, x_train, y_train, x_test, y_test) -> Dataset:
    if x_train.shape[0] == 0 or x_test.shape[0] == 0:
        raise ValueError(f"{name}: the training and test sets must both hold images")
    return Dataset(name, x_train, y_train, x_test, y_test, int(max(y_train.max(), y_test.max())) + 1)


def _with_test(name: str, x: torch.Tensor, y: torch.Tensor, test: str | None) -> Dataset:
    """A single split is training data; its test set must come from elsewhere, so that no test image can be
    one the model was trained on (pydefend never re-splits your data)."""
    if test is None:
        raise ValueError(f"{name} is one split of images: name its test set with --test-data (a .npz with x and "
                         f"y, an image folder or module:factory); pydefend does not split your data itself, since a "
                         f"split of its own could put your training images in the test set")
    x_test, y_test = load_split(test)
    return _dataset(name, x, y, x_test, y_test)


def load_split(spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split (images, labels): a .npz with x and y, an image folder, or module:factory."""
    path = Path(spec)
    if path.suffix == ".npz":
        if not path.is_file():
            raise FileNotFoundError(f"no such .npz file: {path}")
        with _open_npz(path) as archive:
            if not {"x", "y"} <= set(archive.files):
                raise ValueError(f"{path}: a test set needs arrays 'x' and 'y', found {sorted(archive.files)}")
            return _npz_pair(archive, path)
    if path.is_dir():
        return _read_image_folder(path)
    if ":" in spec:
        return _from_torch_dataset(spec)
    raise FileNotFoundError(f"unknown data {spec!r}: expected a .npz file, an image folder or module:factory")


def _from_torch_dataset(spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (image, label) of the torch Dataset that module:factory (or file.py:factory) returns."""
    from .modelspec import _load_code  # the same import rules as a model's code

    dataset = _load_code(spec)()
    try:
        count = len(dataset)
    except TypeError:
        raise ValueError(f"{spec} returned {type(dataset).__name__}, not a map-style torch Dataset") from None
    images, labels = [], []
    for index in range(count):
        item = dataset[index]
        if not (isinstance(item, (tuple, list)) and len(item) >= 2):
            raise ValueError(f"{spec}: item {index} is not an (image, label) pair")
        image = torch.as_tensor(item[0], dtype=torch.float32)
        if image.dim() == 2:
            image = image[None]
        images.append(image)
        labels.append(int(item[1]))
    if not images:
        raise ValueError(f"{spec} holds no images")
    x = torch.stack(images)
    if not torch.isfinite(x).all():
        raise ValueError(f"{spec}: images contain NaN or infinite values")
    return x, _to_labels(np.asarray(labels), len(labels), spec)


def load_image_folder(path: str | os.PathLike, test: str | None = None) -> Dataset:
    """Training images from a folder (one sub-folder per class), the test set from ``test``."""
    root = Path(path)
    x, y = _read_image_folder(root)
    if test is not None and Path(test).is_dir():
        train_classes, test_classes = ([d.name for d in _class_dirs(r)] for r in (root, Path(test)))
        if train_classes != test_classes:
            raise ValueError(f"{root} and {test} hold different class folders ({', '.join(train_classes)} vs "
                             f"{', '.join(test_classes)}); labels follow the sorted folder names, so both need "
                             f"the same ones")
    return _with_test(root.name, x, y, test)


def _class_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"no such image folder: {root}")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir())
    if len(class_dirs) < 2:
        raise ValueError(f"{root} must hold one sub-folder per class (found {len(class_dirs)})")
    return class_dirs


def _read_image_folder(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One sub-folder per class (sorted names -> labels 0..K-1); all images the same size.

    Images are read as grayscale when every image is grayscale, RGB otherwise.
    """
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("reading an image folder needs Pillow: pip install pillow") from exc
    files, labels = [], []
    for label, class_dir in enumerate(_class_dirs(root)):
        members = sorted(f for f in class_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not members:
            raise ValueError(f"class folder {class_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files += members
        labels += [label] * len(members)
    modes = set()
    for f in files:
        with Image.open(f) as image:  # reads the header only
            modes.add(image.mode)
    mode = "L" if modes <= {"L", "1", "I;16"} else "RGB"
    arrays = []
    for f in files:
        with Image.open(f) as image:
            arrays.append(np.asarray(image.convert(mode)))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"{root}: images differ in size {sorted(shapes)}; resize them to one size")
    stacked = np.stack(arrays)
    if mode == "RGB":
        stacked = stacked.transpose(0, 3, 1, 2)
    x = _to_image_tensor(np.ascontiguousarray(stacked), str(root))
    return x, torch.tensor(labels, dtype=torch.int64)


_SIZE_SUFFIX = re.compile(r"^(?P<base>.+)@(?P<height>[1-9][0-9]*)(?:x(?P<width>[1-9][0-9]*))?$")


def resized(dataset: Dataset, size) -> Dataset:
    """Every image area-averaged (box-filtered) to ``size`` (an int or (H, W)).

    Computed in float64 and rounded once, so the images do not depend on the CPU's kernels.
    """
    height, width = (size, size) if isinstance(size, int) else size

    def resize(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.interpolate(chunk.double(), size=(height, width), mode="area").float()
                          for chunk in x.split(8192)])

    return Dataset(f"{dataset.name.split('@')[0]}@{height}x{width}", resize(dataset.x_train), dataset.y_train,
                   resize(dataset.x_test), dataset.y_test, dataset.num_classes)


NAMED_DATASETS = ("digits", "fashion_mnist", "fashion-mnist")
# Both sides of a resized image; far beyond any classifier's input, well short of exhausting memory by mistake.
MAX_IMAGE_SIDE = 4096


def split_base(spec: str) -> str:
    """``spec`` without its ``@HxW`` resize suffix."""
    match = _SIZE_SUFFIX.match(spec)
    return match["base"] if match else spec


def names_code(spec: str | None) -> bool:
    """Whether loading ``spec`` imports Python code (``module:factory`` or ``file.py:factory``)."""
    if spec is None:
        return False
    base = split_base(spec)
    return ":" in base and Path(base).suffix != ".npz" and not Path(base).is_dir()


def absolute_spec(spec: str | None) -> str | None:
    """``spec`` with a file or folder named by its absolute path (and a ``file.py:factory`` by its file's), so
    that a checkpoint's record of its data works from any directory."""
    if spec is None:
        return None
    match = _SIZE_SUFFIX.match(spec)
    base, suffix = (match["base"], spec[len(match["base"]):]) if match else (spec, "")
    location, sep, attr = base.rpartition(":")
    if sep and location.endswith(".py") and Path(location).is_file():
        return f"{Path(location).resolve()}:{attr}{suffix}"
    if Path(base).exists():
        return f"{Path(base).resolve()}{suffix}"
    return spec


def load_dataset(spec: str, seed: int = 0, test: str | None = None) -> Dataset:
    """'digits', 'fashion_mnist', a ``.npz`` file, an image folder or ``module:factory`` (a torch Dataset), with
    the test set from ``test`` where the source is one split. ``SPEC@HxW`` (or ``@N``) resizes every image to
    H×W (N×N) by area averaging, e.g. ``fashion_mnist@16x16``."""
    match = _SIZE_SUFFIX.match(spec)
    if match:
        height = int(match["height"])
        width = int(match["width"] or height)
        if max(height, width) > MAX_IMAGE_SIDE:
            raise ValueError(f"{spec}: images can be resized to at most {MAX_IMAGE_SIDE} pixels a side")
        return resized(load_dataset(match["base"], seed, test), (height, width))
    if spec in NAMED_DATASETS and test is not None:
        raise ValueError(f"{spec} has its own test split: drop --test-data")
    if spec == "digits":
        return load_digits(seed=seed)
    if spec in ("fashion_mnist", "fashion-mnist"):
        return load_fashion_mnist()
    path = Path(spec)
    if path.suffix == ".npz":
        return load_npz(path, test)
    if path.is_dir():
        return load_image_folder(path, test)
    if ":" in spec:
        x, y = _from_torch_dataset(spec)
        return _with_test(spec, x, y, test)
    raise FileNotFoundError(f"unknown dataset {spec!r}: expected 'digits', 'fashion_mnist', an existing .npz "
                            f"file, an image folder or module:factory, optionally with @HxW to resize")
