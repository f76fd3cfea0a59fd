"""Datasets held as uint8 image tensors, decoded once and cached.

Every dataset is a :class:`Dataset` of uint8 ``[N, C, H, W]`` images and int64 labels.
Conversion to float (:func:`normalize`) and augmentation (:func:`augment`) happen per
batch on the batch's device, so the data can live on a GPU as compact uint8.

Names accepted by :func:`load_dataset` (see :data:`DATASETS`):

- ``fmnist-mini`` (default, embedded, offline): a fixed class-balanced subset of real
  Fashion-MNIST, 1,000 train and 200 test images per class. Selection rule (see
  ``scripts/make_fmnist_mini.py``): one ``numpy.random.default_rng(0)``; for the train
  split then the test split, for class 0..9 in order, the file-order indices of that class
  are permuted with the generator and the first k kept (k = 1000 train, 200 test); the kept
  indices are sorted, so the subset keeps the original file order.
- ``fashion-mnist``, ``mnist``: the original IDX files if ``data_dir`` holds them directly,
  else torchvision (downloading into ``data_dir`` when missing).
- ``cifar10``, ``cifar100``: torchvision.
- ``synthetic``: 10 classes of 1x16x16 images, a seeded prototype per class plus noise.
- ``imagefolder:PATH``: ``PATH/{train,test}/CLASS/*.png|jpg|jpeg``, decoded once into
  ``PATH/.fedbench-cache.pt`` with its content order and statistics (rebuilt when the image files change;
  CIFAR-10 then loads in about a second).

Every split is stored in one fixed pseudo-random order that depends only on what it holds
(:func:`content_order`), never on the order its files were read in: anything that walks a split
in batches (evaluation with BatchNorm batch statistics, the sBN pass, linear-probe features)
sees mixed-class batches, and the same images give the same results however they are stored.
``Dataset.augment`` (pad-4 random crop + horizontal flip in training) defaults to
:func:`auto_augment`; ``--augment none|crop-flip`` overrides it (the run's config.toml records it).

The default ``data_dir`` is ``$FEDBENCH_DATA`` or ``~/.cache/fedbench/data``.
Returned datasets may be shared between callers (in-process cache): treat them as read-only.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import io
import logging
import os
import pickle
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.error import URLError

import numpy as np
import torch
import torch.nn.functional as F

from fedbench.errors import ConfigError

log = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = (
    "fmnist-mini",
    "fashion-mnist",
    "mnist",
    "cifar10",
    "cifar100",
    "synthetic",
    "synthetic:CxS:N",
    "imagefolder:PATH",
)

ASSET_FMNIST_MINI = Path(__file__).with_name("assets") / "fmnist_mini.pt.gz"
IMAGEFOLDER_CACHE = ".fedbench-cache.pt"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
CROP_PAD = 4

IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
CIFAR_ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}


@dataclass(frozen=True)
class Dataset:
    """Train and test splits as uint8 ``[N, C, H, W]`` images and int64 labels."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool

    @property
    def in_chans(self) -> int:
        return self.train_x.shape[1]

    @property
    def img_size(self) -> int:
        return self.train_x.shape[2]

    def to(self, device: torch.device | str) -> Dataset:
        """The same dataset with every tensor on ``device`` (dtypes unchanged)."""
        return replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(device),
            test_y=self.test_y.to(device),
        )


# ----------------------------------------------------------------------------- batches


