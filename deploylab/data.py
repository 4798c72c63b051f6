"""Fashion-MNIST: finding it, verifying it, splitting it and turning it into model inputs.

Sources, in this order: a cached copy under ``data/fashion-mnist``; Debian's package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``); torchvision's download. Whatever
is read is verified against pinned sha256 hashes of the *decoded* IDX files (the ``.gz`` wrappers
differ between sources, the arrays must not). Nothing synthetic is ever substituted.

Model input contract (used for training, ONNX parity and serving alike -- import
:func:`preprocess`, never copy it): a 28x28 uint8 grayscale image becomes a ``float32`` tensor of
shape ``(1, 32, 32)``: bilinear resize to 32x32, scale to [0, 1], normalise with the training
set's mean and standard deviation.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import config
from .files import atomic_path

CLASS_NAMES: tuple[str, ...] = (
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
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 32  # the models' input side; Fashion-MNIST itself is 28x28
MEAN, STD = 0.2860, 0.3530  # of the 60,000 training images, pixel values scaled to [0, 1]
VALIDATION_IMAGES = 5_000  # held out of the 60,000 training images, fixed by SPLIT_SEED
SPLIT_SEED = 0

# sha256 of the decompressed IDX files (header + array bytes).
FILES = {
    "train_images": ("train-images-idx3-ubyte", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "train_labels": ("train-labels-idx1-ubyte", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "test_images": ("t10k-images-idx3-ubyte", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "test_labels": ("t10k-labels-idx1-ubyte", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}
# One hash for the whole dataset, recorded in every artefact's metadata.
DATA_SHA256 = hashlib.sha256("".join(h for _, h in FILES.values()).encode()).hexdigest()
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

HOW_TO_GET_DATA = (
    "Fashion-MNIST was not found. Do one of:\n"
    "  - on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist\n"
    "  - with internet: run `deploylab prepare` once (torchvision downloads it)\n"
    "  - offline: copy the four *-ubyte.gz files into {cache}\n"
)


class DataError(RuntimeError):
    """The dataset is missing or does not match its pinned hashes."""


@dataclass(frozen=True)
class FashionMNIST:
    """The decoded dataset as uint8 images (N, 28, 28) and int64 labels (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str  # where it was read from, for the record

    @property
    def sha256(self) -> str:
        return DATA_SHA256


def cache_dir() -> Path:
    return config.DATA_DIR / "fashion-mnist"


def _parse_idx(raw: bytes) -> np.ndarray:
    """Decode an IDX file (big-endian header: magic, dims) into a uint8 array."""
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def _read_verified(folder: Path) -> dict[str, np.ndarray]:
    """Read the four gzipped IDX files in ``folder`` and check each against its pinned hash."""
    arrays = {}
    for key, (stem, expected) in FILES.items():
        path = folder / f"{stem}.gz"
        if not path.is_file():
            raise FileNotFoundError(path)
        try:
            raw = gzip.decompress(path.read_bytes())
        except (OSError, EOFError) as e:
            raise DataError(f"{path} is not a readable gzip file ({e})") from e
        actual = hashlib.sha256(raw).hexdigest()
        if actual != expected:
            raise DataError(f"{path} does not match its pinned sha256 (got {actual[:12]}..., want {expected[:12]}...)")
        arrays[key] = _parse_idx(raw)
    return arrays


def _copy_to_cache(folder: Path) -> None:
    """Copy verified .gz files into the data/ cache, each atomically."""
    for stem, _ in FILES.values():
        with atomic_path(cache_dir() / f"{stem}.gz") as tmp:
            shutil.copyfile(folder / f"{stem}.gz", tmp)


def _download(into: Path) -> Path:
    """Let torchvision download the raw files; returns the folder holding the .gz files."""
    from torchvision.datasets import FashionMNIST as TVFashionMNIST

    for train in (True, False):
        TVFashionMNIST(root=str(into), train=train, download=True)
    return into / "FashionMNIST" / "raw"


@lru_cache(maxsize=1)
def load_fashion_mnist(allow_download: bool = True) -> FashionMNIST:
    """Load and verify Fashion-MNIST from the first source that works (see module docstring)."""
    problems: list[str] = []
    candidates: list[tuple[str, Path | None]] = [("cache", cache_dir()), ("debian", DEBIAN_DIR)]
    if allow_download:
        candidates.append(("download", None))
    for name, folder in candidates:
        try:
            if folder is None:
                tmp = Path(tempfile.mkdtemp(prefix="fashion-mnist-"))
                try:
                    folder = _download(tmp)
                    arrays = _read_verified(folder)
                    _copy_to_cache(folder)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
            else:
                arrays = _read_verified(folder)
                if name != "cache":
                    _copy_to_cache(folder)
        except FileNotFoundError:
            problems.append(f"{name}: not there")
            continue
        except DataError as e:
            problems.append(f"{name}: {e}")
            warnings.warn(f"skipping Fashion-MNIST source {name}: {e}", stacklevel=2)
            continue
        except Exception as e:  # network errors from the download, mostly
            problems.append(f"{name}: {type(e).__name__}: {e}")
            continue
        return FashionMNIST(
            train_images=arrays["train_images"],
            train_labels=arrays["train_labels"].astype(np.int64),
            test_images=arrays["test_images"],
            test_labels=arrays["test_labels"].astype(np.int64),
            source=name,
        )
    raise DataError(HOW_TO_GET_DATA.format(cache=cache_dir()) + "Tried: " + "; ".join(problems))


def preprocess(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Turn uint8 grayscale images into model inputs.

    Accepts one image ``(28, 28)`` or a batch ``(N, 28, 28)`` (any square size works: it is resized
    to :data:`IMAGE_SIZE`). Returns ``float32`` of shape ``(N, 1, 32, 32)``, normalised.
    """
    x = torch.from_numpy(np.array(images, copy=True))  # a copy: decoded images are often read-only buffers
    if x.dtype != torch.uint8:
        raise TypeError(f"preprocess expects uint8 pixels, got {x.dtype}")
    if x.ndim == 2:
        x = x.unsqueeze(0)
    if x.ndim != 3:
        raise ValueError(f"preprocess expects (H, W) or (N, H, W) images, got shape {tuple(x.shape)}")
    x = x.unsqueeze(1).float().div_(255.0)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return (x - MEAN) / STD


def split_indices(n: int = 60_000, validation: int = VALIDATION_IMAGES, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Fixed train/validation split of the 60,000 training images (same for every profile)."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[validation:]), np.sort(order[:validation])


def _take(n: int, limit: int | None, seed: int) -> np.ndarray:
    """The first ``limit`` of a seeded permutation of ``range(n)`` (all of them if limit is None)."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order if limit is None else order[: min(limit, n)])


def split_size(split: str, limit: int | None = None) -> int:
    """How many images :func:`tensors` gives for ``split`` and ``limit``, without loading any.

    The split sizes are fixed: the dataset is pinned by its hash (60,000 training images, of which
    ``VALIDATION_IMAGES`` are held out, and 10,000 test images).
    """
    sizes = {"train": 60_000 - VALIDATION_IMAGES, "val": VALIDATION_IMAGES, "test": 10_000}
    if split not in sizes:
        raise ValueError(f"unknown split {split!r}: use 'train', 'val' or 'test'")
    return sizes[split] if limit is None else min(limit, sizes[split])


def raw_split(split: str, limit: int | None = None, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``(images, labels)`` of ``train``, ``val`` or ``test``, optionally a seeded subset.

    These are the images :func:`tensors` preprocesses, as they are before preprocessing: what a
    client of a served model sends (the serving lessons encode them as PNG).
    """
    ds = load_fashion_mnist()
    if split == "test":
        images, labels = ds.test_images, ds.test_labels
    elif split in ("train", "val"):
        train_idx, val_idx = split_indices(len(ds.train_labels))
        idx = train_idx if split == "train" else val_idx
        images, labels = ds.train_images[idx], ds.train_labels[idx]
    else:
        raise ValueError(f"unknown split {split!r}: use 'train', 'val' or 'test'")
    keep = _take(len(labels), limit, seed)
    return images[keep], labels[keep]


@lru_cache(maxsize=8)
def tensors(split: str, limit: int | None = None, seed: int = SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed ``(inputs, labels)`` of ``train``, ``val`` or ``test``, optionally a seeded subset."""
    images, labels = raw_split(split, limit, seed)
    return preprocess(images), torch.from_numpy(labels)


@lru_cache(maxsize=1)
def _test_fingerprints() -> frozenset[bytes]:
    """A 16-byte digest of every preprocessed test image: what :func:`refuse_test_images` looks images up in."""
    x, _ = tensors("test")
    return frozenset(_digest(row) for row in x)


def _digest(image: torch.Tensor) -> bytes:
    """A short digest of one preprocessed image's bytes (the same image always gives the same bytes)."""
    return hashlib.blake2b(image.detach().contiguous().numpy().tobytes(), digest_size=16).digest()


class TestImagesError(ValueError):
    """A choice (layers, ratios, a variant) was about to be made on test images."""


def refuse_test_images(x: torch.Tensor, what: str, *, checked: int = 256) -> None:
    """Raise :class:`TestImagesError` when ``x`` holds test images (up to ``checked`` of them, spread over ``x``).

    Why: a choice made on the test set makes the final test figure optimistic (it was picked to look
    good on those very images). Choices use the validation split (``tensors("val")``); the test set
    scores the final choice once. A few images may be shared by chance (Fashion-MNIST has a handful of
    near-duplicates), so the check refuses only when more than a tenth of the sample are test images.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or len(x) == 0:
        raise ValueError(f"{what}: expected a (N, C, H, W) batch of preprocessed images")
    idx = torch.linspace(0, len(x) - 1, min(checked, len(x))).round().long().unique()
    known = _test_fingerprints()
    hits = sum(_digest(x[i]) in known for i in idx.tolist())
    if hits > 0.1 * len(idx):
        raise TestImagesError(f"{what}: {hits} of {len(idx)} images checked are test images. Make choices on the "
                              f"validation images (data.tensors('val')); the test set scores the final choice once.")


def calibration_set(n: int, seed: int = 1) -> torch.Tensor:
    """``n`` preprocessed training images for calibrating quantized models (never test images)."""
    if n <= 0:
        raise ValueError(f"a calibration set needs at least one image, got n={n}")
    x, _ = tensors("train")
    idx = torch.from_numpy(_take(len(x), n, seed))
    return x[idx]


def augment(batch: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop (after zero padding) and horizontal flip, drawn independently per image."""
    n, c, h, w = batch.shape
    dev = batch.device
    padded = F.pad(batch, (padding,) * 4, value=float(-MEAN / STD))  # pad with "black" pixels
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, :, None]  # (n, h, 1)
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, :]  # (n, 1, w)
    out = padded[torch.arange(n, device=dev)[:, None, None], :, rows, cols]  # (n, h, w, c)
    out = out.permute(0, 3, 1, 2)
    flip = (torch.rand(n, generator=generator) < 0.5).to(dev)
    return torch.where(flip[:, None, None, None], out.flip(-1), out).contiguous()


def write_sample_images(out_dir: str | Path, per_class: int = 1) -> list[Path]:
    """Write the first ``per_class`` real test images of each class as PNG (for serving demos)."""
    from PIL import Image

    ds = load_fashion_mnist()
    out_dir = Path(out_dir)
    written = []
    for label, name in enumerate(CLASS_NAMES):
        for k, i in enumerate(np.flatnonzero(ds.test_labels == label)[:per_class]):
            slug = name.lower().replace("/", "-").replace(" ", "-")
            path = out_dir / f"{label}_{slug}_{k}.png"
            with atomic_path(path) as tmp:
                Image.fromarray(ds.test_images[i]).save(tmp, format="PNG")
            written.append(path)
    return written
