"""Build ``fedbench/assets/fmnist_mini.pt.gz``: a fixed class-balanced subset of Fashion-MNIST.

Selection rule: one ``numpy.random.default_rng(0)``; for the train split, then the test
split, and for class 0..9 in order, the indices (in file order) of that class are permuted
with the generator and the first k kept (k = 1000 for train, 200 for test). The kept
indices are sorted ascending, so the subset keeps the original file order.

The output is a ``torch.save`` dict: ``train_x`` uint8 [10000, 1, 28, 28], ``train_y``
int64 [10000], ``test_x`` uint8 [2000, 1, 28, 28], ``test_y`` int64 [2000], and
``train_idx`` / ``test_idx`` (int64, the selected indices into the original files).

Usage:
    python scripts/make_fmnist_mini.py --src /path/to/fashion-mnist --out fedbench/assets/fmnist_mini.pt.gz
where ``--src`` holds the original train-/t10k-{images-idx3,labels-idx1}-ubyte.gz files.
"""

from __future__ import annotations

import argparse
import gzip
import io
from pathlib import Path

import numpy as np
import torch

from fedbench.data import IDX_FILES, read_idx

SEED = 0
PER_CLASS = {"train": 1000, "test": 200}
NUM_CLASSES = 10


def select(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``per_class`` random samples of each class 0..NUM_CLASSES-1."""
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(NUM_CLASSES)]
    return np.sort(np.concatenate(chosen))


def build(src: Path) -> dict[str, torch.Tensor]:
    """The fmnist-mini tensors, selected from the original IDX files in ``src``."""
    x_tr, y_tr, x_te, y_te = (read_idx(src / f) for f in IDX_FILES)
    rng = np.random.default_rng(SEED)
    out = {}
    for split, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        idx = torch.from_numpy(select(y.numpy(), PER_CLASS[split], rng))
        out[f"{split}_x"] = x[idx].unsqueeze(1).contiguous()
        out[f"{split}_y"] = y[idx].long()
        out[f"{split}_idx"] = idx
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, required=True, help="folder with the original Fashion-MNIST .gz files")
    parser.add_argument("--out", type=Path, default=Path("fedbench/assets/fmnist_mini.pt.gz"))
    args = parser.parse_args()
    blob = build(args.src)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    with gzip.GzipFile(args.out, "wb", mtime=0) as f:  # mtime 0: byte-identical rebuilds
        f.write(buffer.getvalue())
    pixels = blob["train_x"].double() / 255
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): "
          f"train {tuple(blob['train_x'].shape)}, test {tuple(blob['test_x'].shape)}, "
          f"train mean {pixels.mean().item():.4f} std {pixels.std(unbiased=False).item():.4f}")


if __name__ == "__main__":
    main()
