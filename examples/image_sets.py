"""The image classification sets the examples train on: Fashion-MNIST from a local copy, and
scikit-learn's bundled 8x8 digits, which need no download at all.

Fashion-MNIST is never downloaded here (the machines this project runs on cannot reach it). A
local copy is its four idx files, gzipped or not, either bare in a directory or in torchvision's
layout, `<root>/FashionMNIST/raw/`, as `torchvision.datasets.FashionMNIST(root, download=True)`
leaves them; `load_fashion_mnist` takes the directory holding the files, its parent, or the root.

The idx format (the MNIST page, yann.lecun.com/exdb/mnist): two zero bytes, a type code (0x08 for
unsigned bytes, the only type these sets use), the number of dimensions, each dimension as a
big-endian uint32, then the values in C order.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from dataclasses import dataclass
from typing import Dict

import numpy as np
import torch

FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
UNSIGNED_BYTE = 0x08


@dataclass
class ImageSet:
    """Images as float32 (n, 1, height, width) scaled to [0, 1], labels as int64 (n,)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def read_idx(path: str) -> np.ndarray:
    """The array an idx file (gzipped when its name ends in .gz) holds."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != UNSIGNED_BYTE:
        raise ValueError(f"{path} is not an idx file of unsigned bytes (it starts with {data[:4].hex()!r})")
    ndim = data[3]
    shape = struct.unpack_from(f">{ndim}I", data, 4)
    values = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if values.size != math.prod(shape):
        raise ValueError(f"{path}: its header says {shape} ({math.prod(shape)} values) but it holds {values.size}")
    return values.reshape(shape)


def find_fashion_mnist(directory: str) -> Dict[str, str]:
    """The paths of the four files, looked for in `directory`, its raw/ and its FashionMNIST/raw/
    (torchvision keeps both the .gz files and their contents there: either will do)."""
    folders = [directory, os.path.join(directory, "raw"), os.path.join(directory, "FashionMNIST", "raw")]
    for folder in folders:
        found = {}
        for key, name in FASHION_MNIST_FILES.items():
            path = next((p for p in (os.path.join(folder, name), os.path.join(folder, name + ".gz")) if os.path.exists(p)), None)
            if path is not None:
                found[key] = path
        if len(found) == len(FASHION_MNIST_FILES):
            return found
    raise FileNotFoundError(
        f"no Fashion-MNIST in {directory}: looked for {', '.join(FASHION_MNIST_FILES.values())} (.gz or not) "
        f"in {', '.join(folders)}"
    )


def load_fashion_mnist(directory: str) -> ImageSet:
    """Fashion-MNIST's own split: 60,000 training and 10,000 test images of 28x28."""
    arrays = {key: read_idx(path) for key, path in find_fashion_mnist(directory).items()}

    def images(key):
        return torch.from_numpy(arrays[key].astype(np.float32) / 255.0).unsqueeze(1)

    def labels(key):
        return torch.from_numpy(arrays[key].astype(np.int64))

    return ImageSet("Fashion-MNIST", images("train_images"), labels("train_labels"), images("test_images"), labels("test_labels"))


def load_digits(seed: int = 0) -> ImageSet:
    """scikit-learn's 1797 digits (8x8, pixels 0..16), split 80/20 at random with the seed."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as e:
        raise ImportError(f"the digits set needs scikit-learn ({e}): `pip install scikit-learn`") from e
    digits = sklearn_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = order[: int(0.8 * len(x))], order[int(0.8 * len(x)):]
    return ImageSet("digits", x[train], y[train], x[test], y[test])
