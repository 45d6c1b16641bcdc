"""The data set layout (docs/data.md): the files of one pair, and the labelled, unlabelled and evaluation sets
(which ids each holds: ``subsets``).

```
ROOT/A/<id>.png  ROOT/B/<id>.png  ROOT/label/<id>.png  ROOT/list/{train,val,test}.txt
ROOT/pseudo/change/<id>.png  ROOT/pseudo/A/<id>.png  ROOT/pseudo/B/<id>.png    (python -m diffmatch.ceg)
```
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler

from diffmatch import augment
from diffmatch.cli import InputError
from diffmatch.config import IGNORE, AugmentConfig, DataConfig
from diffmatch.images import IMAGE_EXTS, read_label, read_mask, read_rgb
from diffmatch.subsets import eval_ids

LABEL_FLAG = "--data.label-threshold"
"""The option named when a label has values other than 0/255 or 0/1."""


# ----------------------------------------------------------------------------- files of one pair
def image_path(root: Path, folder: str, sample_id: str) -> Path:
    """``root/folder/<id>.png``, or the same name with another image extension when that exists."""
    path = root / folder / f"{sample_id}.png"
    if not path.exists():
        for ext in IMAGE_EXTS:
            if (alt := path.with_suffix(ext)).exists():
                return alt
    return path


# ----------------------------------------------------------------------------- random streams
# A training set's key ``epoch * len(dataset) + index`` names sample ``index`` as drawn in ``epoch``;
# ``EpochSampler`` hands out such keys, and ``sample_rng`` is the stream a key's sample draws from: the
# same in any DataLoader worker.
def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one sample: the same in any worker process."""
    return np.random.default_rng([seed, epoch, index])


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` whose keys carry the epoch, ``epoch * len(dataset) + index``: the training
    sets draw new augmentations every epoch, also in DataLoader workers that live across epochs."""

    def __iter__(self) -> Iterator[int]:
        offset = self.epoch * len(self.dataset)
        return (offset + index for index in super().__iter__())


def require_files(root: Path, ids: list[str], folders: tuple[str, ...], hint: str) -> None:
    """Fail early, naming the first missing file, when any id lacks a file in ``folders``."""
    if not ids:
        raise InputError(f"{root}: the split has no ids; check the list files")
    for folder in folders:
        if not (root / folder).is_dir():
            raise InputError(f"{root / folder}: folder not found; {hint}")
        for sample_id in ids:
            if not (path := image_path(root, folder, sample_id)).exists():
                raise InputError(f"{path}: file not found; {hint}")


def read_pair(root: Path, sample_id: str) -> tuple[np.ndarray, np.ndarray]:
    """The RGB pre- and post-event images of one id; they must have the same size."""
    a, b = read_rgb(image_path(root, "A", sample_id)), read_rgb(image_path(root, "B", sample_id))
    if a.shape != b.shape:
        raise InputError(f"{image_path(root, 'B', sample_id)}: size {b.shape[1]}x{b.shape[0]} differs from "
                         f"A's {a.shape[1]}x{a.shape[0]}; the two dates must be co-registered")
    return a, b


def read_sized(path: Path, shape: tuple[int, ...], reader=read_mask) -> np.ndarray:
    """A mask read by ``reader`` that must match the image size ``shape``."""
    mask = reader(path)
    if mask.shape != shape[:2]:
        raise InputError(f"{path}: size {mask.shape[1]}x{mask.shape[0]} differs from the image's "
                         f"{shape[1]}x{shape[0]}")
    return mask


def pseudo_hint(root: Path, pseudo_dir: str) -> str:
    return f"run `python -m diffmatch.ceg --root {root} --out-name {pseudo_dir}` first"


def read_pseudo(root: Path, pseudo_dir: str, sample_id: str, shape: tuple[int, ...]) -> list[np.ndarray]:
    """CEG change labels and single-date masks of one id (values 0, 1, 255)."""
    masks = []
    for folder in ("change", "A", "B"):
        path = image_path(root / pseudo_dir, folder, sample_id)
        if not path.exists():
            raise InputError(f"{path}: pseudo label not found; {pseudo_hint(root, pseudo_dir)}")
        masks.append(read_sized(path, shape))
    return masks


# ----------------------------------------------------------------------------- datasets
class LabeledSample(NamedTuple):
    """Weak view of a labelled pair. ``pseudo``, ``seg_a``, ``seg_b`` are the CEG labels (all 255
    when not loaded)."""

    a: torch.Tensor
    b: torch.Tensor
    label: torch.Tensor
    pseudo: torch.Tensor
    seg_a: torch.Tensor
    seg_b: torch.Tensor


class UnlabeledSample(NamedTuple):
    """Weak and strong views of an unlabelled pair, its padding mask (255 = padding), CEG labels
    (all 255 when not loaded), the CutMix box of the strong view and the pair's index in the set."""

    a: torch.Tensor
    b: torch.Tensor
    a_strong: torch.Tensor
    b_strong: torch.Tensor
    ignore: torch.Tensor
    pseudo: torch.Tensor
    seg_a: torch.Tensor
    seg_b: torch.Tensor
    box: torch.Tensor
    index: torch.Tensor


class EvalSample(NamedTuple):
    """A whole pair at full size with its label, for evaluation."""

    a: torch.Tensor
    b: torch.Tensor
    label: torch.Tensor
    id: str


class ViewOptions(NamedTuple):
    """What the labelled and unlabelled training sets share: how their pairs are cut and augmented, and
    where their CEG labels are."""

    crop_size: int
    """Side of the square training crop (weak view)."""
    augment: AugmentConfig
    """Weak and strong views (``augment``)."""
    pseudo_dir: str | None = None
    """Folder of the CEG labels under the root (``change/``, ``A/``, ``B/``); None: not loaded (all 255)."""


class _PairSet(Dataset):
    """Shared part of the training sets: ids, pseudo labels, per-sample random streams. A key
    ``epoch * len(self) + index`` gives sample ``index`` as drawn in ``epoch`` (``EpochSampler``)."""

    NEED_LABEL = False
    """Whether every id must have ``label/<id>``."""

    def __init__(self, root: Path, ids: list[str], *, views: ViewOptions, seed: int,
                 label_threshold: int | None = None) -> None:
        folders = ("A", "B", "label") if self.NEED_LABEL else ("A", "B")
        require_files(root, ids, folders, "check the data set root and its list files")
        if views.pseudo_dir is not None:
            require_files(root / views.pseudo_dir, ids, ("change", "A", "B"), pseudo_hint(root, views.pseudo_dir))
        self.root, self.ids, self.crop_size, self.cfg = root, ids, views.crop_size, views.augment
        self.pseudo_dir, self.seed = views.pseudo_dir, seed
        self.read_label = partial(read_label, threshold=label_threshold, flag=LABEL_FLAG)

    def index_and_rng(self, key: int) -> tuple[int, np.random.Generator]:
        """The sample index of ``key`` and the random stream of that sample in the key's epoch."""
        epoch, index = divmod(key, len(self.ids))
        return index, sample_rng(self.seed, epoch, index)

    def __len__(self) -> int:
        return len(self.ids)

    def _load(self, index: int, with_label: bool) -> tuple[Image.Image, Image.Image, list[Image.Image]]:
        sample_id = self.ids[index]
        a, b = read_pair(self.root, sample_id)
        masks = [read_sized(image_path(self.root, "label", sample_id), a.shape, self.read_label)] if with_label else []
        if self.pseudo_dir is not None:
            masks += read_pseudo(self.root, self.pseudo_dir, sample_id, a.shape)
        else:
            masks += [np.full(a.shape[:2], IGNORE, np.uint8)] * 3
        return Image.fromarray(a), Image.fromarray(b), [Image.fromarray(m) for m in masks]


class LabeledSet(_PairSet):
    """Labelled training pairs (weak view), with CEG labels when ``views.pseudo_dir`` is given; labels are
    binarised at ``label_threshold`` when given (``images.read_label``)."""

    NEED_LABEL = True

    def __init__(self, root: Path, ids: list[str], *, views: ViewOptions, seed: int = 0,
                 label_threshold: int | None = None) -> None:
        super().__init__(root, ids, views=views, seed=seed, label_threshold=label_threshold)

    def __getitem__(self, key: int) -> LabeledSample:
        index, rng = self.index_and_rng(key)
        a, b, masks = self._load(index, with_label=True)
        (a, b), masks = augment.weak_view([a, b], masks, self.cfg, self.crop_size, rng)
        return LabeledSample(augment.image_to_tensor(a), augment.image_to_tensor(b),
                             *(augment.mask_to_tensor(m) for m in masks))


class UnlabeledSet(_PairSet):
    """Unlabelled training pairs: weak view, strong view (jitter and blur drawn per date) and CutMix
    box, with CEG labels when ``views.pseudo_dir`` is given."""

    def __init__(self, root: Path, ids: list[str], *, views: ViewOptions, seed: int = 0) -> None:
        super().__init__(root, ids, views=views, seed=seed)

    def __getitem__(self, key: int) -> UnlabeledSample:
        index, rng = self.index_and_rng(key)
        a, b, masks = self._load(index, with_label=False)
        padding = Image.new("L", a.size, 0)
        (a, b), (padding, *masks) = augment.weak_view([a, b], [padding, *masks], self.cfg, self.crop_size, rng)
        a_strong, b_strong = augment.strong_view(a, self.cfg, rng), augment.strong_view(b, self.cfg, rng)
        box = augment.cutmix_box(self.crop_size, self.cfg, rng)
        to_image = augment.image_to_tensor
        return UnlabeledSample(to_image(a), to_image(b), to_image(a_strong), to_image(b_strong),
                               augment.mask_to_tensor(padding), *(augment.mask_to_tensor(m) for m in masks),
                               torch.from_numpy(box), torch.tensor(index))


class EvalSet(Dataset):
    """Whole pairs with labels, unaugmented, for validation and testing (labels binarised at
    ``label_threshold`` when given)."""

    def __init__(self, root: Path, ids: list[str], label_threshold: int | None = None) -> None:
        require_files(root, ids, ("A", "B", "label"), "check the data set root and its list files")
        self.root, self.ids = root, ids
        self.read_label = partial(read_label, threshold=label_threshold, flag=LABEL_FLAG)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> EvalSample:
        sample_id = self.ids[index]
        a, b = read_pair(self.root, sample_id)
        label = read_sized(image_path(self.root, "label", sample_id), a.shape, self.read_label)
        return EvalSample(augment.image_to_tensor(Image.fromarray(a)), augment.image_to_tensor(Image.fromarray(b)),
                          augment.mask_to_tensor(label), sample_id)


def eval_set(data: DataConfig, split: str) -> EvalSet:
    """The evaluation set of ``split`` (``eval_ids``)."""
    return EvalSet(data.root, eval_ids(data, split), data.label_threshold)
