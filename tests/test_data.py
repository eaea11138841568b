"""Tests of shoal.data: datasets, the Fashion-MNIST IDX loader, Synthetic(α, β), partitions."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import entropy

import shoal.data
from shoal.data import (
    DEFAULT_FASHION_MNIST_PATH,
    PARTITION_METHODS,
    Dataset,
    FederatedData,
    default_fashion_mnist_path,
    load_fashion_mnist,
    make_synthetic,
    partition,
    partition_dirichlet,
    partition_fingerprint,
    partition_iid,
    partition_shards,
    summarize_partition,
)
from shoal.errors import ConfigError, DataError

REAL_PATH = default_fashion_mnist_path()
needs_real_data = pytest.mark.skipif(
    not os.path.isdir(REAL_PATH), reason=f"Fashion-MNIST not installed at {REAL_PATH}"
)


# --------------------------------------------------------------------------- Dataset


def _ds(n: int = 4, num_classes: int = 3) -> Dataset:
    return Dataset(
        x=np.zeros((n, 2), np.float32), y=np.arange(n, dtype=np.int64) % num_classes,
        num_classes=num_classes, name="t",
    )  # fmt: skip


def test_public_api_is_importable() -> None:
    for name in shoal.data.__all__:
        assert hasattr(shoal.data, name), name


def test_dataset_len_and_feature_shape() -> None:
    ds = Dataset(np.zeros((5, 1, 2, 3), np.float32), np.zeros(5, np.int64), 2, "t")
    assert len(ds) == 5
    assert ds.feature_shape == (1, 2, 3)


@pytest.mark.parametrize(
    ("x", "y", "k", "match"),
    [
        (np.zeros((3, 2), np.float32), np.zeros(4, np.int64), 2, "3 examples but y has 4"),
        (np.zeros((3, 2), np.float32), np.array([0, 2, 1]), 2, r"\[0, 2\).*max 2"),
        (np.zeros((3, 2), np.float32), np.array([0, -1, 1]), 2, "min -1"),
        (np.zeros((3, 2), np.float64), np.zeros(3, np.int64), 2, "float32"),
        (np.zeros((3, 2), np.float32), np.zeros(3, np.int32), 2, "int64"),
        (np.zeros((3, 2), np.float32), np.zeros(3, np.int64), 0, "num_classes must be >= 1"),
    ],
)
def test_dataset_rejects_inconsistent_arrays(x, y, k, match) -> None:
    with pytest.raises(DataError, match=match):
        Dataset(x, y, k, "bad")


def test_federated_data_sizes_summary_and_validation() -> None:
    train, test = _ds(6), _ds(2)
    parts = (np.array([0, 1, 2], np.int64), np.array([], np.int64), np.array([5, 3], np.int64))
    fd = FederatedData(train, test, parts)
    assert fd.num_clients == 3
    np.testing.assert_array_equal(fd.client_sizes(), [3, 0, 2])
    # labels are arange(6) % 3 = [0, 1, 2, 0, 1, 2]
    np.testing.assert_array_equal(fd.summary().label_counts, [[1, 1, 1], [0, 0, 0], [1, 0, 1]])
    with pytest.raises(DataError, match=r"\[0, 6\).*max 6"):
        FederatedData(train, test, (np.array([6], np.int64),))
    with pytest.raises(DataError, match=r"client_indices\[1\].*int64"):
        FederatedData(train, test, (np.array([0], np.int64), np.array([1], np.int32)))
    with pytest.raises(DataError, match="test_client_indices has 1 clients"):
        FederatedData(train, test, parts, test_client_indices=(np.array([0], np.int64),))


# --------------------------------------------------------------------------- IDX loader


def _idx(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + payload


def _images(n: int, fill: np.ndarray | None = None) -> bytes:
    pix = np.zeros((n, 28, 28), np.uint8) if fill is None else fill
    return _idx(0x803, (n, 28, 28), pix.tobytes())


def _labels(values: list[int]) -> bytes:
    return _idx(0x801, (len(values),), bytes(values))


def _write(root: Path, name: str, data: bytes, *, gz: bool = True) -> Path:
    path = root / (name + ".gz" if gz else name)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _write_dataset(root: Path, *, gz: bool = True, train_pixels: np.ndarray | None = None) -> None:
    train_pixels = np.zeros((3, 28, 28), np.uint8) if train_pixels is None else train_pixels
    _write(root, "train-images-idx3-ubyte", _images(len(train_pixels), train_pixels), gz=gz)
    _write(root, "train-labels-idx1-ubyte", _labels([9, 0, 4][: len(train_pixels)]), gz=gz)
    _write(root, "t10k-images-idx3-ubyte", _images(2), gz=gz)
    _write(root, "t10k-labels-idx1-ubyte", _labels([1, 2]), gz=gz)


def test_decoded_cache_is_reused_and_invalidated_by_a_changed_source(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setenv("SHOAL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SHOAL_NO_CACHE", raising=False)
    pix = np.zeros((3, 28, 28), np.uint8)
    pix[0, 0, 0] = 255
    src = tmp_path / "src"
    src.mkdir()
    _write_dataset(src, train_pixels=pix)
    first, _ = load_fashion_mnist(src)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 4
    again, test = load_fashion_mnist(src, flatten=False)
    assert isinstance(again.x, np.memmap) and again.x.shape == (3, 1, 28, 28)
    np.testing.assert_array_equal(again.x.reshape(3, -1), first.x)
    np.testing.assert_array_equal(again.y, first.y)
    # a changed source file (new content, new mtime) is parsed again, not served stale
    pix[0, 0, 0] = 51
    _write_dataset(src, train_pixels=pix)
    st = (src / "train-images-idx3-ubyte.gz").stat()
    os.utime(src / "train-images-idx3-ubyte.gz", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed, _ = load_fashion_mnist(src)
    assert changed.x[0, 0] == np.float32(0.2)
    # a corrupt cache file falls back to parsing
    for f in (tmp_path / "cache").glob("*train-x.npy"):
        f.write_bytes(b"garbage")
    assert load_fashion_mnist(src)[0].x[0, 0] == np.float32(0.2)


@pytest.mark.parametrize("gz", [True, False])
def test_loader_parses_idx_and_scales_pixels(tmp_path: Path, gz: bool) -> None:
    pix = np.zeros((3, 28, 28), np.uint8)
    pix[0, 0, 0], pix[0, 0, 1], pix[1, 27, 27], pix[2, 5, 3] = 255, 51, 102, 1
    _write_dataset(tmp_path, gz=gz, train_pixels=pix)
    train, test = load_fashion_mnist(tmp_path)
    assert train.x.shape == (3, 784) and train.x.dtype == np.float32
    assert test.x.shape == (2, 784)
    np.testing.assert_array_equal(train.y, [9, 0, 4])
    np.testing.assert_array_equal(test.y, [1, 2])
    assert train.y.dtype == np.int64 and train.num_classes == 10
    # Hand-computed: 255 -> 1, 51 -> 0.2, 102 -> 0.4, 1 -> 1/255; row-major flattening.
    assert train.x[0, 0] == 1.0 and train.x[0, 1] == np.float32(0.2)
    assert train.x[1, 783] == np.float32(0.4)
    assert train.x[2, 5 * 28 + 3] == np.float32(1) / np.float32(255)
    assert train.x.sum() == pytest.approx(1 + 0.2 + 0.4 + 1 / 255, rel=1e-6)
    img, _ = load_fashion_mnist(tmp_path, flatten=False)
    assert img.x.shape == (3, 1, 28, 28)
    assert img.x[1, 0, 27, 27] == np.float32(0.4) and img.x[2, 0, 5, 3] == train.x[2, 5 * 28 + 3]


def test_loader_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHOAL_FASHION_MNIST", raising=False)
    assert default_fashion_mnist_path() == DEFAULT_FASHION_MNIST_PATH
    assert DEFAULT_FASHION_MNIST_PATH == "/usr/share/datasets/fashion-mnist"
    _write_dataset(tmp_path)
    monkeypatch.setenv("SHOAL_FASHION_MNIST", str(tmp_path))
    assert default_fashion_mnist_path() == str(tmp_path)
    train, _ = load_fashion_mnist(None)
    assert len(train) == 3


def test_loader_missing_directory_says_how_to_get_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load_fashion_mnist(missing)
    msg = str(info.value)
    assert str(missing) in msg and "does not exist" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "SHOAL_FASHION_MNIST" in msg
    assert "data.path" in msg


def test_loader_missing_file_names_it(tmp_path: Path) -> None:
    _write_dataset(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*apt-get install") as info:
        load_fashion_mnist(tmp_path)
    assert "t10k-labels-idx1-ubyte" in info.value.path


def _corrupt(tmp_path: Path, name: str, data: bytes, *, raw: bool = False) -> str:
    """Write a valid dataset, replace one file, and return the loader's error message."""
    _write_dataset(tmp_path)
    path = tmp_path / f"{name}.gz"
    path.write_bytes(data if raw else gzip.compress(data))
    with pytest.raises(DataError) as info:
        load_fashion_mnist(tmp_path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    return str(info.value)


def test_loader_truncated_payload(tmp_path: Path) -> None:
    msg = _corrupt(tmp_path, "train-images-idx3-ubyte", _images(3)[:-100])
    assert "truncated" in msg and "2352 bytes" in msg and "2252 bytes follow" in msg


def test_loader_truncated_header(tmp_path: Path) -> None:
    assert "truncated" in _corrupt(tmp_path, "train-labels-idx1-ubyte", b"\x00\x00")
    assert "header" in _corrupt(tmp_path, "train-images-idx3-ubyte", _images(3)[:10])


def test_loader_trailing_bytes(tmp_path: Path) -> None:
    msg = _corrupt(tmp_path, "t10k-labels-idx1-ubyte", _labels([1, 2]) + b"x")
    assert "1 trailing bytes" in msg


def test_loader_bad_magic(tmp_path: Path) -> None:
    # A label file where an image file belongs.
    msg = _corrupt(tmp_path, "train-images-idx3-ubyte", _labels([1, 2, 3]))
    assert "bad magic number 0x00000801" in msg and "0x00000803" in msg


def test_loader_corrupt_gzip(tmp_path: Path) -> None:
    good = gzip.compress(_images(3))
    assert "truncated" in _corrupt(tmp_path, "train-images-idx3-ubyte", good[:-30], raw=True)
    flipped = bytearray(good)
    flipped[-6] ^= 0xFF  # inside the CRC-32 / length trailer
    assert "corrupt gzip" in _corrupt(tmp_path, "train-images-idx3-ubyte", bytes(flipped), raw=True)
    assert "not a gzip file" in _corrupt(tmp_path, "train-images-idx3-ubyte", _images(3), raw=True)


def test_loader_label_out_of_range(tmp_path: Path) -> None:
    assert "labels must be < 10, found 10" in _corrupt(
        tmp_path, "train-labels-idx1-ubyte", _labels([1, 10, 2])
    )


def test_loader_counts_disagree(tmp_path: Path) -> None:
    msg = _corrupt(tmp_path, "train-labels-idx1-ubyte", _labels([1, 2]))
    assert "3 images" in msg and "2 labels" in msg


def test_loader_wrong_image_size(tmp_path: Path) -> None:
    data = _idx(0x803, (2, 14, 14), bytes(2 * 14 * 14))
    assert "14x14" in _corrupt(tmp_path, "train-images-idx3-ubyte", data)


@pytest.fixture(scope="module")
def fmnist() -> tuple[Dataset, Dataset]:
    return load_fashion_mnist(REAL_PATH)


@needs_real_data
def test_real_fashion_mnist(fmnist: tuple[Dataset, Dataset]) -> None:
    train, test = fmnist
    assert train.x.shape == (60000, 784) and test.x.shape == (10000, 784)
    assert train.x.dtype == np.float32 and train.x.min() == 0.0 and train.x.max() == 1.0
    np.testing.assert_array_equal(np.bincount(train.y, minlength=10), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(test.y, minlength=10), [1000] * 10)
    # Pixel values are exactly byte / 255.
    np.testing.assert_array_equal(np.round(train.x[:100] * 255) / np.float32(255), train.x[:100])


# --------------------------------------------------------------------------- Synthetic


def test_synthetic_shapes_counts_and_split() -> None:
    fd = make_synthetic(1.0, 1.0, rng=np.random.default_rng(0))
    assert fd.num_clients == 30 and len(fd.test_client_indices) == 30
    assert fd.train.x.shape[1:] == (60,) and fd.train.x.dtype == np.float32
    assert fd.test.x.shape[1:] == (60,) and fd.train.y.dtype == np.int64
    for ds in (fd.train, fd.test):
        assert ds.y.min() >= 0 and ds.y.max() < 10
    n_train = fd.client_sizes()
    n_test = np.array([len(ix) for ix in fd.test_client_indices])
    total = n_train + n_test
    assert total.min() >= 50
    np.testing.assert_array_equal(n_train, (0.9 * total).astype(int))  # the reference's split
    assert n_train.sum() == len(fd.train) and n_test.sum() == len(fd.test)
    # Users' parts are contiguous and in user order, in both sets.
    np.testing.assert_array_equal(np.concatenate(fd.client_indices), np.arange(len(fd.train)))
    np.testing.assert_array_equal(np.concatenate(fd.test_client_indices), np.arange(len(fd.test)))


def test_synthetic_sample_counts_follow_lognormal_4_2() -> None:
    # n_k - 50 = floor(lognormal(4, 2)): its median is floor(e^4) = 54. Over 300 users the
    # sample median of log n lies within ±0.45 (3 standard errors) of 4.
    totals = []
    for seed in range(10):
        fd = make_synthetic(0, 0, rng=np.random.default_rng(seed), iid=True)
        totals.append(fd.client_sizes() + [len(ix) for ix in fd.test_client_indices])
    totals = np.concatenate(totals)
    assert np.exp(3.55) < np.median(totals - 50) < np.exp(4.45)


def test_synthetic_feature_covariance_is_diag_j_pow_minus_1_2() -> None:
    # IID variant: x ~ N(0, diag(j^-1.2)) for every user.
    fd = make_synthetic(0, 0, num_clients=60, rng=np.random.default_rng(3), iid=True)
    x = np.concatenate([fd.train.x, fd.test.x]).astype(np.float64)
    assert len(x) > 3000
    expected = np.arange(1, 61) ** -1.2
    np.testing.assert_allclose(x.var(axis=0), expected, rtol=0.15)
    np.testing.assert_allclose(x.mean(axis=0), 0, atol=4 * np.sqrt(expected / len(x)).max())


def test_synthetic_is_deterministic_per_seed() -> None:
    a = make_synthetic(0.5, 0.5, rng=np.random.default_rng(7))
    b = make_synthetic(0.5, 0.5, rng=np.random.default_rng(7))
    c = make_synthetic(0.5, 0.5, rng=np.random.default_rng(8))
    np.testing.assert_array_equal(a.train.x, b.train.x)
    np.testing.assert_array_equal(a.train.y, b.train.y)
    np.testing.assert_array_equal(a.test.x, b.test.x)
    assert partition_fingerprint(a.client_indices) == partition_fingerprint(b.client_indices)
    assert len(a.train) != len(c.train) or not np.array_equal(a.train.x, c.train.x)


def _label_tv(fd: FederatedData) -> float:
    """Mean total-variation distance between each user's label distribution and the pool's."""
    counts = fd.summary().label_counts
    p = counts / counts.sum(axis=1, keepdims=True)
    pool = counts.sum(axis=0) / counts.sum()
    return float(0.5 * np.abs(p - pool).sum(axis=1).mean())


def _feature_mean_spread(fd: FederatedData) -> float:
    """Variance across users of each user's mean input (E ≈ β² + 1/60 for the non-IID case)."""
    means = np.stack([fd.train.x[ix].mean() for ix in fd.client_indices])
    return float(means.var())


def test_synthetic_non_iid_labels_differ_more_than_iid() -> None:
    for seed in range(3):
        iid = make_synthetic(0, 0, rng=np.random.default_rng(seed), iid=True)
        non = make_synthetic(0, 0, rng=np.random.default_rng(seed))
        # Measured: IID ≈ 0.10 (sampling noise only), non-IID ≈ 0.8 (a model per user).
        assert _label_tv(iid) < 0.2 < 0.5 < _label_tv(non)


def test_synthetic_heterogeneity_grows_with_alpha_beta() -> None:
    for seed in range(3):
        s00 = _feature_mean_spread(make_synthetic(0, 0, rng=np.random.default_rng(seed)))
        s11 = _feature_mean_spread(make_synthetic(1, 1, rng=np.random.default_rng(seed)))
        # β = 0: only N(0, 1) noise of 60 coordinates averaged, variance ≈ 1/60.
        assert s00 < 0.06 and s11 > 0.25 and s11 > 5 * s00


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"alpha": -1.0, "beta": 0.0}, "data.alpha"),
        ({"alpha": 0.0, "beta": float("nan")}, "data.beta"),
        ({"alpha": 0.0, "beta": 0.0, "num_clients": 0}, "data.num_clients"),
        ({"alpha": 0.0, "beta": 0.0, "test_fraction": 1.0}, "data.test_fraction"),
        ({"alpha": 0.0, "beta": 0.0, "test_fraction": 0.99}, "data.test_fraction"),
    ],
)
def test_synthetic_rejects_bad_settings(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_synthetic(**kwargs, rng=np.random.default_rng(0))
    assert info.value.key == key


# --------------------------------------------------------------------------- partitions


def _reference_dirichlet(labels: np.ndarray, n: int, alpha: float, seed: int, k: int) -> list:
    """The published procedure, transcribed literally (the oracle for the vectorized one)."""
    rng = np.random.RandomState(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for c in range(k):
        idx_k = np.where(labels == c)[0]
        rng.shuffle(idx_k)
        p = rng.dirichlet([alpha] * n)
        cuts = (np.cumsum(p) * len(idx_k)).astype(int)[:-1]
        for client, piece in enumerate(np.split(idx_k, cuts)):
            parts[client].append(piece)
    return [np.concatenate([np.empty(0, np.int64), *p]).astype(np.int64) for p in parts]


def _assert_exact_cover(parts: list[np.ndarray], n: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    assert all(p.dtype == np.int64 and p.ndim == 1 for p in parts)
    flat = np.concatenate(parts) if parts else np.empty(0, np.int64)
    np.testing.assert_array_equal(np.sort(flat), np.arange(n))


labels_st = st.lists(st.integers(0, 4), min_size=0, max_size=120).map(
    lambda v: np.array(v, dtype=np.int64)
)


@settings(max_examples=60, deadline=None)
@given(labels=labels_st, num_clients=st.integers(1, 25), seed=st.integers(0, 2**31 - 1))
def test_iid_and_dirichlet_assign_every_example_once(labels, num_clients, seed) -> None:
    for method in ("iid", "dirichlet"):
        parts = partition(labels, num_clients, method, alpha=0.3, seed=seed)
        _assert_exact_cover(parts, len(labels), num_clients)


@settings(max_examples=60, deadline=None)
@given(
    labels=labels_st.filter(lambda a: len(a) >= 1),
    num_clients=st.integers(1, 12),
    spc=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_shards_assign_every_example_once(labels, num_clients, spc, seed) -> None:
    if num_clients * spc > len(labels):
        with pytest.raises(ConfigError, match="shards"):
            partition(labels, num_clients, "shards", shards_per_client=spc, seed=seed)
        return
    parts = partition(labels, num_clients, "shards", shards_per_client=spc, seed=seed)
    _assert_exact_cover(parts, len(labels), num_clients)
    # Each client holds exactly `spc` whole shards of the label-sorted order (shards are
    # np.array_split's: the first n % S of them one example longer).
    num_shards = num_clients * spc
    shard_sizes = np.array([len(s) for s in np.array_split(np.arange(len(labels)), num_shards)])
    pos = np.empty(len(labels), np.int64)
    pos[np.argsort(labels, kind="stable")] = np.arange(len(labels))
    shard_of_pos = np.searchsorted(np.cumsum(shard_sizes), np.arange(len(labels)), side="right")
    for p in parts:
        shards = np.unique(shard_of_pos[pos[p]])
        assert len(shards) == spc
        assert len(p) == shard_sizes[shards].sum()


@settings(max_examples=60, deadline=None)
@given(
    labels=labels_st,
    num_clients=st.integers(1, 25),
    alpha=st.sampled_from([0.05, 0.5, 1.0, 10.0]),
    seed=st.integers(0, 2**31 - 1),
    extra_classes=st.integers(0, 2),
)
def test_dirichlet_matches_the_reference_procedure(
    labels, num_clients, alpha, seed, extra_classes
) -> None:
    k = (int(labels.max()) + 1 if len(labels) else 0) + extra_classes
    ours = partition_dirichlet(labels, num_clients, alpha, seed, num_classes=k)
    ref = _reference_dirichlet(labels, num_clients, alpha, seed, k)
    assert len(ours) == len(ref) == num_clients
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)
    assert partition_fingerprint(ours) == partition_fingerprint(ref)


def test_dirichlet_keeps_empty_clients() -> None:
    labels = np.repeat(np.arange(2), 5)
    parts = partition_dirichlet(labels, 50, 0.5)
    _assert_exact_cover(parts, 10, 50)
    assert sum(len(p) == 0 for p in parts) >= 40


def test_iid_sizes_differ_by_at_most_one() -> None:
    parts = partition_iid(1003, 10, np.random.default_rng(0))
    _assert_exact_cover(parts, 1003, 10)
    assert [len(p) for p in parts] == [101] * 3 + [100] * 7
    assert all(np.all(np.diff(p) > 0) for p in parts)
    other = partition_iid(1003, 10, np.random.default_rng(1))
    assert partition_fingerprint(parts) != partition_fingerprint(other)


def test_dirichlet_small_alpha_is_far_more_skewed() -> None:
    labels = np.repeat(np.arange(10), 500)

    def mean_entropy(alpha: float) -> float:
        parts = partition_dirichlet(labels, 20, alpha)
        counts = summarize_partition(parts, labels, 10).label_counts
        counts = counts[counts.sum(axis=1) > 0]
        return float(np.mean([entropy(c, base=2) for c in counts]))

    skewed, flat = mean_entropy(0.1), mean_entropy(100.0)
    assert flat > 0.98 * np.log2(10)  # nearly uniform over the 10 labels
    assert skewed < 0.5 * flat


@needs_real_data
def test_shards_on_fashion_mnist_give_two_labels(fmnist: tuple[Dataset, Dataset]) -> None:
    train, _ = fmnist
    parts = partition_shards(train.y, 100, 2, rng=np.random.default_rng(0))
    s = summarize_partition(parts, train.y, 10)
    # McMahan et al.: 200 shards of 300; 6000 per class is 20 whole shards, so each client
    # holds at most 2 labels (1 when both shards come from the same class).
    assert np.all(s.sizes == 600)
    held = (s.label_counts > 0).sum(axis=1)
    assert held.max() == 2 and np.mean(held == 2) > 0.8
    assert set(np.unique(s.label_counts)) <= {0, 300, 600}


DIRICHLET_FINGERPRINTS = {
    20: "98b050372e72a9f7acec92eb7c57074ca16575bb81e0375bc0624fffc725cac3",
    100: "57a3cdb032ff0888849573971f2e12f6f82395cb2c458c3ed98708287fdfe5c3",
    1000: "3931f31cbf3b2e59f3e865e5223bceec4908a5a70098b8053dc9e49fc72d8a40",
}


@needs_real_data
@pytest.mark.parametrize("num_clients", sorted(DIRICHLET_FINGERPRINTS))
def test_dirichlet_published_fingerprints(fmnist, num_clients: int) -> None:
    train, _ = fmnist
    start = time.perf_counter()
    parts = partition(train.y, num_clients, "dirichlet", alpha=0.5, seed=0)
    elapsed = time.perf_counter() - start
    assert partition_fingerprint(parts) == DIRICHLET_FINGERPRINTS[num_clients]
    _assert_exact_cover(parts, 60000, num_clients)
    assert elapsed < 1.0  # measured ≈ 7 ms for N = 1000; a loop over examples would fail


def test_fingerprint_hand_computed() -> None:
    expected = hashlib.sha256(struct.pack("<2q", 1, 2) + b"|" + b"|" + struct.pack("<q", 7) + b"|")
    parts = [np.array([1, 2], np.int64), np.array([], np.int64), np.array([7], np.int64)]
    assert partition_fingerprint(parts) == expected.hexdigest()


@pytest.mark.parametrize(
    ("kwargs", "key", "match"),
    [
        ({"method": "powerlaw"}, "data.partition", "'powerlaw'.*iid, dirichlet, shards"),
        ({"method": "dirichlet", "alpha": 0.0}, "data.alpha", "alpha must be > 0"),
        ({"method": "dirichlet", "alpha": -1.0}, "data.alpha", "got -1.0"),
        ({"method": "dirichlet", "alpha": 1e-6}, "data.alpha", "too small.*not finite"),
        ({"method": "iid", "num_clients": 0}, "data.num_clients", "must be >= 1, got 0"),
        ({"method": "dirichlet", "num_clients": 0}, "data.num_clients", ">= 1"),
        ({"method": "shards", "shards_per_client": 0}, "data.shards_per_client", ">= 1"),
        ({"method": "shards", "num_clients": 6}, "data.shards_per_client", "12 shards > 10"),
    ],
)
def test_partition_rejects_bad_settings(kwargs: dict, key: str, match: str) -> None:
    args = {"num_clients": 3, **kwargs}
    labels = np.arange(10) % 3
    with pytest.raises(ConfigError, match=match) as info:
        partition(labels, args.pop("num_clients"), args.pop("method"), **args)
    assert info.value.key == key


def test_partition_rejects_bad_labels() -> None:
    with pytest.raises(DataError, match="labels must be >= 0"):
        partition(np.array([0, -1]), 2, "dirichlet")
    with pytest.raises(DataError, match="1-D integer"):
        partition(np.array([0.0, 1.0]), 2, "shards")


def test_dispatcher_uses_seed() -> None:
    labels = np.arange(200) % 4
    for method in PARTITION_METHODS:
        a = partition(labels, 5, method, seed=3)
        b = partition(labels, 5, method, seed=3)
        c = partition(labels, 5, method, seed=4)
        assert partition_fingerprint(a) == partition_fingerprint(b) != partition_fingerprint(c)
    assert partition_fingerprint(partition(labels, 5, "dirichlet", alpha=0.7, seed=3)) == (
        partition_fingerprint(partition_dirichlet(labels, 5, 0.7, 3))
    )


@settings(max_examples=30, deadline=None)
@given(
    labels=labels_st.filter(lambda a: len(a) >= 1),
    num_clients=st.integers(1, 15),
    seed=st.integers(0, 1000),
)
def test_summary_matches_a_per_client_count(labels, num_clients, seed) -> None:
    parts = partition(labels, num_clients, "dirichlet", alpha=0.5, seed=seed)
    s = summarize_partition(parts, labels, 5)
    expected = np.array([[np.sum(labels[p] == k) for k in range(5)] for p in parts])
    np.testing.assert_array_equal(s.label_counts, expected)
    sizes = np.array([len(p) for p in parts])
    np.testing.assert_array_equal(s.sizes, sizes)
    assert (s.min_size, s.max_size, s.median_size) == (sizes.min(), sizes.max(), np.median(sizes))
    assert s.num_empty == np.sum(sizes == 0)
    nonempty = expected[sizes > 0]
    mean_classes = (nonempty > 0).sum(axis=1).mean() if len(nonempty) else 0.0
    assert s.mean_classes == pytest.approx(mean_classes)


def test_summary_format_is_a_readable_table() -> None:
    labels = np.repeat(np.arange(3), 4)  # [0]*4 + [1]*4 + [2]*4
    parts = [np.array([0, 1, 4], np.int64), np.array([], np.int64), np.arange(5, 12)]
    text = summarize_partition(parts, labels, 3).format(max_rows=2)
    lines = text.splitlines()
    assert lines[0].startswith("3 clients, 10 examples; size min 0 / median 3 / max 7; 1 empty")
    assert lines[1].split() == ["client", "size", "classes", "y=0", "y=1", "y=2"]
    assert lines[2].split() == ["0", "3", "2", "2", "1", "0"]
    assert lines[3].split() == ["1", "0", "0", "0", "0", "0"]
    assert lines[4] == "... 1 more clients"
    wide = summarize_partition([np.arange(12, dtype=np.int64)], labels * 5, 15).format()
    assert "top labels" in wide and "0:4 5:4 10:4" in wide


def test_summary_rejects_out_of_range() -> None:
    with pytest.raises(DataError, match=r"\[0, 3\)"):
        summarize_partition([np.array([3], np.int64)], np.array([0, 1, 2]), 3)
    with pytest.raises(DataError, match=r"labels must lie in \[0, 2\)"):
        summarize_partition([np.array([2], np.int64)], np.array([0, 1, 2]), 2)
