"""Real image data that works offline: Fashion-MNIST from the Debian package, scikit-learn's digits as a fallback.

Both come back as ``datasets.DatasetDict`` with columns ``pixel_values`` (float32, (channels, height, width),
normalised) and ``labels`` (``ClassLabel``), ready for a ``Trainer`` and ``ResNetForImageClassification``.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence

import numpy as np
from datasets import Array3D, ClassLabel, Dataset, DatasetDict, Features

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_LABELS = (
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
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def fashion_mnist_dir(directory: str | os.PathLike | None = None) -> str:
    """The directory holding Fashion-MNIST's four ``*-idx*-ubyte.gz`` files (``directory``, ``$FASHION_MNIST_DIR``
    or the Debian package's ``/usr/share/datasets/fashion-mnist``)."""
    candidates = [directory] if directory is not None else [os.environ.get("FASHION_MNIST_DIR"), *FASHION_MNIST_DIRS]
    needed = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
    for candidate in filter(None, candidates):
        if all(os.path.exists(os.path.join(candidate, name)) for name in needed):
            return os.fspath(candidate)
    raise FileNotFoundError(
        f"Fashion-MNIST not found in {[c for c in candidates if c]}: on Debian/Ubuntu install it with "
        "`apt-get install dataset-fashion-mnist`, or download the four *-ubyte.gz files from "
        "https://github.com/zalandoresearch/fashion-mnist and set FASHION_MNIST_DIR (or pass directory=)."
    )


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (gzipped or not) as a uint8 array: (n,) labels or (n, height, width) images."""
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    with opener(path, "rb") as file:
        data = file.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()})")
    num_dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(num_dims))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * num_dims)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {array.size} values (truncated download?)")
    return array.reshape(shape)


def images_to_dataset(
    images: np.ndarray, labels: np.ndarray, label_names: Sequence[str], mean: float, std: float
) -> Dataset:
    """``pixel_values`` = (images / max − mean) / std as float32 (n, channels, height, width); ``labels`` int.

    Args:
        images: (n, height, width) grey or (n, channels, height, width), uint8 (0..255) or float (0..1).
        labels: (n,) class ids.
        label_names: the ``ClassLabel`` names.
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or len(images) != len(labels):
        raise ValueError(
            f"expected (n, [channels,] height, width) images and n labels, got {images.shape}, {len(labels)}"
        )
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    pixel_values = ((images.astype(np.float32) / scale - mean) / std).astype(np.float32)
    features = Features(
        {"pixel_values": Array3D(pixel_values.shape[1:], "float32"), "labels": ClassLabel(names=list(label_names))}
    )
    dataset = Dataset.from_dict({"pixel_values": pixel_values, "labels": np.asarray(labels, dtype=np.int64)}, features)
    return dataset.with_format("torch")


def load_fashion_mnist(
    directory: str | os.PathLike | None = None, validation_size: int = 5000, seed: int = 0
) -> DatasetDict:
    """Fashion-MNIST (10 classes, 28x28 grey): train (60k − ``validation_size``), validation (seeded, from train)
    and the official 10k test split."""
    root = fashion_mnist_dir(directory)
    arrays = {
        split: (read_idx(os.path.join(root, images)), read_idx(os.path.join(root, labels)))
        for split, (images, labels) in FASHION_MNIST_FILES.items()
    }
    train_images, train_labels = arrays["train"]
    order = np.random.default_rng(seed).permutation(len(train_images))
    validation_rows, train_rows = np.sort(order[:validation_size]), np.sort(order[validation_size:])
    splits = {
        "train": (train_images[train_rows], train_labels[train_rows]),
        "validation": (train_images[validation_rows], train_labels[validation_rows]),
        "test": arrays["test"],
    }
    return DatasetDict(
        {
            split: images_to_dataset(images, labels, FASHION_MNIST_LABELS, mean=0.2860, std=0.3530)
            for split, (images, labels) in splits.items()
        }
    )


def load_digits(seed: int = 0, validation_fraction: float = 0.15, test_fraction: float = 0.15) -> DatasetDict:
    """scikit-learn's 1,797 handwritten digits (8x8 grey, 10 classes), split (seeded) into train/validation/test."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise ImportError("The digits fallback needs scikit-learn: `pip install scikit-learn`.") from None
    digits = sklearn_digits()
    images, labels = digits.images / 16.0, digits.target
    order = np.random.default_rng(seed).permutation(len(images))
    num_validation, num_test = round(validation_fraction * len(images)), round(test_fraction * len(images))
    bounds = {
        "train": order[num_validation + num_test :],
        "validation": order[:num_validation],
        "test": order[num_validation : num_validation + num_test],
    }
    names = [str(digit) for digit in range(10)]
    return DatasetDict(
        {
            split: images_to_dataset(images[np.sort(rows)], labels[np.sort(rows)], names, mean=0.3, std=0.4)
            for split, rows in bounds.items()
        }
    )


def save_image_arrays(dataset: DatasetDict, path: str | os.PathLike) -> str:
    """Write ``{split}_images`` / ``{split}_labels`` arrays (and ``label_names``) into one ``.npz`` file, the local
    arrays format of ``examples/image-classification/run_image_classification.py``."""
    arrays = {}
    for split, rows in dataset.items():
        rows = rows.with_format("numpy")
        arrays[f"{split}_images"] = rows["pixel_values"]
        arrays[f"{split}_labels"] = rows["labels"]
    first = next(iter(dataset.values()))
    arrays["label_names"] = np.asarray(first.features["labels"].names)
    np.savez(path, **arrays)
    return os.fspath(path)


__all__ = [
    "FASHION_MNIST_LABELS",
    "fashion_mnist_dir",
    "images_to_dataset",
    "load_digits",
    "load_fashion_mnist",
    "read_idx",
    "save_image_arrays",
]
