#!/usr/bin/env python3
"""PyTorch twin of one whole `pipeline` training recipe on CIFAR-10, for accuracy/calibration parity.

It reproduces what a `prepare` (source = "cifar10") + `train` (method = "vanilla") + `evaluate`
chain of stages does, step for step, except the batch order and the random draws:

- data: the official binary files read byte-exactly (1 label byte + 3072 pixel bytes, R/G/B
  planes of 32x32), training batches `--batches` (as the prepare key `batches`), the test batch;
  normalised with the fixed CIFAR-10 statistics mean (0.4914, 0.4822, 0.4465), std (0.2470,
  0.2435, 0.2616) (stages/src/kinds/prepare.rs CIFAR10_NORMALIZE), (x/255 - mean)/std;
- augmentation (datasets/src/augment.rs, Augment::CROP_FLIP): random crop of a 4-px zero-padded
  image (the padding is pixel value 0 *before* normalisation, i.e. -mean/std after), offsets
  uniform in 0..=8, then a horizontal flip with probability 1/2, then normalisation;
- loader: a fresh shuffle every epoch, the last partial batch kept (drop_last = false);
- model: benches/torch_train.py's CIFAR ResNets (option B projection shortcuts, our default
  `shortcut = "B"`), initialised as stages/engine/src/models/mod.rs `Model::init`: every conv
  He-normal fan-out (std sqrt(2 / (out_ch * kh * kw))), classifier weight and bias uniform in
  +-1/sqrt(fan_in), BatchNorm gamma 1, beta 0 (eps 1e-5, momentum 0.1, unbiased running var);
- loss: cross-entropy, mean over the batch;
- SGD (stages/engine/src/optim.rs): PyTorch semantics, momentum 0.9, weight decay 5e-4 on every
  trainable tensor (BatchNorm gamma/beta and the classifier bias included), no Nesterov;
- schedule (stages/engine/src/schedule.rs): evaluated per step at t = epoch + batch/steps,
  cosine lr = base * (1 + cos(pi t / epochs)) / 2, optional linear warm-up;
- evaluation (stages/src/science/metrics.rs, docs/metrics.md) on the test split in eval mode:
  top-1 accuracy (argmax, ties to the lowest index), ECE over 10 equal-width confidence bins
  ((m-1)/M, m/M], edges in f32, confidence = max prob), NLL = mean -ln max(p_y, 1e-12) (nats),
  Brier summed over classes.

Prints one JSON line with the metrics (accuracy as a fraction, like metrics.json) and the times:

    python3 benches/torch_recipe.py --data /path/to/cifar-10-batches-bin --batches 1 \\
        --epochs 15 --batch 128 --lr 0.1 --seed 0 --threads 2 --model resnet20
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_train import build  # noqa: E402  (the models, layer for layer as ours)

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
RECORD = 1 + 3 * 32 * 32


def read_cifar10(path):
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % RECORD:
        raise SystemExit(f"{path}: {raw.size} bytes is not a whole number of {RECORD}-byte records")
    raw = raw.reshape(-1, RECORD)
    labels = raw[:, 0].astype(np.int64)
    if labels.max() >= 10:
        raise SystemExit(f"{path}: label {labels.max()} outside 0..10")
    return raw[:, 1:].reshape(-1, 3, 32, 32), labels


def load(data, batches):
    parts = [read_cifar10(os.path.join(data, f"data_batch_{b}.bin")) for b in batches]
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    xte, yte = read_cifar10(os.path.join(data, "test_batch.bin"))
    return torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte), torch.from_numpy(yte)


def normalise(x_u8):
    """uint8 N x 3 x H x W -> normalised float32, as ours: x * 1/(255 std) - mean/std."""
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)
    return x_u8.float() * (1.0 / (255.0 * std)) + (-mean / std)


def crop_flip(x_u8, gen, pad=4):
    """Random crop of the zero-padded (pixel 0) images, then a random horizontal flip."""
    b, c, h, w = x_u8.shape
    padded = F.pad(x_u8, (pad, pad, pad, pad))  # zeros, in uint8 pixel units
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    ar_h, ar_w = torch.arange(h), torch.arange(w)
    rows = oy[:, None] + ar_h[None, :]  # b x h
    cols_idx = torch.where(flip[:, None], (w - 1 - ar_w)[None, :], ar_w[None, :])  # b x w
    cols = ox[:, None] + cols_idx
    bi = torch.arange(b)[:, None, None, None]
    ci = torch.arange(c)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def init_like_ours(model):
    """stages/engine/src/models/mod.rs Model::init."""
    for name, p in model.named_parameters():
        if p.dim() == 4:
            fan_out = p.shape[0] * p.shape[2] * p.shape[3]
            nn.init.normal_(p, 0.0, math.sqrt(2.0 / fan_out))
        elif name.startswith("fc."):
            bound = 1.0 / math.sqrt(model.fc.weight.shape[1])
            nn.init.uniform_(p, -bound, bound)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            assert m.eps == 1e-5 and m.momentum == 0.1


def lr_at(base, schedule, epochs, warmup, epoch, frac):
    """stages/engine/src/schedule.rs lr_at."""
    t = epoch + frac
    if schedule == "cosine":
        lr = base * 0.5 * (1.0 + math.cos(math.pi * t / max(epochs, 1)))
    elif schedule == "constant":
        lr = base
    else:
        raise SystemExit(f"unknown schedule {schedule}")
    if warmup > 0 and t < warmup:
        lr = lr * t / warmup
    return lr


def metrics(probs, labels, bins=10):
    """docs/metrics.md: accuracy, ECE (equal width, f32 edges), NLL (floor 1e-12), Brier."""
    probs = probs.astype(np.float32)
    n, k = probs.shape
    pred = probs.argmax(1)  # first maximum: ties to the lowest index
    conf = probs.max(1)
    hit = (pred == labels).astype(np.float64)
    edges = np.arange(bins + 1, dtype=np.float32) / np.float32(bins)
    b = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)  # ((m-1)/M, m/M]
    ece = 0.0
    for m in range(bins):
        sel = b == m
        if sel.any():
            ece += sel.sum() / n * abs(hit[sel].mean() - conf[sel].astype(np.float64).mean())
    p_true = probs[np.arange(n), labels].astype(np.float64)
    nll = float(-np.log(np.maximum(p_true, 1e-12)).mean())
    onehot = np.eye(k)[labels]
    brier = float(((probs.astype(np.float64) - onehot) ** 2).sum(1).mean())
    return {"accuracy": float(hit.mean()), "ece": float(ece), "nll": nll, "brier": brier}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="folder of the CIFAR-10 binary files")
    ap.add_argument("--batches", default="1,2,3,4,5", help="training batches data_batch_N.bin to read")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
    ap.add_argument("--warmup", type=int, default=0, help="warm-up epochs")
    ap.add_argument("--bins", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="also write the JSON line to this file")
    ap.add_argument("--quiet", action="store_true", help="no per-epoch lines on stderr")
    args = ap.parse_args()

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)

    batches = [int(b) for b in args.batches.split(",")]
    xtr, ytr, xte, yte = load(args.data, batches)
    n = len(ytr)
    steps = math.ceil(n / args.batch)  # drop_last = false

    model = build(args.model, 10)
    init_like_ours(model)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                          weight_decay=args.weight_decay, nesterov=False)

    t_train = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        t_epoch = time.perf_counter()
        order = torch.randperm(n, generator=gen)
        loss_sum, hits = 0.0, 0
        for i in range(steps):
            idx = order[i * args.batch:(i + 1) * args.batch]
            x = normalise(crop_flip(xtr[idx], gen))
            y = ytr[idx]
            lr = lr_at(args.lr, args.schedule, args.epochs, args.warmup, epoch, i / steps)
            for g in opt.param_groups:
                g["lr"] = lr
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(y)
            hits += (logits.argmax(1) == y).sum().item()
        if not args.quiet:
            print(f"epoch {epoch + 1}/{args.epochs}: loss {loss_sum / n:.4f}, train acc {hits / n:.4f}, "
                  f"lr {lr:.5f}, {time.perf_counter() - t_epoch:.1f} s", file=sys.stderr, flush=True)
    train_s = time.perf_counter() - t_train

    model.eval()
    t_eval = time.perf_counter()
    probs = []
    with torch.no_grad():
        for i in range(0, len(yte), 256):
            probs.append(torch.softmax(model(normalise(xte[i:i + 256])).float(), 1).numpy())
    m = metrics(np.concatenate(probs), yte.numpy(), args.bins)
    eval_s = time.perf_counter() - t_eval

    out = {
        "framework": "pytorch",
        "torch": torch.__version__,
        "model": args.model,
        "seed": args.seed,
        "epochs": args.epochs,
        "batch": args.batch,
        "lr": args.lr,
        "train_images": n,
        "test_images": len(yte),
        "threads": torch.get_num_threads(),
        **m,
        "train_seconds": round(train_s, 2),
        "eval_seconds": round(eval_s, 2),
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    line = json.dumps(out)
    print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
