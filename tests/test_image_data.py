import gzip

import numpy as np
import pytest

from rmt_kd_hf.image_data import (
    FASHION_MNIST_LABELS,
    fashion_mnist_dir,
    load_fashion_mnist,
    read_idx,
    save_image_arrays,
)


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion_mnist(tmp_path):
    """Four IDX files in Fashion-MNIST's layout: 30 train and 10 test images of 28x28, labels 0..9."""
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 30), ("t10k", 10)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    return tmp_path


def test_read_idx_round_trips_and_rejects_other_files(tmp_path):
    images = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    write_idx(tmp_path / "images.gz", images)
    np.testing.assert_array_equal(read_idx(tmp_path / "images.gz"), images)
    (tmp_path / "not_idx").write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        read_idx(tmp_path / "not_idx")


def test_fashion_mnist_splits_and_normalisation(fake_fashion_mnist):
    data = load_fashion_mnist(fake_fashion_mnist, validation_size=6, seed=0)
    assert {split: len(rows) for split, rows in data.items()} == {"train": 24, "validation": 6, "test": 10}
    assert data["train"].features["labels"].names == list(FASHION_MNIST_LABELS)
    assert data["train"][0]["pixel_values"].shape == (1, 28, 28)
    raw = read_idx(fake_fashion_mnist / "t10k-images-idx3-ubyte.gz")
    expected = (raw[3] / 255.0 - 0.2860) / 0.3530
    np.testing.assert_allclose(data["test"][3]["pixel_values"][0].numpy(), expected, atol=1e-5)
    assert int(data["test"][3]["labels"]) == 3


def test_a_missing_fashion_mnist_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr("rmt_kd_hf.image_data.FASHION_MNIST_DIRS", (str(tmp_path / "nowhere"),))
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist_dir()


def test_digits_and_the_arrays_file(tmp_path):
    pytest.importorskip("sklearn")
    from rmt_kd_hf.image_data import load_digits

    digits = load_digits(seed=0)
    assert sum(len(rows) for rows in digits.values()) == 1797
    assert digits["train"][0]["pixel_values"].shape == (1, 8, 8)
    path = save_image_arrays(digits, tmp_path / "digits.npz")
    arrays = np.load(path)
    assert arrays["train_images"].shape == (len(digits["train"]), 1, 8, 8)
    np.testing.assert_array_equal(arrays["test_labels"], digits["test"].with_format("numpy")["labels"])
    assert list(arrays["label_names"]) == [str(digit) for digit in range(10)]
