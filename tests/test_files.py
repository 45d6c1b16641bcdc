"""cli.py, atomic.py, images.py and pairs.py: the error every command raises, atomic writes, image and
label reading, id lists and the listing of image pairs."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmatch.atomic import atomic_path, write_json
from diffmatch.cli import InputError, run_cli
from diffmatch.pairs import images_in, read_id_list, write_id_list
from diffmatch.png import write_png


def test_atomic_path_renames_on_success(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("new")
        assert not target.exists()  # nothing at the final name until the block ends
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_atomic_path_keeps_the_old_file_when_the_block_fails(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]  # the temporary file is gone


def test_atomic_files_get_the_usual_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    write_json(tmp_path / "a.json", {"x": 1})
    mode = stat.S_IMODE((tmp_path / "a.json").stat().st_mode)
    assert mode == 0o666 & ~umask  # not mkstemp's 0600


def test_write_png_and_json_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_png(tmp_path / "m.png", np.array([[0, 1], [255, 7]], np.uint8))
    assert np.asarray(Image.open(tmp_path / "m.png")).tolist() == [[0, 1], [255, 7]]

    def broken(*args: object, **kwargs: object) -> str:
        raise OSError("no space left")

    monkeypatch.setattr("json.dumps", broken)
    (tmp_path / "r.json").write_text("{}\n")
    with pytest.raises(OSError, match="no space"):
        write_json(tmp_path / "r.json", {"x": 1})
    assert (tmp_path / "r.json").read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png", "r.json"]


def test_id_lists_round_trip(tmp_path: Path) -> None:
    write_id_list(tmp_path / "list" / "train.txt", ["b_2", "a_10"])
    assert (tmp_path / "list" / "train.txt").read_text() == "b_2\na_10\n"
    write_id_list(tmp_path / "with.txt", ["x", "y"], suffix=".png")
    assert (tmp_path / "with.txt").read_text() == "x.png\ny.png\n"
    assert read_id_list(tmp_path / "with.txt") == ["x", "y"]
    assert read_id_list(tmp_path / "list" / "train.txt") == ["b_2", "a_10"]


def test_images_in_lists_images_by_name(tmp_path: Path) -> None:
    for name in ("b.png", "a.TIF", "notes.txt", ".hidden.png"):
        (tmp_path / name).write_bytes(b"")
    assert images_in(tmp_path) == {"a": tmp_path / "a.TIF", "b": tmp_path / "b.png"}
    assert images_in(tmp_path / "missing") == {}
    (tmp_path / "b.jpg").write_bytes(b"")
    with pytest.raises(InputError, match=r"b.png: same name as b.jpg"):
        images_in(tmp_path)


def test_input_error_is_a_value_error() -> None:
    # A copied module raises something a foreign caller already catches.
    with pytest.raises(ValueError, match="bad.png: file not found"):
        raise InputError("bad.png: file not found")


def test_run_cli_turns_an_input_error_into_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    def main() -> None:
        raise InputError("data/A/x.png: file not found")

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: data/A/x.png: file not found\n"


def test_a_command_exits_2_on_bad_input(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "diffmatch.ceg", "--root", str(tmp_path / "nope")],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1
