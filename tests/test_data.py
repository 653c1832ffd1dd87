import gzip
import struct
import sys

import numpy as np
import pytest
import torch

from pydefend.data import (FASHION_MNIST_DIR, Dataset, absolute_spec, clean_split, load_dataset, load_digits,
                           load_fashion_mnist, load_image_folder, load_npz, names_code, read_idx,
                           stratified_split)


def write_idx(path, array, compress):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, compress):
    rng = np.random.default_rng()
    images = rng.integers(0, 256, (5, 3, 4), dtype=np.uint8)
    ints = rng.integers(-1000, 1000, (7,)).astype(">i4")
    write_idx(tmp_path / "images", images, compress)
    write_idx(tmp_path / "ints", ints, compress)
    suffix = ".gz" if compress else ""
    np.testing.assert_array_equal(read_idx(tmp_path / f"images{suffix}"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / f"ints{suffix}"), ints)


def test_read_idx_rejects_truncated_and_foreign_files(tmp_path):
    images = np.zeros((4, 2, 2), dtype=np.uint8)
    write_idx(tmp_path / "images", images, compress=False)
    raw = (tmp_path / "images").read_bytes()
    (tmp_path / "short").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="data bytes"):
        read_idx(tmp_path / "short")
    (tmp_path / "text").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "text")


def test_fashion_mnist_layout_from_idx_files(tmp_path):
    rng = np.random.default_rng()
    for prefix, count in (("train", 12), ("t10k", 5)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte",
                  rng.integers(0, 256, (count, 28, 28), dtype=np.uint8), compress=True)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte",
                  rng.integers(0, 10, (count,), dtype=np.uint8), compress=True)
    dataset = load_fashion_mnist(tmp_path)
    raw = read_idx(tmp_path / "train-images-idx3-ubyte.gz")
    assert dataset.x_train.shape == (12, 1, 28, 28) and dataset.x_test.shape == (5, 1, 28, 28)
    assert dataset.x_train.dtype == torch.float32 and dataset.y_train.dtype == torch.int64
    torch.testing.assert_close(dataset.x_train[:, 0], torch.from_numpy(raw / 255.0).float())
    assert dataset.input_shape == (1, 28, 28)


def test_fashion_mnist_missing_names_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


@pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="dataset-fashion-mnist not installed")
def test_installed_fashion_mnist():
    dataset = load_fashion_mnist()
    assert dataset.x_train.shape == (60000, 1, 28, 28) and dataset.x_test.shape == (10000, 1, 28, 28)
    assert 0.0 <= dataset.x_train.min() and dataset.x_train.max() <= 1.0
    assert torch.bincount(dataset.y_train).tolist() == [6000] * 10


def test_digits_scaled_and_stratified():
    dataset = load_digits()
    assert dataset.x_train.shape[1:] == (1, 8, 8) and dataset.num_classes == 10
    assert dataset.x_train.shape[0] + dataset.x_test.shape[0] == 1797
    assert dataset.x_train.min() == 0.0 and dataset.x_train.max() == 1.0
    # 0..16 grey levels scaled by 1/16
    levels = torch.unique(dataset.x_train * 16)
    assert torch.equal(levels, levels.round())
    test_share = torch.bincount(dataset.y_test, minlength=10) / torch.bincount(
        torch.cat([dataset.y_train, dataset.y_test]), minlength=10)
    assert ((test_share - 0.2).abs() < 0.02).all()
    again = load_digits()
    assert torch.equal(again.x_test, dataset.x_test)
    assert not torch.equal(load_digits(seed=1).y_test, dataset.y_test)


def test_digits_train_and_test_partition_the_full_set():
    from sklearn.datasets import load_digits as sklearn_load_digits
    full = sklearn_load_digits()
    dataset = load_digits()
    # One random projection per image (plus its label) identifies it; the multisets must match.
    weights = torch.rand(65, dtype=torch.float64)

    def keys(images, labels):
        rows = torch.cat([torch.as_tensor(images, dtype=torch.float64).reshape(len(labels), -1),
                          torch.as_tensor(labels, dtype=torch.float64)[:, None]], dim=1)
        return (rows @ weights).sort().values

    ours = keys(torch.cat([dataset.x_train, dataset.x_test]) * 16,
                torch.cat([dataset.y_train, dataset.y_test]))
    torch.testing.assert_close(ours, keys(full.images, full.target))


