"""An encoder pretrained on single-date land-cover segmentation of synthetic scenes: a CPU stand-in
for the ImageNet initialisation of the paper (§4.1.2) where no weights can be downloaded.

    python -m diffmatch.pretrain --out encoder.pt --backbone resnet18
    python -m diffmatch.train --data.root syn --model.weights encoder.pt ...

The scenes are drawn with a seed of their own, so they are disjoint from every data set that
``python -m diffmatch.synthetic`` writes with seeds below 1,000,000; the task (cover classes of one date:
roads, grass, trees, water, bare ground) is not change detection, and no change label is seen. House and
building pixels are left unlabelled (ignored by the loss) unless ``--with-buildings`` is given: ImageNet
weights carry no building masks either, and an encoder taught the very concept the change labels are
about would pre-empt what the unlabelled pairs and the VLM guidance teach (docs/benchmark.md measures
both). The saved file is a torchvision ResNet state dict.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffmatch import losses
from diffmatch.atomic import atomic_path
from diffmatch.augment import MEAN, STD
from diffmatch.cli import InputError, Progress
from diffmatch.config import IGNORE, Backbone
from diffmatch.decoders import SegmentationDecoder
from diffmatch.encoder import SiameseEncoder
from diffmatch.lab.synthetic import scene

NUM_COVER = 7
"""Cover classes of ``scene``: HOUSE, BUILDING, ROAD, GRASS, TREE, WATER, SOIL."""
SEED = 1_000_003
"""Seed of the pretraining scenes, apart from the data sets' seeds."""


@dataclass
class Args:
    """Pretrain a ResNet encoder on synthetic single-date land-cover segmentation; save its weights."""

    out: Path
    """Weights file to write (a torchvision ResNet state dict, for ``--model.weights``)."""
    backbone: Backbone = "resnet18"
    """Encoder to pretrain."""
    scenes: int = 300
    """Synthetic scenes drawn (two dates each)."""
    size: int = 96
    """Side of each scene in pixels (0.5 m/px)."""
    crop: int = 64
    """Side of the training crops."""
    iters: int = 600
    """Training iterations."""
    batch_size: int = 16
    """Images per batch."""
    lr: float = 0.02
    """SGD learning rate of the encoder (the decoder's is 10x), poly decay."""
    seed: int = 0
    """Seed of the initialisation and the crops."""
    with_buildings: bool = False
    """Also label houses and buildings (the first stand-in, which has seen the concept the change labels
    are about); default: their pixels are ignored."""


def draw_scenes(count: int, size: int, *, with_buildings: bool = True) -> tuple[Tensor, Tensor]:
    """Normalised images (2 * count, 3, size, size) and cover maps (2 * count, size, size) of both dates
    of ``count`` scenes; without ``with_buildings``, house and building pixels are ``IGNORE``."""
    images, covers = [], []
    progress = Progress("scenes", count, "scenes", file=sys.stderr)
    for i in range(count):
        pair = scene.draw_pair(np.random.default_rng([SEED, i]), size, change_density=0.5)
        for view in (pair.a, pair.b):
            images.append(torch.from_numpy(view.image).permute(2, 0, 1))
            cover = view.cover.astype(np.int64)
            if not with_buildings:
                cover[(cover == scene.HOUSE) | (cover == scene.BUILDING)] = IGNORE
            covers.append(torch.from_numpy(cover))
        progress.step()
    x = torch.stack(images).float().div(255)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std, torch.stack(covers)


def random_batch(images: Tensor, covers: Tensor, batch_size: int, crop: int,
                 generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random crops with random horizontal and vertical flips."""
    index = torch.randint(len(images), (batch_size,), generator=generator)
    side = images.shape[-1]
    xs, ys = [], []
    for i in index.tolist():
        top, left = torch.randint(side - crop + 1, (2,), generator=generator).tolist()
        x, y = images[i, :, top:top + crop, left:left + crop], covers[i, top:top + crop, left:left + crop]
        for dim in (-1, -2):
            if torch.rand((), generator=generator) < 0.5:
                x, y = x.flip(dim), y.flip(dim)
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


class CoverNet(nn.Module):
    """The change model's encoder and one segmentation decoder over the cover classes."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.encoder = SiameseEncoder(backbone=backbone)
        self.decoder = SegmentationDecoder(in_channels=self.encoder.channels, channels=64, num_classes=NUM_COVER)

    def forward(self, x: Tensor) -> Tensor:
        _, logits = self.decoder(self.encoder.features(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def pretrain(args: Args) -> dict[str, float]:
    """Train, save the encoder's weights atomically, return the last loss and pixel accuracy."""
    if args.crop > args.size or min(args.scenes, args.iters, args.batch_size) < 1:
        raise InputError(f"--crop {args.crop} --size {args.size} --scenes {args.scenes} --iters {args.iters}: "
                         "need crop <= size and at least one scene, iteration and image per batch")
    torch.manual_seed(args.seed)
    images, covers = draw_scenes(args.scenes, args.size, with_buildings=args.with_buildings)
    net = CoverNet(args.backbone)
    groups = [{"params": net.encoder.parameters(), "base_lr": args.lr},
              {"params": net.decoder.parameters(), "base_lr": args.lr * 10}]
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(args.seed)
    progress, start = Progress("pretrain", args.iters, "iterations", file=sys.stderr), time.time()
    loss, accuracy = torch.zeros(()), torch.zeros(())
    for it in range(args.iters):
        for group in optimizer.param_groups:
            group["lr"] = losses.poly_lr(group["base_lr"], it, args.iters)
        x, y = random_batch(images, covers, args.batch_size, args.crop, generator)
        logits = net(x)
        loss = F.cross_entropy(logits, y, ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        labelled = y != IGNORE
        accuracy = (logits.argmax(1) == y)[labelled].float().mean()
        progress.step()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        torch.save(net.encoder.state_dict(), tmp)
    result = {"loss": float(loss.detach()), "pixel_accuracy": 100 * float(accuracy), "seconds": time.time() - start}
    print(f"pretrained {args.backbone} on {args.scenes} scenes, {args.iters} iterations: loss {result['loss']:.3f}, "
          f"pixel accuracy {result['pixel_accuracy']:.1f} % of the last batch's labelled pixels; wrote {args.out}")
    return result

