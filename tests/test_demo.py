from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from diffmatch.demo import epochs_for

ROOT = Path(__file__).resolve().parents[1]


def test_epochs_for_a_budget() -> None:
    assert epochs_for(120, 16, 4) == (30, 7)  # 4 iterations an epoch
    assert epochs_for(120, 150, 4) == (4, 1)
    assert epochs_for(5, 1, 4) == (5, 1)  # fewer pairs than a batch still count as one iteration


def test_quick_demo_runs_the_whole_pipeline(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "diffmatch.demo", "--quick", "--out", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for line in ("CEG pixel-level", "CEG instance-level", "CEG mixed", "supervised", "fixmatch", "diffmatch"):
        assert line in result.stdout
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert set(summary["methods"]) == {"supervised", "fixmatch", "diffmatch"}
    assert all(0 <= s["iou"] <= 100 for s in summary["methods"].values())
    assert 0 < summary["ceg_test"]["instance"]["total"]["iou"] <= 100
    for method in ("supervised", "fixmatch", "diffmatch"):
        assert (tmp_path / "runs" / method / "best.pt").exists()
    assert (tmp_path / "data" / "pseudo" / "change").is_dir()
