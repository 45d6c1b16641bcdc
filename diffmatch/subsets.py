"""Which ids a run uses (docs/data.md): the split lists of a data set root, the labelled/unlabelled training
split of a label ratio, the evaluation splits, and the checks and padding of those id lists."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from diffmatch.cli import InputError
from diffmatch.config import DataConfig
from diffmatch.pairs import images_in, read_id_list


def list_ids(root: Path, split: str) -> list[str]:
    """Ids of ``split`` from ``root/list/<split>.txt``; without a ``list/`` folder, every image in
    ``root/A`` (sorted)."""
    if not root.is_dir():
        raise InputError(f"{root}: data set root not found; pass --data.root with A/, B/ and label/")
    if (root / "list").is_dir():
        if split in ("val", "test") and not (root / "list" / f"{split}.txt").is_file():
            raise InputError(f"{root / 'list' / split}.txt: list file not found; hold out whole source images for "
                             "val and test with `python -m diffmatch.prepare folder ... --holdout val=0.1,test=0.2`")
        return read_id_list(root / "list" / f"{split}.txt")
    folder = root / "A"
    ids = sorted(images_in(folder))
    if not ids:
        raise InputError(f"{folder}: no images found; a data set root holds A/, B/ and label/")
    return ids


PUBLIC_SPLITS = Path(__file__).resolve().parent / "splits"
"""The public LEVIR-CD and WHU-CD split lists shipped with the package (``levir/``, ``whu/``)."""


def split_folder(split_dir: Path) -> Path:
    """The folder ``--data.split-dir`` names: a folder that exists, else for ``levir`` or ``whu`` the
    public split lists shipped with the package (docs/data.md)."""
    if not split_dir.exists() and str(split_dir) in ("levir", "whu"):
        return PUBLIC_SPLITS / str(split_dir)
    return split_dir


def percent_name(label_ratio: float) -> str:
    """The split-folder name of a label ratio: 0.05 -> ``5%``."""
    return f"{label_ratio * 100:g}%"


class SemiSplit(NamedTuple):
    """Training ids: the labelled subset and the unlabelled rest."""

    labeled: list[str]
    unlabeled: list[str]


def semi_split(data: DataConfig, label_ratio: float, seed: int) -> SemiSplit:
    """Labelled and unlabelled training ids: from the split folder when given, else a seeded draw of
    ``label_ratio`` of the training ids (the same ids for the same seed)."""
    if not 0 < label_ratio <= 1:
        raise InputError(f"--label-ratio {label_ratio}: must be in (0, 1], e.g. 0.05 for 5 %")
    if data.split_dir is not None:
        split_dir = split_folder(data.split_dir)
        folder = split_dir / percent_name(label_ratio)
        if not folder.is_dir():
            have = sorted(p.name for p in split_dir.glob("*%")) if split_dir.is_dir() else []
            raise InputError(f"{folder}: split folder not found (have: {', '.join(have) or 'none'}); "
                             "check --data.split-dir and --label-ratio")
        labeled = read_id_list(folder / "labeled.txt")
        unlabeled_file = folder / "unlabeled.txt"
        unlabeled = read_id_list(unlabeled_file) if unlabeled_file.exists() else []
    else:
        train = list_ids(data.root, "train")
        count = max(1, round(label_ratio * len(train)))
        order = np.random.default_rng(seed).permutation(len(train))
        chosen = set(order[:count].tolist())
        labeled = [train[i] for i in sorted(chosen)]
        unlabeled = [train[i] for i in range(len(train)) if i not in chosen]
    if data.unlabeled_root is not None:
        unlabeled = list_ids(data.unlabeled_root, "train")
    return SemiSplit(labeled, unlabeled)


def repeat_to(ids: list[str], length: int) -> list[str]:
    """``ids`` repeated (whole copies, then a prefix) to exactly ``length`` entries."""
    if not ids:
        return []
    copies = -(-length // len(ids))
    return (ids * copies)[:length]


def eval_ids(data: DataConfig, split: str) -> list[str]:
    """The ids of evaluation split ``split``, from the split folder's list when it has one."""
    if data.split_dir is not None and (split_folder(data.split_dir) / f"{split}.txt").exists():
        return read_id_list(split_folder(data.split_dir) / f"{split}.txt")
    return list_ids(data.root, split)


def leak_warning(labelled: list[str], ids: list[str], split: str) -> str | None:
    """One warning line when labelled training ids are also in the evaluation split ``split``, else None."""
    shared = sorted(set(labelled) & set(ids))
    if not shared:
        return None
    return (f"warning: {len(shared)} labelled training id(s) are also in the {split} split (e.g. {shared[0]}): its "
            "scores are not held-out; split whole scenes apart (prepare folder --holdout)")
