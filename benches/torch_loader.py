#!/usr/bin/env python3
"""The torchvision DataLoader doing the work of `pipeline bench loader`, for a side-by-side figure.

Same data (CIFAR-10 binary training batches from --cifar10, else 50,000 random 3x32x32 images),
same batch (256), same augmentation: RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor,
Normalize with the CIFAR-10 statistics; optionally CutMix (torchvision.transforms.v2.CutMix,
alpha 1, applied to every batch in the workers' collate, as `pipeline bench loader`'s p = 1).
One untimed warm-up epoch, then --epochs timed epochs; prints a Markdown table like the Rust one.
With --imagenet-shaped: random 3x256x256 images and ImageNet's training view,
RandomResizedCrop(224), RandomHorizontalFlip, ToTensor, Normalize (`pipeline bench loader
--imagenet-shaped`). With --imagefolder DIR as well: torchvision's own ImageNet pipeline on the
files of an ImageFolder split (ImageFolder decoding each JPEG, then the same view), beside
`pipeline bench loader --imagenet-shaped --pack` on that split prepared by a prepare stage.

    pip install torch torchvision numpy pillow
    python3 benches/torch_loader.py --cifar10 ../shared/data/cifar-10-batches-bin --workers 1,2
    python3 benches/torch_loader.py --imagenet-shaped --imagefolder /data/imagenet/train --batch 100
"""

import argparse
import glob
import os
import time

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def load_cifar10(folder):
    """Training batches of the CIFAR-10 binary version: 1 label byte + 3072 CHW pixel bytes."""
    files = sorted(glob.glob(os.path.join(folder, "data_batch_*.bin")))
    if not files:
        raise SystemExit(f"{folder}: no data_batch_*.bin")
    raw = np.concatenate([np.fromfile(f, dtype=np.uint8).reshape(-1, 3073) for f in files])
    labels = raw[:, 0].astype(np.int64)
    images = raw[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()  # HWC for PIL
    return images, labels, f"CIFAR-10 training batches of {folder} ({len(files)} file(s))"


def random_images(n, side=32):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).astype(np.int64)
    return images, labels, f"{n} random 3x{side}x{side} images"


class Cifar(Dataset):
    """torchvision's CIFAR10 dataset, minus the pickle: a PIL image per item, then transforms."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


class CutMixCollate:
    """Collates a batch, then applies CutMix to it (in the worker process)."""

    def __init__(self):
        from torchvision.transforms import v2

        self.cutmix = v2.CutMix(num_classes=10, alpha=1.0)

    def __call__(self, batch):
        return self.cutmix(*default_collate(batch))


def rate(dataset, workers, batch, epochs, collate):
    loader = DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=workers > 0,
        drop_last=False,
    )
    for _ in loader:  # warm-up epoch: worker start-up excluded, as in the Rust benchmark
        pass
    t0 = time.perf_counter()
    n = 0
    for _ in range(epochs):
        for x, _y in loader:
            n += x.shape[0]
    return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cifar10", help="CIFAR-10 binary folder (default: random images)")
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--imagenet-shaped", action="store_true")
    ap.add_argument("--imagefolder", help="with --imagenet-shaped: an ImageFolder split folder "
                    "(<class>/<image files>) read by torchvision's ImageFolder instead of random images")
    args = ap.parse_args()
    if args.imagefolder and not args.imagenet_shaped:
        raise SystemExit("--imagefolder goes with --imagenet-shaped")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    if args.imagenet_shaped:
        images, labels, what = random_images(0 if args.imagefolder else args.images, 256)
        first = T.RandomResizedCrop(224)
        setups = [("random-resized-crop(224)+flip+normalise", default_collate)]
    else:
        images, labels, what = load_cifar10(args.cifar10) if args.cifar10 else random_images(args.images)
        first = T.RandomCrop(32, padding=4)
        setups = [
            ("crop+flip+normalise", default_collate),
            ("crop+flip+normalise+CutMix (p = 1)", CutMixCollate()),
        ]
    transform = T.Compose([first, T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    if args.imagefolder:
        from torchvision.datasets import ImageFolder

        dataset = ImageFolder(args.imagefolder, transform=transform)
        what = f"{len(dataset)} image files of {args.imagefolder} (torchvision ImageFolder, PIL)"
    else:
        dataset = Cifar(images, labels, transform)
    print(
        f"torchvision loader benchmark: {what}, batch {args.batch}, torch {torch.__version__}, "
        f"{args.epochs} timed epoch(s) after a warm-up, {os.cpu_count()} cores\n"
    )
    print("| augmentation | workers | images/s |")
    print("|---|---:|---:|")
    for name, collate in setups:
        for w in [int(x) for x in args.workers.split(",")]:
            print(f"| {name} | {w} | {rate(dataset, w, args.batch, args.epochs, collate):.0f} |", flush=True)


if __name__ == "__main__":
    main()
