"""Datasets: the embedded fmnist-mini, synthetic, IDX files, image folders, batch transforms."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fedbench.data as data
from fedbench.data import CROP_PAD, Dataset, augment, load_dataset, normalize
from fedbench.errors import ConfigError
from tests.conftest import FMNIST_SRC, needs_fmnist



def test_fmnist_mini_shapes_balance_and_determinism():
    ds = load_dataset("fmnist-mini")
    assert ds.train_x.shape == (10000, 1, 28, 28) and ds.test_x.shape == (2000, 1, 28, 28)
    assert ds.train_x.dtype == ds.test_x.dtype == torch.uint8
    assert ds.train_y.dtype == ds.test_y.dtype == torch.int64
    assert ds.num_classes == 10 and ds.in_chans == 1 and ds.img_size == 28 and not ds.augment
    assert torch.bincount(ds.train_y).tolist() == [1000] * 10
    assert torch.bincount(ds.test_y).tolist() == [200] * 10
    again = data._load_fmnist_mini()  # bypasses the in-process cache
    assert torch.equal(again.train_x, ds.train_x) and torch.equal(again.test_y, ds.test_y)
    assert again.mean == ds.mean and 0.2 < ds.mean[0] < 0.4 and 0.3 < ds.std[0] < 0.4


def test_repeated_loads_are_cached():
    assert load_dataset("fmnist-mini") is load_dataset("fmnist-mini")
    assert load_dataset("synthetic", seed=3) is load_dataset("synthetic", seed=3)


@needs_fmnist
def test_fmnist_mini_is_the_documented_subset_of_the_originals():
    path = Path(__file__).parents[1] / "scripts" / "make_fmnist_mini.py"
    spec = importlib.util.spec_from_file_location("make_fmnist_mini", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rebuilt = script.build(FMNIST_SRC)
    asset = data.read_asset()
    assert asset.keys() == rebuilt.keys()
    for key in asset:
        assert torch.equal(asset[key], rebuilt[key]), key


@needs_fmnist
def test_fashion_mnist_from_idx_folder():
    ds = load_dataset("fashion-mnist", FMNIST_SRC)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_x.dtype == torch.uint8 and ds.num_classes == 10
    assert torch.bincount(ds.train_y).tolist() == [6000] * 10
    raw_x = data.read_idx(FMNIST_SRC / data.IDX_FILES[0]).unsqueeze(1)
    raw_y = data.read_idx(FMNIST_SRC / data.IDX_FILES[1]).long()
    assert torch.equal(ds.train_x, raw_x[data.content_order(raw_x, raw_y)])  # the file's images, in content order
    mini = data.read_asset()
    assert torch.equal(raw_x[mini["train_idx"]], mini["train_x"])


@needs_fmnist
def test_fashion_mnist_through_torchvision_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in data.IDX_FILES:  # torchvision's own layout: extracted IDX files, no download
        (raw / name.removesuffix(".gz")).write_bytes(gzip.decompress((FMNIST_SRC / name).read_bytes()))
    ds = load_dataset("fashion-mnist", tmp_path)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_y.shape == (10000,)
    assert torch.equal(ds.test_x, load_dataset("fashion-mnist", FMNIST_SRC).test_x)


def test_read_idx_rejects_other_files(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"not an idx file")
    with pytest.raises(ConfigError) as err:
        data.read_idx(bad)
    assert err.value.flag == "--data-dir"


def test_synthetic_is_seeded_and_learnable():
    a, b, c = (data._make_synthetic("synthetic", s) for s in (0, 0, 1))
    assert a.train_x.shape == (2000, 1, 16, 16) and a.test_x.shape == (500, 1, 16, 16)
    assert a.train_x.dtype == torch.uint8 and a.num_classes == 10
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert torch.bincount(a.train_y).tolist() == [200] * 10

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(512, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = normalize(a.train_x, a)
    for _ in range(2):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), a.train_y[idx]).backward()
            opt.step()
    with torch.no_grad():
        acc = (model(normalize(a.test_x, a)).argmax(1) == a.test_y).float().mean().item()
    assert acc > 0.85  # the noise keeps it below 100%: about 0.97 is the ceiling


def test_unknown_dataset_names_the_allowed_ones():
    with pytest.raises(ConfigError) as err:
        load_dataset("foo")
    assert err.value.flag == "--dataset"
    assert "fmnist-mini" in err.value.message and "imagefolder:PATH" in err.value.message


def test_offline_missing_cifar_is_one_config_error(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    def offline(*args, **kwargs):
        raise URLError("network is unreachable")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    with pytest.raises(ConfigError) as err:
        load_dataset("cifar10", tmp_path)
    assert err.value.flag == "--data-dir"
    assert "network is unreachable" in err.value.message and "cifar-10-python.tar.gz" in err.value.message
    assert "\n" not in str(err.value)


def test_failed_download_leaves_no_empty_folders(tmp_path, monkeypatch):
    import urllib.request

    def offline(*args, **kwargs):
        raise URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    (tmp_path / "mine").mkdir()
    for root in (tmp_path / "new" / "data", tmp_path):
        with pytest.raises(ConfigError, match="network is unreachable"):
            load_dataset("cifar10", root)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # what was there stays


# ----------------------------------------------------------------------------- batch transforms


def test_normalize_standardises_the_train_set():
    ds = load_dataset("fmnist-mini")
    x = normalize(ds.train_x, ds)
    assert x.dtype == torch.float32 and x.shape == ds.train_x.shape
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3


def test_crop_flip_on_a_hand_made_image():
    x = torch.arange(1, 13, dtype=torch.uint8).view(1, 1, 3, 4)
    padded = F.pad(x, (CROP_PAD,) * 4)
    zero, centre = torch.tensor([0]), torch.tensor([CROP_PAD])
    no, yes = torch.tensor([False]), torch.tensor([True])
    assert torch.equal(data._crop_flip(x, centre, centre, no), x)
    assert torch.equal(data._crop_flip(x, centre, centre, yes), x.flip(-1))
    assert torch.equal(data._crop_flip(x, zero, zero, no), padded[..., :3, :4])
    shifted = data._crop_flip(x, torch.tensor([CROP_PAD + 1]), torch.tensor([CROP_PAD - 1]), no)
    assert shifted[0, 0].tolist() == [[0, 5, 6, 7], [0, 9, 10, 11], [0, 0, 0, 0]]


def test_augment_is_a_seeded_crop_and_flip_of_each_sample():
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, augment(x, torch.Generator().manual_seed(1)))
    assert (out != x).flatten(1).any(1).sum() > 32
    padded = F.pad(x, (CROP_PAD,) * 4)
    span = range(2 * CROP_PAD + 1)
    for i in range(len(x)):  # every output is one of the 9 x 9 x 2 possible views of its input
        views = [padded[i, :, t:t + 8, l:l + 8] for t in span for l in span]
        assert any(torch.equal(out[i], v) or torch.equal(out[i], v.flip(-1)) for v in views)


def test_dataset_to_keeps_dtypes():
    ds = load_dataset("synthetic").to("cpu")
    assert isinstance(ds, Dataset) and ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64


# ----------------------------------------------------------------------------- image folders


def _write_folder(root: Path, size: tuple[int, int] = (8, 8)) -> None:
    from PIL import Image

    for split in ("train", "test"):
        for label, cls in enumerate(("cat", "dog")):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", size, (label * 200, i * 50, 7)).save(root / split / cls / f"{i}.png")


def test_imagefolder_loads_and_caches(tmp_path, monkeypatch):
    _write_folder(tmp_path)
    ds = load_dataset(f"imagefolder:{tmp_path}")
    assert ds.train_x.shape == (6, 3, 8, 8) and ds.test_x.shape == (6, 3, 8, 8)
    pixels = sorted((y, tuple(x[:, 0, 0].tolist())) for x, y in zip(ds.train_x, ds.train_y.tolist()))
    assert pixels == [(label, (label * 200, i * 50, 7)) for label in (0, 1) for i in range(3)] and ds.num_classes == 2
    assert (tmp_path / data.IMAGEFOLDER_CACHE).is_file()

    def no_decoding(*args):
        raise AssertionError("decoded again despite a current cache")

    monkeypatch.setattr(data, "_decode_image", no_decoding)
    again = load_dataset(f"imagefolder:{tmp_path}")
    assert torch.equal(again.train_x, ds.train_x)
    monkeypatch.setattr(data, "content_order", no_decoding)  # the cache holds the built splits: no re-ordering
    cached = data._load_imagefolder(ds.name, tmp_path)      # from the disk cache, not the in-process one
    assert all(torch.equal(getattr(cached, k), getattr(ds, k)) for k in ("train_x", "train_y", "test_x", "test_y"))
    assert (cached.mean, cached.std, cached.augment) == (ds.mean, ds.std, ds.augment)
    monkeypatch.undo()

    from PIL import Image

    Image.new("L", (8, 8), 3).save(tmp_path / "train" / "dog" / "3.png")
    grown = load_dataset(f"imagefolder:{tmp_path}")
    assert grown.train_x.shape == (7, 3, 8, 8) and [3, 3, 3] in grown.train_x[:, :, 0, 0].tolist()


def test_imagefolder_greyscale_keeps_one_channel(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("L", (5, 5), 9).save(tmp_path / split / cls / "x.jpg")
    ds = load_dataset(f"imagefolder:{tmp_path}")
    assert ds.train_x.shape == (2, 1, 5, 5) and ds.in_chans == 1


def test_imagefolder_rejects_mixed_sizes(tmp_path):
    from PIL import Image

    _write_folder(tmp_path)
    Image.new("RGB", (9, 8)).save(tmp_path / "test" / "dog" / "odd.png")
    with pytest.raises(ConfigError) as err:
        load_dataset(f"imagefolder:{tmp_path}")
    assert err.value.flag == "--dataset" and "odd.png" in err.value.message and "8x8" in err.value.message


def test_imagefolder_missing_folder(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_dataset(f"imagefolder:{tmp_path / 'nowhere'}")
    assert err.value.flag == "--dataset"


def test_synthetic_with_shape_and_size():
    ds = load_dataset("synthetic:3x32:300", seed=1)
    assert ds.train_x.shape == (300, 3, 32, 32) and ds.augment
    with pytest.raises(ConfigError) as e:
        load_dataset("synthetic:3by32")
    assert e.value.flag == "--dataset"


def test_imagefolder_cache_write_never_follows_a_planted_link(tmp_path):
    _write_folder(tmp_path)
    victim = tmp_path.parent / f"{tmp_path.name}-victim.txt"
    victim.write_text("keep me")
    (tmp_path / (data.IMAGEFOLDER_CACHE + ".tmp")).symlink_to(victim)   # where the cache used to be staged
    (tmp_path / data.IMAGEFOLDER_CACHE).symlink_to(victim)              # the cache itself
    ds = load_dataset(f"imagefolder:{tmp_path}")
    assert victim.read_text() == "keep me"
    cache = tmp_path / data.IMAGEFOLDER_CACHE
    assert cache.is_file() and not cache.is_symlink()
    assert torch.equal(data._read_cache(cache)["train_y"].sort().values, ds.train_y.sort().values)
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp" and not p.is_symlink()]


def test_a_constant_channel_normalises_to_finite_values():
    x = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8)
    x[:, 2] = 9
    mean, std = data._channel_stats(x)
    assert std[2] == 1.0 and mean[2] == pytest.approx(9 / 255)
    ds = Dataset("c", x, torch.zeros(6, dtype=torch.long), x, torch.zeros(6, dtype=torch.long), 1, mean, std, False)
    assert torch.isfinite(normalize(x, ds)).all()
