from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, write_pair
from PIL import Image

from diffmatch import tiles
from diffmatch.cli import InputError
from diffmatch.prepare import FolderArgs, LevirArgs, WhuArgs, main, split_sizes
from diffmatch.subsets import PUBLIC_SPLITS, leak_warning

SAMPLES = DATA / "levir-samples"
SCENES = {"train": ["train_100", "train_2"], "val": ["val_10"], "test": ["test_100"]}


def blocky(rng: np.random.Generator, h: int, w: int, channels: int = 3) -> np.ndarray:
    """Random 8x8-pixel blocks: every tile differs, and PNG stays quick to write."""
    blocks = rng.integers(0, 256, (-(-h // 8), -(-w // 8), channels), dtype=np.uint8)
    return blocks.repeat(8, 0).repeat(8, 1)[:h, :w]


def stripes(h: int, w: int, high: int = 255) -> np.ndarray:
    """A known label pattern: 16-pixel diagonal bands of 0 and ``high``."""
    y, x = np.mgrid[:h, :w]
    return np.where(((y + x) // 16) % 2 == 1, high, 0).astype(np.uint8)


def levir_tree(root: Path, size: int = 1024) -> dict[str, dict[str, np.ndarray]]:
    """Official LEVIR-CD layout with the scenes of SCENES; val's label is stored as 0/1."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, names in SCENES.items():
        for name in names:
            label = stripes(size, size, high=1 if split == "val" else 255)
            arrays[name] = {"A": blocky(rng, size, size), "B": blocky(rng, size, size), "label": label}
            for kind, array in arrays[name].items():
                (root / split / kind).mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(root / split / kind / f"{name}.png")
    return arrays


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def count_writes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    written: list[Path] = []
    real = tiles.write_png
    monkeypatch.setattr(tiles, "write_png", lambda path, array: (written.append(path), real(path, array)))
    return written


@pytest.fixture(scope="module")
def levir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, np.ndarray]], dict]:
    tmp = tmp_path_factory.mktemp("levir")
    arrays = levir_tree(tmp / "LEVIR-CD")
    lists = main(LevirArgs(src=tmp / "LEVIR-CD", out=tmp / "LEVIR-CD256"))
    return tmp, arrays, lists


def test_levir_tiles_names_content(levir) -> None:
    tmp, arrays, lists = levir
    out = tmp / "LEVIR-CD256"
    for kind in ("A", "B", "label"):
        expected = {f"{scene}_{c}.png" for names in SCENES.values() for scene in names for c in range(1, 17)}
        assert {p.name for p in (out / kind).iterdir()} == expected
    assert lists["train"] == [f"train_2_{c}" for c in range(1, 17)] + [f"train_100_{c}" for c in range(1, 17)]
    assert (out / "list" / "train.txt").read_text().splitlines()[0] == "train_2_1.png"
    assert len((out / "list" / "val.txt").read_text().splitlines()) == 16
    for scene in ("train_100", "val_10"):
        for kind in ("A", "B"):  # c = 6: row 2, column 2 of the 4x4 grid
            assert np.array_equal(read(out / kind / f"{scene}_6.png"), arrays[scene][kind][256:512, 256:512])
        assert np.array_equal(read(out / kind / f"{scene}_4.png"), arrays[scene][kind][0:256, 768:1024])
        assert np.array_equal(read(out / kind / f"{scene}_13.png"), arrays[scene][kind][768:1024, 0:256])
        label = read(out / "label" / f"{scene}_6.png")
        assert set(np.unique(label)) == {0, 255}
        assert np.array_equal(label == 255, arrays[scene]["label"][256:512, 256:512] > 0)


def test_levir_official_split_ids_exist(levir) -> None:
    tmp, _, _ = levir
    out = tmp / "LEVIR-CD256"
    lists = [PUBLIC_SPLITS / "levir" / f"{s}.txt" for s in ("train", "val", "test")]
    lists += [PUBLIC_SPLITS / "levir" / "5%" / f"{s}.txt" for s in ("labeled", "unlabeled")]
    present = {scene for names in SCENES.values() for scene in names}
    checked = 0
    for path in lists:
        for line in path.read_text().split():
            if line.rsplit("_", 1)[0] in present:
                assert (out / "A" / line).is_file() and (out / "label" / line).is_file(), line
                checked += 1
    assert checked == 4 * 16 + 2 * 16  # every tile once in train/val/test, train ones once more in 5%


def test_levir_says_what_it_wrote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    levir_tree(tmp_path / "LEVIR-CD")
    lists = main(LevirArgs(src=tmp_path / "LEVIR-CD", out=tmp_path / "out", splits=("val",)))
    line = capsys.readouterr().out.splitlines()[-1]
    assert line == f"levir: wrote {len(lists['val'])} tiles to {tmp_path / 'out'}/{{A,B,label}} " \
                   f"({len(lists['val'])} in list/val.txt)"


def test_levir_resume_and_overwrite(levir, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp, _, _ = levir
    out = tmp / "LEVIR-CD256"
    written = count_writes(monkeypatch)
    main(LevirArgs(src=tmp / "LEVIR-CD", out=out, splits=("val",)))
    assert written == []
    (out / "B" / "val_10_7.png").unlink()
    main(LevirArgs(src=tmp / "LEVIR-CD", out=out, splits=("val",)))
    assert sorted(p.name for p in written) == sorted(f"val_10_{c}.png" for c in range(1, 17))
    written.clear()
    main(LevirArgs(src=tmp / "LEVIR-CD", out=out, splits=("val",), overwrite=True))
    assert len(written) == 48


def test_levir_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nope: folder not found"):
        main(LevirArgs(src=tmp_path / "nope", out=tmp_path / "out"))
    src = tmp_path / "src"
    for kind in ("A", "B", "label"):
        (src / "train" / kind).mkdir(parents=True)
    with pytest.raises(InputError, match=r"train/A: no images found"):
        main(LevirArgs(src=src, out=tmp_path / "out", splits=("train",)))
    Image.new("RGB", (512, 512)).save(src / "train" / "A" / "train_1.png")
    Image.new("RGB", (512, 256)).save(src / "train" / "B" / "train_1.png")
    with pytest.raises(InputError, match=r"no label image named train_1"):
        main(LevirArgs(src=src, out=tmp_path / "out", splits=("train",)))
    Image.new("L", (512, 512)).save(src / "train" / "label" / "train_1.png")
    with pytest.raises(InputError, match=r"val/A: folder not found"):  # all splits are checked first
        main(LevirArgs(src=src, out=tmp_path / "out"))
    with pytest.raises(InputError, match=r"A/train_1.png is 512x512, .*B/train_1.png is 512x256"):
        main(LevirArgs(src=src, out=tmp_path / "out", splits=("train",)))


def whu_images(root: Path, h: int = 700, w: int = 1000) -> dict[str, np.ndarray]:
    """A fake WHU-CD pair as TIFFs in the published folder names."""
    rng = np.random.default_rng(1)
    arrays = {"A": blocky(rng, h, w), "B": blocky(rng, h, w), "label": stripes(h, w)}
    names = {"A": "before/before.tif", "B": "after/after.tif", "label": "change label/change_label.tif"}
    for kind, name in names.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arrays[kind]).save(root / name, compression="tiff_lzw")
    Image.fromarray(arrays["label"]).save(root / "before" / "before_label.tif")  # not a change label
    return arrays


def test_whu_tiles_and_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    arrays = whu_images(tmp_path / "WHU")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # 700k pixels would be a "decompression bomb"
    lists = main(WhuArgs(src=tmp_path / "WHU", out=tmp_path / "out", seed=3))
    assert f"whu: wrote 6 tiles to {tmp_path / 'out'}/{{A,B,label}} (4 in list/train.txt, 1 in list/val.txt, " \
           "1 in list/test.txt)" in capsys.readouterr().out
    assert Image.MAX_IMAGE_PIXELS == 100_000  # lifted only while cutting
    out = tmp_path / "out"
    ids = [f"whucd_{n:05d}" for n in range(1, 7)]  # 2 rows x 3 columns of whole tiles, row-major
    assert sorted(p.stem for p in (out / "A").iterdir()) == ids
    assert np.array_equal(read(out / "A" / "whucd_00005.png"), arrays["A"][256:512, 256:512])
    assert np.array_equal(read(out / "B" / "whucd_00003.png"), arrays["B"][0:256, 512:768])
    assert np.array_equal(read(out / "label" / "whucd_00004.png"), arrays["label"][256:512, 0:256])
    assert {k: len(v) for k, v in lists.items()} == {"train": 4, "val": 1, "test": 1}
    assert sorted(i for split in lists.values() for i in split) == ids
    assert (out / "list" / "val.txt").read_text() == f"{lists['val'][0]}.png\n"
    again = main(WhuArgs(src=tmp_path / "WHU", out=out, seed=3))
    assert again == lists


def test_whu_split_sizes() -> None:
    assert split_sizes(7434) == {"train": 5947, "val": 743, "test": 744}
    assert split_sizes(6) == {"train": 4, "val": 1, "test": 1}
    assert split_sizes(1000) == {"train": 800, "val": 100, "test": 100}


def test_whu_explicit_files_and_split_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whu_images(tmp_path / "WHU")
    files = {"a": tmp_path / "WHU/before/before.tif", "b": tmp_path / "WHU/after/after.tif",
             "label": tmp_path / "WHU/change label/change_label.tif"}
    splits = tmp_path / "splits"
    splits.mkdir()
    for name, ids in (("train", [1, 2, 3]), ("val", [4, 5]), ("test", [6])):
        (splits / f"{name}.txt").write_text("".join(f"whucd_{n:05d}.png\n" for n in ids))
    lists = main(WhuArgs(out=tmp_path / "out", split_dir=splits, **files))
    assert lists["val"] == ["whucd_00004", "whucd_00005"]
    assert (tmp_path / "out" / "list" / "train.txt").read_text() == (splits / "train.txt").read_text()
    written = count_writes(monkeypatch)
    (splits / "test.txt").write_text("whucd_00007.png\n")
    with pytest.raises(InputError, match="1 listed ids .e.g. whucd_00007. are not among the 6 tiles"):
        main(WhuArgs(out=tmp_path / "out", split_dir=splits, **files))
    assert written == []  # resumed: nothing cut twice
    with pytest.raises(InputError, match="missing/train.txt: file not found"):
        main(WhuArgs(out=tmp_path / "out", split_dir=tmp_path / "missing", **files))
    with pytest.raises(InputError, match="--src: folder not found"):
        main(WhuArgs(out=tmp_path / "out", a=files["a"]))
    with pytest.raises(InputError, match="nope.tif: file not found"):
        main(WhuArgs(out=tmp_path / "out", **{**files, "b": tmp_path / "nope.tif"}))
    (tmp_path / "WHU" / "after" / "after.tif").rename(tmp_path / "WHU" / "after" / "2016.tif")
    with pytest.raises(InputError, match=r"no image\(s\) named like .after. for B; pass it as --b FILE"):
        main(WhuArgs(src=tmp_path / "WHU", out=tmp_path / "out"))


def test_folder_levir_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(InputError, match=r"A/test_113_0256.png is 768x384, .*B/test_113_0256.png is 768x383"):
        main(FolderArgs(src=SAMPLES, out=tmp_path / "out"))
    lists = main(FolderArgs(src=SAMPLES, out=tmp_path / "out", mismatch="skip", list_name="test"))
    printed = capsys.readouterr().out
    assert "skipped: image sizes differ" in printed and "folder: 4/4 pairs" in printed and "ETA" in printed
    stems = sorted(p.stem for p in (SAMPLES / "label").iterdir())
    assert sorted(lists["test"]) == sorted(f"{s}_0_0" for s in stems) and lists["unlabeled"] == []
    for stem in stems:
        for kind in ("A", "B", "label"):
            tile = read(tmp_path / "out" / kind / f"{stem}_0_0.png")
            assert np.array_equal(tile, read(SAMPLES / kind / f"{stem}.png"))
    assert len((tmp_path / "out" / "list" / "test.txt").read_text().splitlines()) == 3
    assert not (tmp_path / "out" / "list" / "unlabeled.txt").exists()


@pytest.mark.parametrize(("border", "grid"), [("pad", (2, 3)), ("drop", (1, 3))])
def test_folder_rgba_unlabelled_pair(tmp_path: Path, border: str, grid: tuple[int, int]) -> None:
    src = tmp_path / "src"
    for kind in ("A", "B"):
        (src / kind).mkdir(parents=True)
        shutil.copy(SAMPLES / "A" / "test_113_0256.png", src / kind)  # RGBA 768x384, no label
    rgb = np.asarray(Image.open(src / "A" / "test_113_0256.png").convert("RGB"))
    lists = main(FolderArgs(src=src, out=tmp_path / "out", border=border))  # type: ignore[arg-type]
    ids = [f"test_113_0256_{r}_{c}" for r in range(grid[0]) for c in range(grid[1])]
    assert lists == {"train": [], "unlabeled": ids}
    assert (tmp_path / "out" / "list" / "unlabeled.txt").read_text().split() == [f"{i}.png" for i in ids]
    assert not (tmp_path / "out" / "label").exists()
    assert not (tmp_path / "out" / "list" / "train.txt").exists()
    assert read(tmp_path / "out" / "B" / "test_113_0256_0_2.png").shape == (256, 256, 3)
    if border == "pad":
        tile = read(tmp_path / "out" / "A" / "test_113_0256_1_1.png")
        assert np.array_equal(tile[:128], rgb[256:384, 256:512]) and not tile[128:].any()


def test_folder_pad_drop_labels_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    rng = np.random.default_rng(2)
    label = stripes(300, 600, high=1)
    for kind, array in (("A", blocky(rng, 300, 600)), ("B", blocky(rng, 300, 600, 1)[..., 0]),
                        ("label", np.stack([label] * 3, axis=-1))):  # grey B, 0/1 label in RGB
        (src / kind).mkdir(parents=True)
        Image.fromarray(array).save(src / kind / ("scene.tif" if kind == "A" else "scene.bmp"))
    padded = main(FolderArgs(src=src, out=tmp_path / "pad", tile=256))
    dropped = main(FolderArgs(src=src, out=tmp_path / "drop", border="drop"))
    assert padded["train"] == [f"scene_{r}_{c}" for r in range(2) for c in range(3)]
    assert dropped["train"] == ["scene_0_0", "scene_0_1"]
    corner = read(tmp_path / "pad" / "label" / "scene_1_2.png")
    assert np.array_equal(corner[:44, :88], label[256:, 512:] * 255) and not corner[44:].any()
    assert not corner[:, 88:].any()
    assert read(tmp_path / "pad" / "B" / "scene_0_0.png").shape == (256, 256, 3)
    written = count_writes(monkeypatch)
    main(FolderArgs(src=src, out=tmp_path / "pad"))
    assert written == []
    main(FolderArgs(src=src, out=tmp_path / "pad", overwrite=True))
    assert len(written) == 18


def test_folder_errors(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "A").mkdir(parents=True)
    with pytest.raises(InputError, match="B: folder not found"):
        main(FolderArgs(src=src, out=tmp_path / "out"))
    (src / "B").mkdir()
    with pytest.raises(InputError, match="no images found"):
        main(FolderArgs(src=src, out=tmp_path / "out"))
    Image.new("RGB", (64, 48)).save(src / "A" / "x.png")
    with pytest.raises(InputError, match="A/x.png: no B image named x"):
        main(FolderArgs(src=src, out=tmp_path / "out"))
    Image.new("RGB", (64, 40)).save(src / "B" / "x.jpg")
    with pytest.raises(InputError, match=r"A/x.png is 64x48, .*B/x.jpg is 64x40; crop"):
        main(FolderArgs(src=src, out=tmp_path / "out"))


def test_cli_missing_src_exits_2(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "diffmatch.prepare", "levir", "--src", str(tmp_path / "nope"),
           "--out", str(tmp_path / "out")]
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    expected = f"error: {tmp_path / 'nope'}: folder not found; pass the data set folder as --src"
    assert result.stderr.strip() == expected


def messy_folder(src: Path) -> dict[str, dict[str, np.ndarray]]:
    """A benchmark as published, in BMP: complete sites, a site without B, one without A, one without a
    label, one whose label has stray grey values, one whose dates differ in size."""
    rng = np.random.default_rng(5)
    stray = stripes(200, 300)
    stray[7, 20:28] = [21, 37, 60, 96, 128, 200, 252, 252]
    sites = {
        "site_1": {"A": blocky(rng, 200, 300), "B": blocky(rng, 200, 300), "label": stripes(200, 300)},
        "site_2": {"A": blocky(rng, 200, 300), "label": stripes(200, 300)},  # no B
        "site_3": {"A": blocky(rng, 210, 330), "B": blocky(rng, 210, 330)},  # no label: unlabelled
        "site_4": {"A": blocky(rng, 200, 300), "B": blocky(rng, 200, 300), "label": stray},
        "site_5": {"B": blocky(rng, 200, 300), "label": stripes(200, 300)},  # no A
        "site_6": {"A": blocky(rng, 200, 300), "B": blocky(rng, 201, 300), "label": stripes(200, 300)},
    }
    for stem, arrays in sites.items():
        for kind, array in arrays.items():
            (src / kind).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(src / kind / f"{stem}.bmp")
    return sites


def test_folder_messy_download(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    sites = messy_folder(src)
    with pytest.raises(InputError, match=rf"^{src}/A/site_2.bmp: no B image named site_2.\* in {src}/B; add it "
                                         r"\(or pass --mismatch skip\)$"):
        main(FolderArgs(src=src, out=out, tile=128))
    assert not out.exists()
    with pytest.raises(InputError, match=rf"^{src}/label/site_4.bmp: 8 of 60,000 label pixels have values "
                                         r"\{21, 37, 60, 96, 128, \.\.\., 252\} \(7 values\), not 0 or 255; pass "
                                         r"--label-threshold 128 to binarise the labels \(value >= 128 is change\)$"):
        main(FolderArgs(src=src, out=out, tile=128, mismatch="skip"))
    capsys.readouterr()
    lists = main(FolderArgs(src=src, out=out, tile=128, mismatch="skip", label_threshold=128))
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == [f"skipped: {src}/A/site_2.bmp: no B image named site_2.* in {src}/B",
                           f"skipped: {src}/B/site_5.bmp: no A image named site_5.* in {src}/A"]
    assert any(line.startswith(f"skipped: image sizes differ: {src}/A/site_6.bmp is 300x200") for line in printed)
    assert printed[-1] == ("folder: cut 3 pairs into 12 labelled tiles in list/train.txt and 6 unlabelled tiles "
                           "in list/unlabeled.txt; skipped 3 pairs (2 missing a date, 1 of differing sizes)")
    grid = [f"{r}_{c}" for r in range(2) for c in range(3)]
    assert lists == {"train": [f"site_{s}_{g}" for s in (1, 4) for g in grid],
                     "unlabeled": [f"site_3_{g}" for g in grid]}
    label = read(out / "label" / "site_4_0_0.png")  # binarised at 128: the stray 128, 200, 252 are change
    assert np.array_equal(label, np.where(sites["site_4"]["label"][:128, :128] >= 128, 255, 0))
    assert label[7, 20:28].tolist() == [0, 0, 0, 0, 255, 255, 255, 255]
    assert np.array_equal(read(out / "A" / "site_3_1_2.png")[:82, :74], sites["site_3"]["A"][128:, 256:])


def test_folder_reads_geotiffs_and_says_the_tiles_drop_the_tags(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import geotiff_tags, write_geotiff

    rng = np.random.default_rng(6)
    arrays = {"A": blocky(rng, 100, 140), "B": blocky(rng, 100, 140), "label": stripes(100, 140)}
    for kind, array in arrays.items():
        write_geotiff(tmp_path / "src" / kind / "scene.tif", array, geotiff_tags())
    lists = main(FolderArgs(src=tmp_path / "src", out=tmp_path / "out", tile=64))
    assert lists["train"] == [f"scene_{r}_{c}" for r in range(2) for c in range(3)]
    assert np.array_equal(read(tmp_path / "out" / "B" / "scene_1_1.png")[:36], arrays["B"][64:, 64:128])
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"note: GeoTIFF input (e.g. {tmp_path}/src/A/scene.tif): the PNG tiles do not keep its geo-referencing; "
        "predict on the whole pair writes geo-referenced maps")


def test_folder_holdout_keeps_each_source_scene_in_one_split(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    for i in range(8):
        write_pair(src, f"scene{i}", size=(64, 64), seed=i)
    args = FolderArgs(src=src, out=tmp_path / "out", tile=32, holdout="val=0.25,test=0.125", seed=3)
    lists = main(args)
    scenes = {name: {tile.rsplit("_", 2)[0] for tile in ids} for name, ids in lists.items() if ids}
    assert {name: len(s) for name, s in scenes.items()} == {"train": 5, "val": 2, "test": 1}  # whole scenes
    assert set.union(*scenes.values()) == {f"scene{i}" for i in range(8)}
    assert sum(len(s) for s in scenes.values()) == 8  # no scene in two lists
    assert all(len(lists[name]) == 4 * len(s) for name, s in scenes.items())  # every tile of a scene with it
    for name in ("train", "val", "test"):
        assert (tmp_path / "out" / "list" / f"{name}.txt").read_text().split() == [f"{i}.png" for i in lists[name]]
    assert main(replace(args, out=tmp_path / "again")) == lists  # the same draw for the same seed
    assert main(replace(args, out=tmp_path / "other", seed=4)) != lists
    assert "in list/val.txt" in capsys.readouterr().out


def test_leak_warning_names_the_split_and_an_id() -> None:
    assert leak_warning(["a", "b"], ["c"], "val") is None
    line = leak_warning(["a", "b", "c"], ["c", "b", "z"], "test")
    assert line is not None
    assert line.startswith("warning: 2 labelled training id(s) are also in the test split (e.g. b)")
