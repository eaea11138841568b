"""Fashion-MNIST from its IDX files.

Fashion-MNIST (Xiao, Rasul and Vollgraf, "Fashion-MNIST: a Novel Image Dataset for Benchmarking
Machine Learning Algorithms", 2017): 60,000 training and 10,000 test images of 28×28 grey
pixels in 10 classes, shipped as four IDX files (LeCun's MNIST format), usually gzipped.
Debian's package ``dataset-fashion-mnist`` installs them in
:data:`DEFAULT_FASHION_MNIST_PATH`.

IDX layout (all integers big-endian): two zero bytes, a type byte (``0x08`` = unsigned byte),
a byte giving the number of dimensions ``d``, then ``d`` uint32 sizes, then the payload in
C order. Image files therefore start with the magic number ``0x00000803`` and label files
with ``0x00000801``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from pathlib import Path

import numpy as np

from shoal.data import Dataset
from shoal.errors import DataError

__all__ = [
    "DEFAULT_FASHION_MNIST_PATH",
    "ENV_VAR",
    "default_fashion_mnist_path",
    "load_fashion_mnist",
]

DEFAULT_FASHION_MNIST_PATH = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` package installs the four IDX files."""

ENV_VAR = "SHOAL_FASHION_MNIST"
"""Environment variable that overrides :data:`DEFAULT_FASHION_MNIST_PATH`."""

NUM_CLASSES = 10
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

_IMAGES_MAGIC = 0x00000803
_LABELS_MAGIC = 0x00000801
_ROWS = _COLS = 28
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_HOW_TO_GET = (
    "install it with `apt-get install dataset-fashion-mnist` (as root), or set "
    f"{ENV_VAR} (or the config's data.path) to a directory holding another copy of "
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
    "and t10k-labels-idx1-ubyte.gz"
)


def default_fashion_mnist_path() -> str:
    """The Fashion-MNIST directory: ``$SHOAL_FASHION_MNIST`` if set and non-empty, else
    :data:`DEFAULT_FASHION_MNIST_PATH`."""
    return os.environ.get(ENV_VAR) or DEFAULT_FASHION_MNIST_PATH


def load_fashion_mnist(
    path: str | os.PathLike[str] | None = None, *, flatten: bool = True
) -> tuple[Dataset, Dataset]:
    """Load the Fashion-MNIST training and test sets.

    Each of the four files is read as ``<name>.gz`` if present, else as the un-gzipped
    ``<name>``. Pixels are scaled to [0, 1] as ``byte / 255`` in float32 (the same values as
    torchvision's ``ToTensor``).

    Args:
        path: directory holding the IDX files; ``None`` means
            :func:`default_fashion_mnist_path`.
        flatten: ``True`` gives features of shape ``(n, 784)``, ``False`` ``(n, 1, 28, 28)``.

    Returns:
        ``(train, test)``, 60,000 and 10,000 examples for the real data.

    Raises:
        DataError: the directory or a file is missing, a file is not valid gzip, is truncated,
            has the wrong magic number or dimensions, a label is >= 10, or the image and label
            counts disagree. The message names the file; ``DataError.path`` holds it.
    """
    root = Path(default_fashion_mnist_path() if path is None else os.fspath(path))
    if not root.is_dir():
        raise DataError(
            f"Fashion-MNIST not found: directory {str(root)!r} does not exist; {_HOW_TO_GET}",
            path=str(root),
        )
    shape = (_ROWS * _COLS,) if flatten else (1, _ROWS, _COLS)
    cached = _cache_load(root, shape)
    if cached is not None:
        return cached
    splits = []
    for split, (images_name, labels_name) in _FILES.items():
        images_path = _find(root, images_name)
        labels_path = _find(root, labels_name)
        images = _parse_idx(_read(images_path), _IMAGES_MAGIC, images_path)
        labels = _parse_idx(_read(labels_path), _LABELS_MAGIC, labels_path)
        if images.shape[1:] != (_ROWS, _COLS):
            raise DataError(
                f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, "
                f"Fashion-MNIST images are {_ROWS}x{_COLS}",
                path=str(images_path),
            )
        if len(images) != len(labels):
            raise DataError(
                f"{images_path} holds {len(images)} images but {labels_path} holds "
                f"{len(labels)} labels",
                path=str(labels_path),
            )
        if len(labels) and int(labels.max()) >= NUM_CLASSES:
            raise DataError(
                f"{labels_path}: labels must be < {NUM_CLASSES}, found {int(labels.max())}",
                path=str(labels_path),
            )
        # One pass: the ufunc casts uint8 to float32 and divides; no float64 intermediate.
        x = np.divide(images.reshape((len(images), *shape)), np.float32(255), dtype=np.float32)
        y = labels.astype(np.int64)
        splits.append(Dataset(x=x, y=y, num_classes=NUM_CLASSES, name=f"fashion-mnist/{split}"))
    train, test = splits
    _cache_save(root, train, test)
    return train, test


