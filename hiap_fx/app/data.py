"""Datasets that need no download: Fashion-MNIST from the Debian package ``dataset-fashion-mnist``
(torchvision's download as a fallback where there is internet) and ImageFolder for users' data."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Optional, Sequence, Sized, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from hiap_fx.errors import InputError

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    True: ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    False: ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not): the format MNIST-style datasets ship in."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise InputError(f"{path}: only unsigned-byte IDX files are supported")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_fashion_mnist(root: Optional[str], train: bool) -> Optional[Path]:
    names = FASHION_MNIST_FILES[train]
    candidates = [root] if root else []
    candidates += [os.environ.get("HIAP_FASHION_MNIST", ""), DEBIAN_FASHION_MNIST]
    for base in filter(None, candidates):
        for sub in ("", "FashionMNIST/raw"):
            d = Path(base) / sub
            if all((d / n).exists() or (d / n[:-3]).exists() for n in names):
                return d
    return None


def fashion_mnist(train: bool = True, root: Optional[str] = None, download: bool = False,
                  image_size: Optional[Sequence[int]] = None) -> Dataset:
    """Fashion-MNIST as a ``TensorDataset`` of normalised float images ``[n, C, H, W]`` and labels.

    Looks in ``root``, ``$HIAP_FASHION_MNIST`` and the Debian package's directory
    (``apt-get install dataset-fashion-mnist``). With ``download=True`` and nothing found,
    torchvision downloads it into ``root`` (needs internet). ``image_size`` ``(C, H, W)`` resizes
    (bilinear, per item when read) and repeats the grey channel, for models that expect e.g.
    3x224x224.
    """
    found = _find_fashion_mnist(root, train)
    if found is None and download:
        from torchvision.datasets import FashionMNIST

        target = root or os.path.join(os.path.expanduser("~"), ".cache", "hiap_fx", "data")
        FashionMNIST(target, train=train, download=True)
        found = _find_fashion_mnist(target, train)
    if found is None:
        raise InputError("Fashion-MNIST not found: install the Debian package "
                         "(apt-get install dataset-fashion-mnist), set HIAP_FASHION_MNIST to a folder "
                         "holding the four idx files, or pass download=True with internet access")
    paths = [found / n if (found / n).exists() else found / n[:-3] for n in FASHION_MNIST_FILES[train]]
    images = torch.from_numpy(_read_idx(paths[0]).copy()).float().div_(255.0).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(paths[1]).astype(np.int64))
    images = (images - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    dataset = TensorDataset(images, labels)
    if image_size is not None and tuple(image_size) != tuple(images.shape[1:]):
        return _Resized(dataset, tuple(image_size))
    return dataset


def shift_flip(images: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Standard light augmentation of a batch ``[n, C, H, W]``: each image translated by up to
    ``pad`` pixels in each direction (the border filled with the batch's minimum: the background
    of normalised Fashion-MNIST) and flipped left-right with probability 1/2."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad), value=float(images.min()))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(-1, images.shape[1], -1, w + 2 * pad)
    cropped = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(-1, images.shape[1], h, -1)
    out = cropped.gather(3, cols)
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


class _Resized(Dataset):
    """Resize (bilinear) and repeat channels of each image of a dataset when it is read."""

    def __init__(self, base: Dataset, size: tuple[int, ...]) -> None:
        if len(size) != 3:
            raise InputError(f"image size must be (C, H, W), got {size}")
        self.base, self.size = base, size

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]  # torchvision datasets are sized

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.base[i]
        chans, h, w = self.size
        if tuple(image.shape[-2:]) != (h, w):
            image = torch.nn.functional.interpolate(image[None], size=(h, w), mode="bilinear",
                                                    align_corners=False)[0]
        return image.expand(chans, -1, -1), label


def image_folder(path: str, image_size: Sequence[int], train: bool = True) -> Dataset:
    """An ``ImageFolder`` (one sub-folder per class) resized to ``image_size`` ``(C, H, W)``, with
    ImageNet normalisation; a ``train/`` or ``val/`` sub-folder is used when present."""
    from torchvision import datasets, transforms

    base = Path(path)
    if not base.is_dir():
        raise InputError(f"imagefolder path {path!r} is not a directory")
    split = base / ("train" if train else "val")
    if split.is_dir():
        base = split
    chans, h, w = image_size
    tf = [transforms.Resize((h, w)), transforms.ToTensor()]
    if chans == 1:
        tf.insert(0, transforms.Grayscale(1))
        tf.append(transforms.Normalize([0.5], [0.5]))
    else:
        tf.append(transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
    return datasets.ImageFolder(str(base), transform=transforms.Compose(tf))


def load_data(spec: str, image_size: Sequence[int], batch_size: int = 64, seed: int = 0,
              limit: Optional[int] = None) -> tuple[DataLoader, DataLoader]:
    """Training and evaluation loaders for a command-line data spec: ``fashion-mnist`` or
    ``imagefolder:PATH``. ``limit`` caps the number of examples of each split (smoke runs)."""
    if spec == "fashion-mnist":
        train, test = (fashion_mnist(t, image_size=image_size, download=True) for t in (True, False))
    elif spec.startswith("imagefolder:"):
        path = spec.split(":", 1)[1]
        train, test = image_folder(path, image_size, True), image_folder(path, image_size, False)
    else:
        raise InputError(f"unknown data spec {spec!r}: use fashion-mnist or imagefolder:PATH")
    if limit is not None:
        train = torch.utils.data.Subset(train, range(min(limit, len(cast(Sized, train)))))
        test = torch.utils.data.Subset(test, range(min(limit, len(cast(Sized, test)))))
    gen = torch.Generator().manual_seed(seed)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen, drop_last=True),
            DataLoader(test, batch_size=256, shuffle=False))
