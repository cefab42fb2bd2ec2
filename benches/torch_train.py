#!/usr/bin/env python3
"""PyTorch's side of `pipeline bench train`: the same model and training step, timed the same way.

One step = forward + cross-entropy + backward + SGD (momentum 0.9, weight decay 5e-4) on a batch
of random images (3x32x32 as CIFAR's unless --image-size, 10 classes) already on the device. After --warmup
untimed steps, --steps steps are timed, synchronising the device before reading the clock.
Modes: eager f32, bf16 autocast + channels_last (the fast PyTorch recipe), and that with the
model compiled by torch.compile (`compile`; its compilation falls in the warm-up steps). Models match the
Rust ones layer for layer: CIFAR ResNet-18/34/50/101 (3x3 stem, no max-pool; kuangliu/RepDistiller),
the same with torchvision's ImageNet stem (`resnet50_imagenet`: 7x7 stride-2 convolution, 3x3
stride-2 max-pool), the CIFAR ResNets of depth 6n+2 with projection shortcuts (option B), and
kuangliu's DenseNet-121 and DLA (the paper's Table 5 students). With --teacher, the
On-LDL step of `pipeline bench train --teacher`: the teacher in eval mode under no_grad on the
same batch, its softmax the student's target (soft cross-entropy).

    python3 benches/torch_train.py --model resnet18 --batch 256 --device cuda
    python3 benches/torch_train.py --model resnet20 --batch 64 --device cpu --modes f32
    python3 benches/torch_train.py --model resnet20 --teacher resnet110 --batch 64 --device cuda
"""

import argparse
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride):
        super().__init__()
        cout = planes * 4
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self, block, blocks, widths, classes, imagenet=False):
        super().__init__()
        # The CIFAR stem (3x3 convolution), or torchvision's (7x7 stride 2, then a 3x3 stride-2
        # max-pool), as the Rust `_imagenet` names.
        if imagenet:
            self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin, self.stages = widths[0], len(blocks)
        for i, (n, w) in enumerate(zip(blocks, widths)):
            stride = 1 if i == 0 else 2
            layer = []
            for j in range(n):
                layer.append(block(cin, w, stride if j == 0 else 1))
                cin = w * block.expansion
            # torchvision's names (layer1.0.conv1.weight, ...): the Rust checkpoints load by name.
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DenseLayer(nn.Module):
    """kuangliu/pytorch-cifar's DenseNet Bottleneck: BN-ReLU-1x1 conv, BN-ReLU-3x3 conv, cat in front."""

    def __init__(self, cin, growth):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv1(F.relu(self.bn1(x)))
        y = self.conv2(F.relu(self.bn2(y)))
        return torch.cat([y, x], 1)


class DenseNet(nn.Module):
    """kuangliu's DenseNet-BC (densenet121: blocks 6, 12, 24, 16, growth 32), reduction 0.5."""

    def __init__(self, blocks, growth, classes):
        super().__init__()
        planes = 2 * growth
        self.conv1 = nn.Conv2d(3, planes, 3, padding=1, bias=False)
        self.stages = nn.ModuleList()
        for s, n in enumerate(blocks):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(planes, growth))
                planes += growth
            if s + 1 < len(blocks):
                out = planes // 2
                layers += [nn.BatchNorm2d(planes), nn.ReLU(), nn.Conv2d(planes, out, 1, bias=False), nn.AvgPool2d(2)]
                planes = out
            self.stages.append(nn.Sequential(*layers))
        self.bn = nn.BatchNorm2d(planes)
        self.linear = nn.Linear(planes, classes)

    def forward(self, x):
        x = self.conv1(x)
        for stage in self.stages:
            x = stage(x)
        x = F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1)
        return self.linear(torch.flatten(x, 1))


