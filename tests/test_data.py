from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA, write_pair
from PIL import Image

from diffmatch.cli import InputError
from diffmatch.config import AugmentConfig, DataConfig
from diffmatch.data import EpochSampler, EvalSet, LabeledSet, UnlabeledSet, ViewOptions, eval_set
from diffmatch.images import read_label, read_rgb
from diffmatch.subsets import PUBLIC_SPLITS, eval_ids, list_ids, percent_name, repeat_to, semi_split, split_folder

LEVIR = DATA / "levir-samples"


def test_official_levir_split_at_5_percent() -> None:
    split = semi_split(DataConfig(root=LEVIR, split_dir=Path("levir")), 0.05, seed=0)
    assert len(split.labeled) == 356 and len(split.unlabeled) == 6764
    assert not set(split.labeled) & set(split.unlabeled)
    assert all(not i.endswith(".png") for i in split.labeled)
    assert split == semi_split(DataConfig(root=LEVIR, split_dir=PUBLIC_SPLITS / "levir"), 0.05, seed=0)


@pytest.mark.parametrize(("name", "train", "val", "test", "labeled_40"),
                         [("levir", 7120, 1024, 2048, 2848), ("whu", 5947, 743, 744, 2378)])
def test_public_split_lists_ship_with_the_package(name: str, train: int, val: int, test: int,
                                                  labeled_40: int) -> None:
    data = DataConfig(root=LEVIR, split_dir=Path(name))
    assert [len(eval_ids(data, s)) for s in ("train", "val", "test")] == [train, val, test]
    split = semi_split(data, 0.4, seed=0)
    assert len(split.labeled) == labeled_40 and len(split.labeled) + len(split.unlabeled) == train


def test_a_folder_named_like_a_public_split_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "levir" / "5%").mkdir(parents=True)
    (tmp_path / "levir" / "5%" / "labeled.txt").write_text("mine.png\n")
    monkeypatch.chdir(tmp_path)
    assert split_folder(Path("levir")) == Path("levir")
    assert semi_split(DataConfig(root=LEVIR, split_dir=Path("levir")), 0.05, 0) == (["mine"], [])
    assert split_folder(Path("whu")) == PUBLIC_SPLITS / "whu"
    assert split_folder(Path("other")) == Path("other")


def test_percent_names() -> None:
    assert [percent_name(r) for r in (0.05, 0.1, 0.2, 0.4, 0.025, 1.0)] == ["5%", "10%", "20%", "40%", "2.5%", "100%"]


def test_seeded_draw_is_deterministic_and_disjoint(tiny_root: Path) -> None:
    data = DataConfig(root=tiny_root)
    first, again, other = (semi_split(data, 0.5, seed) for seed in (1, 1, 2))
    assert first == again
    assert len(first.labeled) == 3 and len(first.unlabeled) == 3
    assert sorted(first.labeled + first.unlabeled) == sorted(list_ids(tiny_root, "train"))
    assert not set(first.labeled) & set(first.unlabeled)
    # The draws themselves, pinned: a run's labelled ids must not change between versions.
    assert first.labeled == ["p0", "p2", "p4"] and other.labeled == ["p2", "p3", "p5"]
    assert other.unlabeled == ["p0", "p1", "p4"]
    assert semi_split(data, 1.0, 0).unlabeled == []


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_bad_ratio(tiny_root: Path, ratio: float) -> None:
    with pytest.raises(InputError, match="label-ratio"):
        semi_split(DataConfig(root=tiny_root), ratio, 0)


def test_split_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="split folder not found.*5%"):
        semi_split(DataConfig(root=LEVIR, split_dir=Path("levir")), 0.07, 0)
    (tmp_path / "5%").mkdir()
    (tmp_path / "5%" / "labeled.txt").write_text("\n\n")
    with pytest.raises(InputError, match="labeled.txt: the list is empty"):
        semi_split(DataConfig(root=LEVIR, split_dir=tmp_path), 0.05, 0)