def normalize(x: torch.Tensor, ds: Dataset) -> torch.Tensor:
    """uint8 batch ``[B, C, H, W]`` -> floats (the default dtype) standardised with the dataset's mean/std."""
    mean = torch.tensor(ds.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(ds.std, device=x.device).view(1, -1, 1, 1)
    return (x.to(mean.dtype).div_(255.0) - mean).div_(std)


def train_batch(x: torch.Tensor, ds: Dataset,
                generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """uint8 training batch -> augmented (when the data asks for it and a generator is given), normalised.

    With a list of generators, ``x`` is that many equal chunks (clients trained together), each
    augmented with draws from its own generator, exactly as each chunk alone would be.
    """
    if generator is not None and ds.augment:
        gens = [generator] if isinstance(generator, torch.Generator) else generator
        b = x.shape[0] // len(gens)
        draws = [augment_draws(b, g, x.device) for g in gens]
        x = _crop_flip(x, *(torch.cat(d) for d in zip(*draws)))
    return normalize(x, ds)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop after 4-px zero padding plus random horizontal flip, per sample (vectorised)."""
    return _crop_flip(x, *augment_draws(x.shape[0], generator, x.device))


def augment_draws(b: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The random (top, left, flip) of ``augment`` for ``b`` samples, all from ``generator`` (on ``device``)."""
    offsets = torch.randint(0, 2 * CROP_PAD + 1, (2, b), generator=generator, device=device)
    flip = torch.rand(b, generator=generator, device=device) < 0.5
    return offsets[0], offsets[1], flip


def _crop_flip(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Crop ``x`` zero-padded by CROP_PAD at (top, left) per sample, mirrored where ``flip``."""
    b, c, h, w = x.shape
    padded = F.pad(x, (CROP_PAD,) * 4)
    rows = top[:, None] + torch.arange(h, device=x.device)
    cols_fwd = torch.arange(w, device=x.device)
    cols = left[:, None] + torch.where(flip[:, None], cols_fwd.flip(0), cols_fwd)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


# ----------------------------------------------------------------------------- loading


def load_dataset(name: str, data_dir: str | Path | None = None, *, seed: int = 0) -> Dataset:
    """Load a dataset by name (see :data:`DATASETS`); cached within the process."""
    if name.startswith("imagefolder:"):
        return _load_imagefolder(name, Path(name.removeprefix("imagefolder:")).expanduser())
    if name.startswith("synthetic:"):
        return _load_cached(name, None, seed)
    if name not in DATASETS:
        allowed = ", ".join(DATASETS)
        raise ConfigError("--dataset", f"unknown dataset {name!r}; allowed: {allowed}")
    root = None
    if name in ("fashion-mnist", "mnist", "cifar10", "cifar100"):
        root = str(_default_data_dir() if data_dir is None else Path(data_dir).expanduser().resolve())
    return _load_cached(name, root, seed if name == "synthetic" else 0)


def _default_data_dir() -> Path:
    env = os.environ.get("FEDBENCH_DATA")
    return Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "fedbench" / "data"


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, root: str | None, seed: int) -> Dataset:
    if name == "fmnist-mini":
        return _load_fmnist_mini()
    if name.startswith("synthetic"):
        return _make_synthetic(name, seed, *parse_synthetic(name))
    if name in ("fashion-mnist", "mnist"):
        return _load_mnist_like(name, Path(root))
    return _load_cifar(name, Path(root))


def _build(name: str, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
           num_classes: int) -> Dataset:
    """A Dataset with both splits in :func:`content_order`, mean/std from the train images."""
    train, test = _in_content_order(*train), _in_content_order(*test)
    mean, std = _channel_stats(train[0])
    shape = tuple(train[0].shape[1:])
    return Dataset(name, *train, *test, num_classes, mean, std, auto_augment(shape))


def content_order(x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Indices that sort the samples by a hash of (image bytes, label): a fixed pseudo-random order
    that depends only on the samples a split holds, not on the order they come in.

    The hash is a seeded random linear form in int64 (wrapping, so exact and order-free); class-sorted
    files (an ``imagefolder:`` tree) thus end up as well mixed as torchvision's shuffled test sets.
    """
    gen = torch.Generator().manual_seed(0)
    weights = torch.randint(-2 ** 62, 2 ** 62, (x[0].numel() + 1,), generator=gen)
    keys = torch.cat([(part.reshape(len(part), -1).long() * weights[:-1]).sum(1) for part in x.split(chunk)])
    return torch.argsort(keys + y.long() * weights[-1], stable=True)


def _in_content_order(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = content_order(x, y)
    return x[order], y[order]


def auto_augment(shape: tuple[int, ...]) -> bool:
    """``--augment auto``: pad-4 crop + flip for colour images of at most 64x64 pixels (CIFAR-like),
    none for grey ones (Fashion-MNIST, MNIST), as the papers' recipes do."""
    channels, height, width = shape
    return channels == 3 and max(height, width) <= 64


def _channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units (chunked, float64)."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for part in x.split(chunk):
        part = part.to(torch.float64)
        total += part.sum(dim=(0, 2, 3))
        total_sq += part.square().sum(dim=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    std[std == 0] = 255.0  # a constant channel: normalise by 1 (not by 0)
    return tuple((mean / 255).tolist()), tuple((std / 255).tolist())


def read_asset(path: Path = ASSET_FMNIST_MINI) -> dict[str, torch.Tensor]:
    """The embedded subset as saved by the script: a gzip'd ``torch.save`` dict of tensors."""
    with gzip.open(path, "rb") as f:
        return torch.load(io.BytesIO(f.read()), weights_only=True)


def _load_fmnist_mini() -> Dataset:
    blob = read_asset()
    return _build("fmnist-mini", (blob["train_x"], blob["train_y"]), (blob["test_x"], blob["test_y"]), 10)


def parse_synthetic(name: str) -> tuple[int, int, int]:
    """``synthetic`` = 1x16x16 images, 2,000 train; ``synthetic:CxS:N`` = C channels, SxS, N train."""
    if name == "synthetic":
        return 1, 16, 2000
    try:
        shape, count = name.removeprefix("synthetic:").split(":")
        channels, size = (int(v) for v in shape.split("x"))
        n_train = int(count)
        if min(channels, size, n_train) < 1:
            raise ValueError
    except ValueError:
        raise ConfigError("--dataset", f"{name!r}: synthetic data is 'synthetic' or 'synthetic:CxS:N' "
                          "(C channels, SxS pixels, N train images, e.g. synthetic:3x32:50000)") from None
    return channels, size, n_train


def _make_synthetic(name: str, seed: int, channels: int = 1, size: int = 16, n_train: int = 2000,
                    n_test: int = 500, num_classes: int = 10) -> Dataset:
    """Each class is a smooth random prototype; a sample is the prototype with random
    contrast plus Gaussian pixel noise, quantised to uint8. Deterministic per seed."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=g)
    protos = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        contrast = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)
        noise = 0.6 * torch.randn(n, channels, size, size, generator=g)
        img = (0.5 + contrast * (protos[y] - 0.5) + noise).clamp(0, 1)
        return (img * 255).round().to(torch.uint8), y

    train = draw(n_train)
    return _build(name, train, draw(n_test), num_classes)


# ----------------------------------------------------------------------------- IDX / torchvision


def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file (optionally gzipped) holding unsigned bytes, e.g. MNIST images/labels."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ConfigError("--data-dir", f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ConfigError("--data-dir", f"{path} is truncated: expected shape {shape}")
    return torch.from_numpy(data.reshape(shape).copy())


def _load_mnist_like(name: str, root: Path) -> Dataset:
    if all((root / f).is_file() for f in IDX_FILES):
        log.info("reading %s from IDX files in %s", name, root)
        x_tr, y_tr, x_te, y_te = (read_idx(root / f) for f in IDX_FILES)
    else:
        import torchvision.datasets as tvd

        cls = tvd.FashionMNIST if name == "fashion-mnist" else tvd.MNIST
        train, test = _torchvision_splits(name, root, cls, ", ".join(IDX_FILES))
        x_tr, y_tr, x_te, y_te = train.data, train.targets, test.data, test.targets
    return _build(name, (x_tr.unsqueeze(1), y_tr.long()), (x_te.unsqueeze(1), y_te.long()), 10)


def _load_cifar(name: str, root: Path) -> Dataset:
    import torchvision.datasets as tvd

    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    train, test = _torchvision_splits(name, root, cls, CIFAR_ARCHIVES[name])

    def split(ds) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return x, torch.tensor(ds.targets, dtype=torch.int64)

    return _build(name, split(train), split(test), len(train.classes))


def _torchvision_splits(name: str, root: Path, cls: type, files: str) -> tuple:
    """Both splits of a torchvision dataset; a failed download becomes one ConfigError line."""
    log.info("loading %s from %s (downloading if missing)", name, root)
    chatter = io.StringIO()  # torchvision prints download attempts to stdout
    top = root  # the highest folder a download may create, and what is under it now
    while not top.parent.exists():
        top = top.parent
    existed = {top, *top.rglob("*")} if top.exists() else set()
    try:
        with contextlib.redirect_stdout(chatter):
            return cls(root=str(root), train=True, download=True), cls(root=str(root), train=False, download=True)
    except (URLError, RuntimeError, OSError) as exc:
        lines = str(getattr(exc, "reason", exc)).strip().splitlines()
        reason = (lines[-1] if lines else type(exc).__name__)[:120]  # torchvision puts the cause last
        for folder in sorted((p for p in [top, *top.rglob("*")] if p not in existed and p.is_dir()), reverse=True):
            with contextlib.suppress(OSError):  # the empty folders the failed download made; nothing else
                folder.rmdir()
        raise ConfigError(
            "--data-dir",
            f"{name} not found under {root} and the download failed ({reason}); "
            f"put the original files ({files}) in {root} or pass --data-dir",
        ) from None
    finally:
        if chatter.getvalue().strip():
            log.debug("torchvision: %s", chatter.getvalue().strip())


# ----------------------------------------------------------------------------- image folders


def _load_imagefolder(name: str, root: Path) -> Dataset:
    """Load ``root/{train,test}/CLASS/*``, using the on-disk cache when it is current."""
    classes, train_files, test_files = _scan_imagefolder(root)
    files = train_files + test_files
    fingerprint = _fingerprint(root, [f for f, _ in files])
    cache = root / IMAGEFOLDER_CACHE
    blob = _read_cache(cache)
    if blob is None or blob.get("fingerprint") != fingerprint:
        log.info("decoding %d images under %s", len(files), root)
        blob = _decode_imagefolder(root, train_files, test_files)
        blob["fingerprint"] = fingerprint
    if "mean" not in blob:  # the cache holds the built splits (content order, statistics): CIFAR-10 loads in ~1 s
        ds = _build(name, (blob["train_x"], blob["train_y"]), (blob["test_x"], blob["test_y"]), len(classes))
        blob = {k: getattr(ds, k) for k in ("train_x", "train_y", "test_x", "test_y")} | {
            "mean": list(ds.mean), "std": list(ds.std), "fingerprint": fingerprint}
        _save_cache(blob, cache)
    return Dataset(name, blob["train_x"], blob["train_y"], blob["test_x"], blob["test_y"], len(classes),
                   tuple(blob["mean"]), tuple(blob["std"]), auto_augment(tuple(blob["train_x"].shape[1:])))


def _scan_imagefolder(root: Path) -> tuple[list[str], list[tuple[Path, int]], list[tuple[Path, int]]]:
    """Class names (sorted train subfolders) and the (file, label) lists of both splits."""
    layout = "PATH/train/CLASS/*.png|jpg|jpeg and PATH/test/CLASS/..."
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise ConfigError("--dataset", f"imagefolder: {root} needs the layout {layout}")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    test_classes = sorted(p.name for p in (root / "test").iterdir() if p.is_dir())
    if not classes or test_classes != classes:
        raise ConfigError(
            "--dataset",
            f"imagefolder: train classes {classes} and test classes {test_classes} under {root} "
            f"must be the same non-empty set ({layout})",
        )
    splits = []
    for split in ("train", "test"):
        files = []
        for label, c in enumerate(classes):
            images = _images_in(root / split / c)
            if not images:  # a class without images: nothing to learn or test it on
                raise ConfigError("--dataset", f"imagefolder: class {c!r} has no .png/.jpg/.jpeg images in "
                                  f"{root / split / c}; every class needs images in both splits ({layout})")
            files += [(f, label) for f in images]
        splits.append(files)
    return classes, splits[0], splits[1]


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _fingerprint(root: Path, files: list[Path]) -> str:
    """Hash of (relative path, size, mtime) of every image: changes when any file does."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _decode_imagefolder(root: Path, train: list[tuple[Path, int]], test: list[tuple[Path, int]]) -> dict:
    """Decode every image once; all must share one size. Grey stays 1 channel, else RGB."""
    from PIL import Image, UnidentifiedImageError

    sizes, modes = {}, set()
    for f, _ in train + test:
        try:
            with Image.open(f) as im:
                sizes[f] = im.size
                modes.add(im.mode)
                im.load()  # decode it all: a truncated or corrupt file fails here, named, not later
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ConfigError("--dataset", f"imagefolder: cannot read {f} ({exc})") from None
    expected = sizes[train[0][0]]
    for f, size in sizes.items():
        if size != expected:
            raise ConfigError(
                "--dataset",
                f"imagefolder: {f} is {size[0]}x{size[1]} but images must all be "
                f"{expected[0]}x{expected[1]} (the size of {train[0][0].relative_to(root)})",
            )
    mode = "L" if modes <= GRAY_MODES else "RGB"

    def stack(files: list[tuple[Path, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack([_decode_image(f, mode) for f, _ in files])
        return x, torch.tensor([label for _, label in files], dtype=torch.int64)

    (train_x, train_y), (test_x, test_y) = stack(train), stack(test)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def _decode_image(path: Path, mode: str) -> torch.Tensor:
    """One image file -> uint8 ``[C, H, W]`` in ``mode`` ("L" or "RGB")."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert(mode), dtype=np.uint8)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _read_cache(cache: Path) -> dict | None:
    """The cached tensors, or None when the cache is absent or unreadable."""
    if not cache.is_file():
        return None
    try:
        return torch.load(cache, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        log.warning("ignoring unreadable image cache %s (%s)", cache, exc)
        return None


def _save_cache(blob: dict, cache: Path) -> None:
    """Write the decoded tensors atomically; a read-only folder only costs a re-decode next time.

    The temporary file is created exclusively under a fresh name (``mkstemp``: never through a link
    someone planted), then renamed over ``cache`` (a rename replaces a link there, never follows it).
    """
    try:
        fd, tmp = tempfile.mkstemp(prefix=cache.name + ".", suffix=".tmp", dir=cache.parent)
    except OSError as exc:
        log.warning("could not write the image cache %s (%s); images will be decoded again", cache, exc)
        return
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(blob, f)
        os.replace(tmp, cache)
    except OSError as exc:
        log.warning("could not write the image cache %s (%s); images will be decoded again", cache, exc)
        Path(tmp).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- shapes only

SHAPES = {"fmnist-mini": ((1, 28, 28), 10), "fashion-mnist": ((1, 28, 28), 10), "mnist": ((1, 28, 28), 10),
          "cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100)}


def placeholder(name: str) -> Dataset | None:
    """A stand-in with a known dataset's shape, classes and augmentation, for profiling without its files."""
    if name not in SHAPES:
        return None
    shape, classes = SHAPES[name]
    x = torch.zeros((classes, *shape), dtype=torch.uint8)
    y = torch.arange(classes)
    half = (0.5,) * shape[0]
    return Dataset(name, x, y, x, y, classes, half, half, auto_augment(shape))
