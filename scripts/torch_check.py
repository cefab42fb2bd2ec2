#!/usr/bin/env python3
"""Loads a model a `train` stage wrote into PyTorch by tensor name and evaluates it on a packed split.

Checks that the checkpoint format is what the README says: `model.safetensors` holds torchvision-
named tensors (`conv1.weight`, `layer1.0.bn1.running_mean`, `fc.bias`, ...) that load into the
equivalent PyTorch network (benches/torch_train.py's, CIFAR stem, projection shortcuts), and that
the PyTorch network, given the same normalised test images (their centre squares for a model
trained with `crop_size`), reaches the accuracy and NLL that the `evaluate` stage reported.

    pip install torch numpy safetensors
    python3 scripts/torch_check.py outputs/stages/student-vanilla outputs/stages/data outputs/stages/eval-vanilla
"""

import json
import os
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benches"))
from torch_train import build  # noqa: E402


def read_pack(path):
    """A packed split (datasets/src/packed.rs): labels and CHW uint8 pixels."""
    raw = np.fromfile(path, dtype=np.uint8)
    assert raw[:8].tobytes() == b"LDLPACK\0", f"{path}: not a packed store"
    version, = struct.unpack_from("<I", raw, 8)
    if version != 1:
        raise SystemExit(f"{path}: packed format version {version} (images of varying sizes, "
                         "keep_aspect); this script reads version 1")
    n, = struct.unpack_from("<Q", raw, 16)
    h, w, c, k = struct.unpack_from("<4I", raw, 24)
    names_len, = struct.unpack_from("<I", raw, 72)
    align = lambda x: (x + 63) // 64 * 64  # noqa: E731
    labels_at = align(76 + names_len)
    labels = raw[labels_at:labels_at + 4 * n].view("<u4").astype(np.int64)
    pixels_at = align(labels_at + 4 * n)
    pixels = raw[pixels_at:pixels_at + n * c * h * w].reshape(n, c, h, w)
    return labels, pixels


def main():
    model_dir, data_dir = sys.argv[1], sys.argv[2]
    eval_dir = sys.argv[3] if len(sys.argv) > 3 else None
    meta = json.load(open(os.path.join(model_dir, "model.json")))
    spec = meta["spec"]
    assert spec.get("stem", "cifar") == "cifar" and spec["shortcut"] == "B", "CIFAR stem, shortcut B only"
    net = build(spec["arch"], spec["classes"], spec["width"])
    state = load_file(os.path.join(model_dir, "model.safetensors"))
    missing, unexpected = net.load_state_dict(state, strict=False)
    # PyTorch's BatchNorm counts its updates (num_batches_tracked); nothing else may be missing.
    missing = [m for m in missing if not m.endswith("num_batches_tracked")]
    assert not missing and not unexpected, f"missing {missing}, unexpected {unexpected}"
    print(f"loaded {len(state)} tensors by name into PyTorch {spec['arch']} (width {spec['width']})")
    info = json.load(open(os.path.join(data_dir, "dataset.json")))
    labels, pixels = read_pack(os.path.join(data_dir, info["test"]["file"]))
    side = meta.get("crop_size")
    if side:
        # What `evaluate` shows a model trained on crops: torchvision's CenterCrop(side).
        h, w = pixels.shape[2:]
        top, left = int(round((h - side) / 2.0)), int(round((w - side) / 2.0))
        pixels = pixels[:, :, top:top + side, left:left + side]
        print(f"centre {side}x{side} crops of the {h}x{w} test images (the model's crop_size)")
    mean = torch.tensor(info["normalize"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(info["normalize"]["std"]).view(1, -1, 1, 1)
    net.eval()
    with torch.no_grad():
        x = (torch.from_numpy(pixels.astype(np.float32)) / 255.0 - mean) / std
        logits = torch.cat([net(x[i:i + 256]) for i in range(0, len(x), 256)])
    y = torch.from_numpy(labels)
    acc = (logits.argmax(1) == y).float().mean().item()
    nll = F.cross_entropy(logits.double(), y).item()
    print(f"PyTorch on {len(y)} test images: accuracy {acc:.4f}, NLL {nll:.4f}")
    if eval_dir:
        m = json.load(open(os.path.join(eval_dir, "metrics.json")))["metrics"]
        print(f"pipeline evaluate:             accuracy {m['accuracy']:.4f}, NLL {m['nll']:.4f}")
        ok = abs(acc - m["accuracy"]) <= 2 / len(y) and abs(nll - m["nll"]) < 1e-3
        print("agree" if ok else "DISAGREE")
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