def test_cross_dataset_unlabeled_root(tiny_root: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    for i in range(4):
        write_pair(other, f"o{i}", seed=i)
    split = semi_split(DataConfig(root=tiny_root, unlabeled_root=other), 0.5, 0)
    assert split.unlabeled == ["o0", "o1", "o2", "o3"] and len(split.labeled) == 3


def test_real_levir_samples_load() -> None:
    ids = list_ids(LEVIR, "test")  # no list/ folder: every image in A/
    assert ids == ["test_113_0256", "test_2_0000_0000", "train_386_0512_0768", "val_27_0000_0256"]
    labeled = [i for i in ids if (LEVIR / "label" / f"{i}.png").exists()]
    assert len(labeled) == 3
    samples = EvalSet(LEVIR, labeled)
    for sample in samples:
        assert sample.a.shape == (3, 256, 256) and sample.label.shape == (256, 256)
        assert set(sample.label.unique().tolist()) <= {0, 1}
    assert sum(int(s.label.sum()) for s in samples) > 0
    # The odd RGBA pair has no label and dates one row apart (768x384 vs 768x383): both reported clearly.
    with pytest.raises(InputError, match="label/test_113_0256.png: file not found"):
        EvalSet(LEVIR, ids)
    assert read_rgb(LEVIR / "A" / "test_113_0256.png").shape == (384, 768, 3)
    odd = UnlabeledSet(LEVIR, ["test_113_0256"], views=ViewOptions(256, AugmentConfig()))
    with pytest.raises(InputError, match=r"B/test_113_0256.png: size 768x383 differs from A's 768x384"):
        odd[0]


def test_label_formats(tmp_path: Path) -> None:
    target = np.array([[0, 1], [1, 0]], np.uint8)
    cases = {
        "binary": target,
        "bytes": target * 255,
        "rgb": np.repeat((target * 255)[..., None], 3, axis=2),
        "rgba": np.dstack([np.repeat((target * 255)[..., None], 3, axis=2), np.full((2, 2), 255, np.uint8)]),
    }
    for name, array in cases.items():
        Image.fromarray(array).save(tmp_path / f"{name}.png")
        np.testing.assert_array_equal(read_label(tmp_path / f"{name}.png"), target, err_msg=name)
    palette = Image.fromarray(target, mode="P")
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(read_label(tmp_path / "palette.png"), target)
    Image.fromarray(np.array([[0, 128]], np.uint8)).save(tmp_path / "grey.png")
    with pytest.raises(InputError, match=r"grey.png: 1 of 2 label pixels have values \{128\}, not 0 or 255; "
                                         r"pass --label-threshold 128 "):
        read_label(tmp_path / "grey.png")
    Image.fromarray(np.array([[0, 1, 2, 2]], np.uint8)).save(tmp_path / "classes.png")
    with pytest.raises(InputError, match=r"classes.png: 2 of 4 label pixels have values \{2\}, not 0 or 1; "
                                         r"pass --label-threshold 1 to binarise the labels \(value >= 1 is change"):
        read_label(tmp_path / "classes.png")
    Image.fromarray(np.array([[[255, 0, 0]]], np.uint8)).save(tmp_path / "red.png")
    with pytest.raises(InputError, match="red.png: label has differing colour channels.*--label-threshold T"):
        read_label(tmp_path / "red.png")


def test_stray_label_values_are_named_or_binarised(tmp_path: Path) -> None:
    label = np.zeros((640, 952), np.uint8)  # a BMP label of a public benchmark: 0/255 and 8 stray greys
    label[100:300, 200:500] = 255
    label[5, 10:18] = [21, 37, 60, 96, 128, 200, 252, 252]
    Image.fromarray(label).save(tmp_path / "site.bmp")
    expected = (r"site.bmp: 8 of 609,280 label pixels have values \{21, 37, 60, 96, 128, \.\.\., 252\} "
                r"\(7 values\), not 0 or 255; pass --data.label-threshold 128 to binarise the labels "
                r"\(value >= 128 is change\)$")
    with pytest.raises(InputError, match=expected):
        read_label(tmp_path / "site.bmp", flag="--data.label-threshold")
    binary = read_label(tmp_path / "site.bmp", threshold=128)
    np.testing.assert_array_equal(binary, (label >= 128).astype(np.uint8))
    assert int(binary.sum()) == 200 * 300 + 4
    # Clean labels are read as they are, whatever the threshold: a 0/1 label is not wiped out by T = 128.
    Image.fromarray((label == 255).astype(np.uint8)).save(tmp_path / "binary.png")
    np.testing.assert_array_equal(read_label(tmp_path / "binary.png", threshold=128), label == 255)
    colour = np.zeros((2, 2, 3), np.uint8)
    colour[0, 0], colour[1, 1] = (250, 10, 10), (90, 90, 90)  # red change, grey noise
    Image.fromarray(colour).save(tmp_path / "colour.png")
    np.testing.assert_array_equal(read_label(tmp_path / "colour.png", threshold=128), [[1, 0], [0, 0]])
    with pytest.raises(InputError, match="--label-threshold 0: must be at least 1"):
        read_label(tmp_path / "site.bmp", threshold=0)


def test_datasets_binarise_labels_at_the_data_threshold(tiny_root: Path) -> None:
    label = np.zeros((32, 32), np.uint8)
    label[:8] = 255
    label[20, :3] = 40, 140, 254
    write_pair(tiny_root, "noisy", label=label)
    with pytest.raises(InputError, match=r"noisy.png: 3 of 1,024 .* pass --data.label-threshold 128"):
        EvalSet(tiny_root, ["noisy"])[0]
    sample = eval_set(DataConfig(root=tiny_root, label_threshold=128), "val")
    assert sample.read_label.keywords == {"threshold": 128, "flag": "--data.label-threshold"}
    evaluated = EvalSet(tiny_root, ["noisy"], label_threshold=128)[0].label
    assert int(evaluated.sum()) == 8 * 32 + 2 and evaluated[20, :3].tolist() == [0, 1, 1]
    cfg = AugmentConfig(scale=(1.0, 1.0), hflip_prob=0.0)
    trained = LabeledSet(tiny_root, ["noisy"], views=ViewOptions(32, cfg), label_threshold=128)[0].label
    assert torch.equal(trained, evaluated)


def test_grey_and_palette_images_become_rgb(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 5), 7, np.uint8)).save(tmp_path / "grey.png")
    Image.fromarray(np.zeros((4, 5), np.uint8), mode="P").save(tmp_path / "pal.png")
    for name in ("grey", "pal"):
        assert read_rgb(tmp_path / f"{name}.png").shape == (4, 5, 3)