# -- decoded cache -----------------------------------------------------------------------------
#
# Decompressing and converting the IDX files costs about a second per process; `shoal launch`
# starts one process per device and the benchmarks one per variant. The decoded float32 arrays
# are kept as .npy files keyed by the source files' paths, sizes and modification times, and
# mapped copy-on-write (np.load mmap_mode="c"): no parse, no copy, pages come from the OS page
# cache on first touch. Set SHOAL_NO_CACHE=1 to disable; SHOAL_CACHE_DIR moves it.

_CACHE_VERSION = "fmnist-v1"


def _cache_dir() -> Path | None:
    if os.environ.get("SHOAL_NO_CACHE"):
        return None
    base = os.environ.get("SHOAL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "shoal")
    return Path(base)


def _cache_key(root: Path) -> str | None:
    parts: list[object] = [_CACHE_VERSION]
    try:
        for images_name, labels_name in _FILES.values():
            for name in (images_name, labels_name):
                p = _find(root, name)
                st = p.stat()
                parts += [str(p.resolve()), st.st_size, st.st_mtime_ns]
    except (DataError, OSError):
        return None
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]


def _cache_paths(root: Path) -> dict[str, Path] | None:
    directory, key = _cache_dir(), _cache_key(root)
    if directory is None or key is None:
        return None
    return {f"{split}-{part}": directory / f"fashion-mnist-{key}-{split}-{part}.npy"
            for split in _FILES for part in ("x", "y")}


def _cache_load(root: Path, shape: tuple[int, ...]) -> tuple[Dataset, Dataset] | None:
    paths = _cache_paths(root)
    if paths is None or not all(p.is_file() for p in paths.values()):
        return None
    try:
        out = []
        for split in _FILES:
            x = np.load(paths[f"{split}-x"], mmap_mode="c", allow_pickle=False)
            y = np.load(paths[f"{split}-y"], allow_pickle=False)
            out.append(Dataset(x=x.reshape((len(x), *shape)), y=y, num_classes=NUM_CLASSES,
                               name=f"fashion-mnist/{split}"))
    except (OSError, ValueError, DataError):
        return None  # unreadable or inconsistent cache: parse the source files again
    return out[0], out[1]


def _cache_save(root: Path, train: Dataset, test: Dataset) -> None:
    paths = _cache_paths(root)
    if paths is None:
        return
    try:
        next(iter(paths.values())).parent.mkdir(parents=True, exist_ok=True)
        for split, ds in zip(_FILES, (train, test)):
            for part, arr in (("x", ds.x.reshape(len(ds), -1)), ("y", ds.y)):
                target = paths[f"{split}-{part}"]
                tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                with open(tmp, "wb") as f:
                    np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
                os.replace(tmp, target)
    except OSError:
        pass  # a read-only home or a full disk only costs the next process a parse


def _find(root: Path, name: str) -> Path:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"Fashion-MNIST file missing: neither {str(root / name)!r}.gz nor {str(root / name)!r} "
        f"exists; {_HOW_TO_GET}",
        path=str(root / f"{name}.gz"),
    )


def _read(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read: {exc}", path=str(path)) from exc
    if path.suffix != ".gz":
        return raw
    if raw[:2] != b"\x1f\x8b":
        raise DataError(f"{path}: not a gzip file (no gzip header)", path=str(path))
    try:
        return gzip.decompress(raw)
    except EOFError as exc:
        raise DataError(
            f"{path}: corrupt gzip file, the compressed stream is truncated ({exc})",
            path=str(path),
        ) from exc
    except (gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise DataError(f"{path}: corrupt gzip file ({exc})", path=str(path)) from exc


def _parse_idx(data: bytes, magic: int, path: Path) -> np.ndarray:
    """Parse an unsigned-byte IDX file into a uint8 array of its declared shape.

    The returned array is a read-only view of ``data`` (no copy).
    """
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    kind = "image" if magic == _IMAGES_MAGIC else "label"
    if len(data) < 4:
        raise DataError(
            f"{path}: truncated, {len(data)} bytes is shorter than the 4-byte IDX magic number",
            path=str(path),
        )
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(
            f"{path}: bad magic number 0x{found:08x}, an IDX {kind} file starts with "
            f"0x{magic:08x}",
            path=str(path),
        )
    if len(data) < header_len:
        raise DataError(
            f"{path}: truncated, {len(data)} bytes is shorter than the {header_len}-byte header "
            f"of a {ndim}-dimensional IDX file",
            path=str(path),
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    payload = len(data) - header_len
    if payload < expected:
        raise DataError(
            f"{path}: truncated, header declares shape {dims} ({expected} bytes of data) "
            f"but only {payload} bytes follow",
            path=str(path),
        )
    if payload > expected:
        raise DataError(
            f"{path}: header declares shape {dims} ({expected} bytes of data) but "
            f"{payload} bytes follow; {payload - expected} trailing bytes",
            path=str(path),
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)
