"""Results do not depend on the order a data set is stored in (issue 13): class-sorted files
(an ``imagefolder:`` tree) evaluate like a shuffled copy, and ``--augment`` is resolved and recorded."""
from __future__ import annotations

import tomllib
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from fedbench import data
from fedbench.cli import app
from fedbench.config import resolve
from fedbench.engine import prepare
from fedbench.method import evaluate_on_test
from fedbench.models import create_model


def trained_resnet(ds: data.Dataset) -> torch.nn.Module:
    """ResNet-20 after 60 steps of centralised SGD on fmnist-mini: well above chance, BatchNorm on batch statistics."""
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=1, img_size=28)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for idx in torch.randperm(len(ds.train_y), generator=gen)[:60 * 32].split(32):
        opt.zero_grad()
        F.cross_entropy(model(data.normalize(ds.train_x[idx], ds)), ds.train_y[idx]).backward()
        opt.step()
    return model


def test_evaluation_is_the_same_for_a_class_sorted_and_a_shuffled_test_split():
    raw = data.read_asset()
    test_x, test_y = raw["test_x"], raw["test_y"]
    by_class = torch.argsort(test_y, stable=True)
    shuffled = torch.randperm(len(test_y), generator=torch.Generator().manual_seed(1))
    train = (raw["train_x"], raw["train_y"])
    sorted_ds = data._build("sorted", train, (test_x[by_class], test_y[by_class]), 10)
    shuffled_ds = data._build("shuffled", train, (test_x[shuffled], test_y[shuffled]), 10)
    assert torch.equal(sorted_ds.test_x, shuffled_ds.test_x) and torch.equal(sorted_ds.test_y, shuffled_ds.test_y)
    # every evaluation batch mixes the classes
    assert all(len(b.unique()) == 10 for b in sorted_ds.test_y.split(500))

    model = trained_resnet(sorted_ds)
    acc = evaluate_on_test(model, sorted_ds)
    assert acc == evaluate_on_test(model, shuffled_ds) and acc["accuracy"] > 0.45
    # what the loaders did before: class-sorted batches normalised away, near chance
    stored_sorted = replace(sorted_ds, test_x=test_x[by_class], test_y=test_y[by_class])
    assert evaluate_on_test(model, stored_sorted)["accuracy"] < acc["accuracy"] - 0.1


def test_content_order_ignores_the_input_order_and_keeps_pairs():
    x = torch.randint(0, 256, (300, 3, 4, 4), dtype=torch.uint8)
    y = torch.randint(0, 5, (300,))
    perm = torch.randperm(300)
    a, b = data.content_order(x, y), data.content_order(x[perm], y[perm])
    assert torch.equal(x[a], x[perm][b]) and torch.equal(y[a], y[perm][b])


def _colour_folder(root, size=(32, 32)) -> str:
    from PIL import Image

    for split in ("train", "test"):
        for label in range(2):
            (root / split / f"c{label}").mkdir(parents=True)
            for i in range(10):
                # no constant channel: its std would be 0, normalising it NaN, and the run would diverge (exit 3)
                Image.new("RGB", size, (label * 200, i * 20, 9 + i)).save(root / split / f"c{label}" / f"{i}.png")
    return f"imagefolder:{root}"


@pytest.mark.parametrize("given, size, resolved", [
    (None, (32, 32), "crop-flip"),       # auto: colour, CIFAR-like size
    (None, (96, 96), "none"),            # auto: larger than 64 px
    ("none", (32, 32), "none"),
    ("crop-flip", (32, 32), "crop-flip"),
])
def test_augment_is_resolved_and_applied(tmp_path, given, size, resolved):
    name = _colour_folder(tmp_path, size)
    flags = dict(dataset=name, clients=2, clients_per_round=2, rounds=1, device="cpu", quiet=True)
    run = prepare(resolve(flags | ({"augment": given} if given else {})))
    assert run.config.augment == resolved
    assert run.dataset.augment is (resolved == "crop-flip") and run.method.dataset.augment is run.dataset.augment


def test_augment_defaults_match_torchvision_cifar_and_grey_data():
    assert data.auto_augment((3, 32, 32)) and not data.auto_augment((1, 28, 28))
    assert not prepare(resolve(dict(rounds=1, device="cpu", quiet=True))).dataset.augment  # fmnist-mini


def test_augment_is_recorded_in_config_toml_and_rejects_bad_values(tmp_path):
    name = _colour_folder(tmp_path / "data")
    out = tmp_path / "run"
    common = ["run", "--dataset", name, "--clients", "2", "--clients-per-round", "2", "--rounds", "1",
              "--device", "cpu", "--quiet", "--model", "fedavg-cnn"]
    result = CliRunner().invoke(app, [*common, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert tomllib.loads((out / "config.toml").read_text())["augment"] == "crop-flip"
    bad = CliRunner().invoke(app, [*common, "--augment", "mixup", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--augment" in bad.output and "crop-flip" in bad.output
    assert not (tmp_path / "bad").exists()