def odd_size(root: Path) -> None:
    write_pair(root, "odd", size=(32, 32))
    Image.fromarray(np.zeros((16, 32, 3), np.uint8)).save(root / "B" / "odd.png")


def small_label(root: Path) -> None:
    write_pair(root, "small_label")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "label" / "small_label.png")


def broken(root: Path) -> None:
    (root / "A" / "broken.png").write_bytes(b"not a png")
    shutil.copy(root / "B" / "p0.png", root / "B" / "broken.png")
    shutil.copy(root / "label" / "p0.png", root / "label" / "broken.png")


@pytest.mark.parametrize(("make", "sample_id", "message"), [
    (odd_size, "odd", r"B/odd.png: size 32x16 differs from A's 32x32"),
    (small_label, "small_label", r"label/small_label.png: size 8x8 differs"),
    (broken, "broken", r"A/broken.png: cannot read image"),
])
def test_a_bad_pair_names_the_file(tiny_root: Path, make, sample_id: str, message: str) -> None:
    make(tiny_root)
    with pytest.raises(InputError, match=message):
        EvalSet(tiny_root, [sample_id])[0]


def test_a_missing_file_is_named_before_reading(tiny_root: Path) -> None:
    with pytest.raises(InputError, match=r"A/missing.png: file not found"):
        EvalSet(tiny_root, ["missing"])


def test_an_empty_split_is_an_error(tiny_root: Path) -> None:
    with pytest.raises(InputError, match="the split has no ids"):
        EvalSet(tiny_root, [])