def test_stratified_split_partitions_indices():
    labels = np.random.default_rng().integers(0, 7, 500)
    selected, rest = stratified_split(labels, 0.3, seed=3)
    assert len(np.intersect1d(selected, rest)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([selected, rest])), np.arange(500))
    for cls in range(7):
        members = (labels == cls).sum()
        assert abs((labels[selected] == cls).sum() - 0.3 * members) <= 1


def test_clean_split_is_seeded_stratified_training_subset():
    dataset = load_digits()
    n_train = dataset.x_train.shape[0]
    split = clean_split(dataset, fraction=0.05, seed=0)
    assert split.dtype == torch.int64 and len(torch.unique(split)) == len(split)
    assert 0 <= split.min() and split.max() < n_train
    assert abs(len(split) - 0.05 * n_train) <= 10
    assert set(dataset.y_train[split].tolist()) == set(range(10))
    assert torch.equal(split, clean_split(dataset, fraction=0.05, seed=0))
    assert not torch.equal(split, clean_split(dataset, fraction=0.05, seed=1))
    with pytest.raises(ValueError):
        clean_split(dataset, fraction=1.5)


def test_subset_first_and_seeded():
    x = torch.rand(20, 1, 4, 4)
    y = torch.arange(20)
    dataset = Dataset("toy", x, y, x[:10], y[:10], num_classes=20)
    first = dataset.subset(5, 3)
    assert torch.equal(first.y_train, y[:5]) and torch.equal(first.y_test, y[:3])
    drawn = dataset.subset(5, seed=7)
    assert len(drawn.y_train) == 5 and torch.equal(drawn.y_train, dataset.subset(5, seed=7).y_train)
    assert torch.equal(drawn.x_train, x[drawn.y_train])  # images stay with their labels
    assert drawn.x_test.shape[0] == 10


def test_dataset_validates_shapes():
    with pytest.raises(ValueError, match="N×C×H×W"):
        Dataset("bad", torch.rand(4, 8, 8), torch.zeros(4, dtype=torch.int64),
                torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="y_train"):
        Dataset("bad", torch.rand(4, 1, 8, 8), torch.zeros(3, dtype=torch.int64),
                torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.int64), 2)


def test_npz_uint8_hw_is_scaled_and_never_resplit(tmp_path):
    rng = np.random.default_rng()
    x = rng.integers(0, 256, (40, 6, 5), dtype=np.uint8)
    y = np.repeat(np.arange(4), 10)
    x_test = rng.integers(0, 256, (8, 6, 5), dtype=np.uint8)
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    np.savez(tmp_path / "held_out.npz", x=x_test, y=np.arange(8) % 4)
    with pytest.raises(ValueError, match="--test-data"):  # one split: pydefend will not carve a test set out of it
        load_npz(tmp_path / "mine.npz")
    dataset = load_npz(tmp_path / "mine.npz", test=str(tmp_path / "held_out.npz"))
    assert dataset.name == "mine" and dataset.num_classes == 4 and dataset.input_shape == (1, 6, 5)
    assert torch.equal(dataset.x_train.mul(255).round(), torch.from_numpy(x[:, None].astype(np.float32)))
    assert torch.equal(dataset.x_test.mul(255).round(), torch.from_numpy(x_test[:, None].astype(np.float32)))
    assert torch.equal(dataset.y_train, torch.from_numpy(y))


def test_npz_float_nchw_with_explicit_splits(tmp_path):
    x_train, x_test = np.random.rand(10, 3, 4, 4).astype(np.float32), np.random.rand(4, 3, 4, 4)
    np.savez(tmp_path / "s.npz", x_train=x_train, y_train=np.arange(10) % 3,
             x_test=x_test, y_test=np.arange(4) % 3)
    dataset = load_dataset(str(tmp_path / "s.npz"))
    assert torch.equal(dataset.x_train, torch.from_numpy(x_train))
    assert dataset.x_test.dtype == torch.float32 and dataset.num_classes == 3
    with pytest.raises(ValueError, match="drop --test-data"):
        load_dataset(str(tmp_path / "s.npz"), test=str(tmp_path / "s.npz"))
    with pytest.raises(ValueError, match="drop --test-data"):
        load_dataset("digits", test=str(tmp_path / "s.npz"))


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "range.npz", x_train=np.full((4, 2, 2), 3.0), y_train=np.arange(4),
             x_test=np.zeros((2, 2, 2)), y_test=np.arange(2))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_npz(tmp_path / "range.npz")
    np.savez(tmp_path / "keys.npz", images=np.zeros((4, 2, 2)), y=np.arange(4))
    with pytest.raises(ValueError, match="'x' and 'y'"):
        load_npz(tmp_path / "keys.npz")
    np.savez(tmp_path / "labels.npz", x=np.zeros((4, 2, 2), np.uint8), y=np.arange(3))
    with pytest.raises(ValueError, match="labels"):
        load_npz(tmp_path / "labels.npz")
    # Object arrays would need unpickling: refused.
    np.savez(tmp_path / "objects.npz", x=np.array([None] * 4, dtype=object), y=np.arange(4))
    with pytest.raises(ValueError):
        load_npz(tmp_path / "objects.npz")
    with pytest.raises(FileNotFoundError):
        load_npz(tmp_path / "absent.npz")
    with pytest.raises(FileNotFoundError, match="unknown dataset"):
        load_dataset(str(tmp_path / "absent_folder"))


