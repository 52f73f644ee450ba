"""Write learnable stand-ins for the CIFAR python releases, in their exact on-disk format, so the
CIFAR experiments (`cifar_cls_seg`, `cifar100_*`) can be tried and timed offline:

    python scripts/fake_cifar.py ROOT [--classes 10|100] [--train N] [--test N] [--seed S]
    kdmtl train +experiment=cifar_cls_seg data.root=ROOT data.download=false ...

Each class has its own colour pair and stripe orientation/frequency, with per-image phase, brightness
and pixel noise, so a classifier can learn it but not trivially (it is NOT CIFAR: figures measured
on it say what the pipeline does, not what CIFAR accuracy is). CIFAR-10 goes to
ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}, CIFAR-100 to
ROOT/cifar-100-python/{train,test,meta}: rows of 3072 uint8 (R, G, B planes of 32x32).
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np


def class_images(labels: np.ndarray, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    style = np.random.default_rng(12345)            # class styles are the same for every split
    colours = style.uniform(0.1, 0.9, (n_classes, 2, 3))
    angles = style.uniform(0, np.pi, n_classes)
    freqs = style.uniform(0.25, 0.9, n_classes)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    out = np.empty((len(labels), 3, 32, 32), np.float32)
    for i, c in enumerate(labels):
        phase = rng.uniform(0, 2 * np.pi)
        wave = 0.5 + 0.5 * np.sin(freqs[c] * (np.cos(angles[c]) * xx + np.sin(angles[c]) * yy) + phase)
        img = colours[c, 0][:, None, None] * wave + colours[c, 1][:, None, None] * (1 - wave)
        img = img * rng.uniform(0.7, 1.3) + rng.normal(0, 0.15, img.shape)
        out[i] = img
    return (np.clip(out, 0, 1) * 255).astype(np.uint8).reshape(len(labels), 3072)


def write(root: Path, classes: int, n_train: int, n_test: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    train_labels = rng.integers(0, classes, n_train)
    test_labels = rng.integers(0, classes, n_test)
    train, test = class_images(train_labels, classes, rng), class_images(test_labels, classes, rng)
    if classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        for b, rows in enumerate(np.array_split(np.arange(n_train), 5)):
            _dump(folder / f"data_batch_{b + 1}", {"data": train[rows], "labels": train_labels[rows].tolist()})
        _dump(folder / "test_batch", {"data": test, "labels": test_labels.tolist()})
        _dump(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        for name, rows, labels in (("train", train, train_labels), ("test", test, test_labels)):
            _dump(folder / name, {"data": rows, "fine_labels": labels.tolist(),
                                  "coarse_labels": (labels // 5).tolist()})
        _dump(folder / "meta", {"fine_label_names": [f"class{i}" for i in range(100)],
                                "coarse_label_names": [f"super{i}" for i in range(20)]})
    return folder


def _dump(path: Path, obj) -> None:
    path.write_bytes(pickle.dumps(obj))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--classes", type=int, choices=(10, 100), default=10)
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write(args.root, args.classes, args.train, args.test, args.seed))


if __name__ == "__main__":
    main()