@pytest.mark.parametrize(("where", "split", "message"), [
    ("nope", "train", "data set root not found"),
    ("", "nosuch", r"list/nosuch.txt: list file not found"),
])
def test_bad_roots_and_lists(tiny_root: Path, where: str, split: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        list_ids(tiny_root / where, split)


def test_missing_pseudo_labels_point_at_ceg(tiny_root: Path) -> None:
    with pytest.raises(InputError, match=r"python -m diffmatch.ceg --root .* --out-name pseudo"):
        UnlabeledSet(tiny_root, ["p0"], views=ViewOptions(32, AugmentConfig(), "pseudo"))


def write_pseudo(root: Path, ids: list[str]) -> None:
    for sample_id in ids:
        for folder, value in (("change", 1), ("A", 0), ("B", 255)):
            (root / "pseudo" / folder).mkdir(parents=True, exist_ok=True)
            mask = np.zeros((32, 32), np.uint8)
            mask[:, 16:] = value
            Image.fromarray(mask).save(root / "pseudo" / folder / f"{sample_id}.png")


def test_datasets_return_named_samples_with_pseudo_labels(tiny_root: Path) -> None:
    ids = list_ids(tiny_root, "train")
    write_pseudo(tiny_root, ids)
    cfg = AugmentConfig(scale=(1.0, 1.0), hflip_prob=0.0)
    labeled = LabeledSet(tiny_root, ids, views=ViewOptions(32, cfg, "pseudo"))[0]
    assert labeled._fields == ("a", "b", "label", "pseudo", "seg_a", "seg_b")
    assert labeled.a.dtype == torch.float32 and labeled.label.dtype == torch.int64
    assert set(labeled.pseudo.unique().tolist()) == {0, 1} and set(labeled.seg_b.unique().tolist()) == {0, 255}
    unlabeled = UnlabeledSet(tiny_root, ids, views=ViewOptions(48, cfg, "pseudo"))[0]
    # 32x32 padded to 48x48: padding is 255 in every mask and 0 in the (normalised) images.
    assert (unlabeled.ignore[32:, :] == 255).all() and (unlabeled.ignore[:32, :32] == 0).all()
    assert (unlabeled.pseudo[32:, :] == 255).all() and (unlabeled.pseudo[:32, 16:32] == 1).all()
    assert unlabeled.box.shape == (48, 48)
    plain = LabeledSet(tiny_root, ids, views=ViewOptions(32, cfg))[0]
    assert (plain.pseudo == 255).all()


def test_repeat_and_eval_set(tiny_root: Path) -> None:
    assert repeat_to(["a", "b"], 5) == ["a", "b", "a", "b", "a"]
    assert repeat_to([], 3) == []
    assert eval_set(DataConfig(root=tiny_root), "val").ids == ["p6", "p7"]


def test_augmentation_is_reproducible_across_workers(tiny_root: Path) -> None:
    ids = list_ids(tiny_root, "train")
    dataset = UnlabeledSet(tiny_root, ids, views=ViewOptions(24, AugmentConfig()), seed=3)
    direct = [dataset[i].a_strong for i in range(len(ids))]
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2)
    batched = torch.cat([batch.a_strong for batch in loader])
    assert torch.equal(torch.stack(direct), batched)
    assert not torch.equal(dataset[len(ids)].a_strong, direct[0])  # the same pair, drawn in epoch 1


def test_epoch_sampler_draws_new_views_in_persistent_workers(tiny_root: Path) -> None:
    ids = list_ids(tiny_root, "train")
    dataset = LabeledSet(tiny_root, ids, views=ViewOptions(24, AugmentConfig()), seed=3)
    sampler = EpochSampler(dataset, num_replicas=1, rank=0, shuffle=False)
    assert list(sampler) == list(range(len(ids)))
    sampler.set_epoch(2)
    assert list(sampler) == [2 * len(ids) + i for i in range(len(ids))]
    loader = torch.utils.data.DataLoader(dataset, batch_size=len(ids), sampler=sampler, num_workers=1,
                                         persistent_workers=True)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        epochs.append(next(iter(loader)).a)
    assert torch.equal(epochs[0], torch.stack([dataset[i].a for i in range(len(ids))]))
    assert torch.equal(epochs[1], torch.stack([dataset[len(ids) + i].a for i in range(len(ids))]))
    assert not torch.equal(epochs[0], epochs[1])
