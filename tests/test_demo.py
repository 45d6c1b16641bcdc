from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_demo_runs_the_whole_pipeline(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "diffmatch.demo", "--quick", "--out", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for line in ("CEG pixel-level", "CEG instance-level", "CEG mixed", "supervised", "fixmatch", "diffmatch",
                 "the benchmark (docs/benchmark.md"):
        assert line in result.stdout
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert list(summary["methods"]) == ["supervised", "fixmatch", "diffmatch"]
    assert all(0 <= s[which]["iou"] <= 100 for s in summary["methods"].values() for which in ("best", "last"))
    assert 0 < summary["ceg_test"]["instance"]["total"]["iou"] <= 100
    for method in ("supervised", "fixmatch", "diffmatch"):
        config = json.loads((tmp_path / "runs" / f"{method}-seed0" / "config.json").read_text())
        assert config["max_iters"] == 4 and config["eval_interval"] == 2  # one budget, one schedule
        assert (tmp_path / "runs" / f"{method}-seed0" / "best.pt").exists()
    assert (tmp_path / "data" / "pseudo" / "change").is_dir()