class DlaTree(nn.Module):
    """kuangliu's DLA tree (models/dla.py): subtrees, prev_root, left and right nodes, a 1x1 root over their cat."""

    def __init__(self, cin, cout, level, stride):
        super().__init__()
        self.level = level
        self.root_conv = nn.Conv2d((2 if level == 1 else level + 2) * cout, cout, 1, bias=False)
        self.root_bn = nn.BatchNorm2d(cout)
        self.subtrees = nn.ModuleList(DlaTree(cin, cout, i, stride) for i in reversed(range(1, level)))
        self.prev_root = Basic(cin, cout, stride) if level > 1 else None
        self.left = Basic(cin if level == 1 else cout, cout, stride if level == 1 else 1)
        self.right = Basic(cout, cout, 1)

    def forward(self, x):
        xs = [self.prev_root(x)] if self.prev_root is not None else []
        for t in self.subtrees:
            x = t(x)
            xs.append(x)
        x = self.left(x)
        xs.append(x)
        x = self.right(x)
        xs.append(x)
        return F.relu(self.root_bn(self.root_conv(torch.cat(xs, 1))))


class Dla(nn.Module):
    """kuangliu's DLA: base width 16, trees of levels 1, 2, 2, 1."""

    def __init__(self, classes, w=16):
        super().__init__()

        def conv_bn(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.base = nn.Sequential(conv_bn(3, w), conv_bn(w, w), conv_bn(w, 2 * w))
        self.trees = nn.Sequential(*(DlaTree(a * w, b * w, level, stride) for a, b, level, stride in
                                     [(2, 4, 1, 1), (4, 8, 2, 2), (8, 16, 2, 2), (16, 32, 1, 2)]))
        self.linear = nn.Linear(32 * w, classes)

    def forward(self, x):
        x = self.trees(self.base(x))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build(name, classes, width=None):
    """The network `name` (as the Rust `model` key) with `width` stem channels."""
    if name == "densenet121":
        return DenseNet([6, 12, 24, 16], 32, classes)
    if name == "dla":
        return Dla(classes)
    imagenet = name.endswith("_imagenet")
    name = name.removesuffix("_imagenet")
    big = {
        "resnet18": (Basic, [2, 2, 2, 2]),
        "resnet34": (Basic, [3, 4, 6, 3]),
        "resnet50": (Bottleneck, [3, 4, 6, 3]),
        "resnet101": (Bottleneck, [3, 4, 23, 3]),
    }
    if name in big:
        block, blocks = big[name]
        w = width or 64
        return ResNet(block, blocks, [w, 2 * w, 4 * w, 8 * w], classes, imagenet)
    depth = int(name.removeprefix("resnet"))
    assert (depth - 2) % 6 == 0 and not imagenet, f"unknown model {name}"
    n, w = (depth - 2) // 6, width or 16
    return ResNet(Basic, [n, n, n], [w, 2 * w, 4 * w], classes)


def bench(args, mode):
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build(args.model, 10).to(device)
    channels_last = mode in ("bf16", "compile")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), device=device)
    teacher = None
    if args.teacher:
        teacher = build(args.teacher, 10).to(device).eval()
        if channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)

    net = torch.compile(model) if mode == "compile" else model

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode != "f32"):
            if teacher is None:
                loss = F.cross_entropy(net(x), y)
            else:
                with torch.no_grad():
                    q = F.softmax(teacher(x).float(), dim=1)
                loss = F.cross_entropy(net(x).float(), q)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    rate = args.steps * args.batch / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    params = sum(p.numel() for p in model.parameters())
    return rate, peak, params


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--teacher", default=None, help="an On-LDL step with this teacher")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=32, help="height and width of the random images")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--modes", default="f32,bf16",
                    help="f32 (eager), bf16 (autocast + channels_last), compile (bf16 + torch.compile)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads of {os.cpu_count()} cores"
    step = f"On-LDL step with teacher {args.teacher}" if args.teacher else "cross-entropy step"
    print(f"PyTorch {torch.__version__} training benchmark ({step}): {args.model}, batch {args.batch} of "
          f"{args.image_size}x{args.image_size} images, {where}, "
          f"{args.warmup} warm-up + {args.steps} timed steps\n")
    print("| model | mode | params | images/s | peak memory (MiB) |")
    print("|---|---|---:|---:|---:|")
    for mode in args.modes.split(","):
        rate, peak, params = bench(args, mode)
        label = {"f32": "eager f32", "bf16": "bf16 autocast + channels_last",
                 "compile": "bf16 autocast + channels_last + torch.compile"}[mode]
        print(f"| {args.model} | {label} | {params:,} | {rate:.0f} | {peak:.0f} |", flush=True)


if __name__ == "__main__":
    main()