def test_image_folder_without_pillow_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="pillow"):
        load_image_folder(tmp_path)


def _image_folder(root, classes, count, size=(7, 9)):
    image_module = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng()
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(count):
            image_module.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def test_image_folder_with_its_test_folder(tmp_path):
    train = _image_folder(tmp_path / "train", ("cat", "dog"), 5)
    test = _image_folder(tmp_path / "test", ("cat", "dog"), 2)
    dataset = load_image_folder(train, test=str(test))
    assert dataset.input_shape == (1, 7, 9) and dataset.num_classes == 2
    assert dataset.x_train.shape[0] == 10 and dataset.x_test.shape[0] == 4
    assert dataset.y_test.tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="--test-data"):
        load_image_folder(train)
    other = _image_folder(tmp_path / "other", ("cat", "fox"), 2)
    with pytest.raises(ValueError, match="different class folders"):  # labels would silently mean other classes
        load_image_folder(train, test=str(other))


def test_torch_dataset_through_module_factory(tmp_path, monkeypatch):
    (tmp_path / "my_data.py").write_text(
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        "g = torch.Generator().manual_seed(0)\n"
        "X, Y = torch.randn(30, 2, 5, 5, generator=g), torch.arange(30) % 3\n"
        "def train():\n    return TensorDataset(X[:20], Y[:20])\n"
        "def test():\n    return [(X[i].numpy(), int(Y[i])) for i in range(20, 30)]\n"
        "def bad():\n    return iter([])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    dataset = load_dataset("my_data:train", test="my_data:test")
    import my_data
    assert torch.equal(dataset.x_train, my_data.X[:20]) and torch.equal(dataset.x_test, my_data.X[20:])
    assert torch.equal(dataset.y_test, my_data.Y[20:]) and dataset.num_classes == 3
    by_file = load_dataset(f"{tmp_path / 'my_data.py'}:train", test=f"{tmp_path / 'my_data.py'}:test")
    assert torch.equal(by_file.x_train, dataset.x_train)
    with pytest.raises(ValueError, match="--test-data"):
        load_dataset("my_data:train")
    with pytest.raises(ValueError, match="map-style"):
        load_dataset("my_data:bad", test="my_data:test")
    with pytest.raises(ValueError, match="no 'absent'"):
        load_dataset("my_data:absent", test="my_data:test")
    assert names_code("my_data:train") and names_code("my_data:train@4x4")
    assert not names_code("digits@8") and not names_code(str(tmp_path / "x.npz"))


def test_absolute_spec_names_files_by_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 2, 2)), y=np.arange(2))
    (tmp_path / "f.py").write_text("")
    assert absolute_spec("d.npz@4") == f"{tmp_path / 'd.npz'}@4"
    assert absolute_spec("f.py:make") == f"{tmp_path / 'f.py'}:make"
    assert absolute_spec("digits") == "digits" and absolute_spec("pkg.mod:make") == "pkg.mod:make"
    assert absolute_spec(None) is None


def test_size_suffix_area_averages_every_image():
    base, small = load_dataset("digits"), load_dataset("digits@4x4")
    # 8×8 -> 4×4 averages 2×2 blocks; eighths of sixteenths are exact in float32
    blocks = base.x_train.double().view(-1, 1, 4, 2, 4, 2).mean((3, 5)).float()
    assert torch.equal(small.x_train, blocks) and torch.equal(small.y_train, base.y_train)
    assert small.name == "digits@4x4" and small.image_size == (4, 4)
    assert load_dataset("digits@3").x_test.shape[1:] == (1, 3, 3)
    odd = load_dataset("digits@5x3").x_train
    assert odd.shape[1:] == (1, 5, 3) and 0 <= odd.min() and odd.max() <= 1
    with pytest.raises(FileNotFoundError, match="@HxW"):
        load_dataset("digits@0x4")
