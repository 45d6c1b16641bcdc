"""Benchmarks on tiny sizes: every figure positive and finite; on a fake clock whose every reading is
known, the exact figures; the table's layout, the JSON report, and the exit code on bad flags."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffmatch.cli import InputError
from diffmatch.config import ModelConfig
from diffmatch.lab import bench, speed, synthetic

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(backbone="resnet18", decoder_channels=16)
CPU = torch.device("cpu")
SMALL = speed.Settings(crop=32, batch_size=2, device=CPU, warmup=1, iters=2)  # tiny crops and batches, few iterations


@pytest.fixture(autouse=True)
def one_thread() -> object:
    """One torch thread: timings on a shared CPU stay seconds, not minutes of contended spinning."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def numbers(value: object) -> list[float]:
    """Every int and float inside nested dicts and lists."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers(v)]
    return [float(value)] if isinstance(value, int | float) and not isinstance(value, bool) else []


def assert_positive_finite(value: object) -> None:
    found = numbers(value)
    assert found and all(math.isfinite(n) and n > 0 for n in found), found


def fake_clock(monkeypatch: pytest.MonkeyPatch, target: object, name: str, steps_ms: list[float]) -> None:
    """Replace the clock ``target.name`` by one whose k-th reading is followed by a step of
    ``steps_ms[k % len(steps_ms)]`` milliseconds: the time between readings k and k + 1 is that step."""
    steps, now = itertools.cycle(steps_ms), [0.0]

    def clock(*_: object) -> float:
        value = now[0]
        now[0] += next(steps) / 1000
        return value

    monkeypatch.setattr(target, name, clock)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], dict]:
    """Six synthetic 64 px pairs, with the CEG benchmark run on them (it writes the labels the others read)."""
    root = tmp_path_factory.mktemp("bench") / "synthetic"
    synthetic.generate(synthetic.Args(out=root, num_pairs=6, size=64), verbose=False)
    return root, [synthetic.pair_id(i) for i in range(6)], speed.bench_ceg(root, workers=(1, 2))


def test_ceg(data: tuple[Path, list[str], dict]) -> None:
    root, ids, result = data
    assert_positive_finite(result)
    assert result["pairs"] == 6 and set(result["run_pairs_per_s"]) == set(result["run_vs_read"]) == {"1", "2"}
    for folder in ("change", "A", "B"):
        assert sorted(p.stem for p in (root / speed.PSEUDO / folder).glob("*.png")) == ids


def test_ceg_figures_on_a_fake_clock(data: tuple[Path, list[str], dict], monkeypatch: pytest.MonkeyPatch) -> None:
    # Readings: read start, read end | compute start, compute end | run 1 start, end | run 2 start, end.
    fake_clock(monkeypatch, speed.time, "perf_counter", [10, 99, 20, 99, 30, 99, 40, 99])
    result = speed.bench_ceg(data[0], workers=(1, 2))
    assert result == {"pairs": 6, "read_pairs_per_s": pytest.approx(600), "compute_pairs_per_s": pytest.approx(300),
                      "run_pairs_per_s": {"1": pytest.approx(200), "2": pytest.approx(150)},
                      "run_vs_read": {"1": pytest.approx(3), "2": pytest.approx(4)}}


def test_pipeline(data: tuple[Path, list[str], dict], monkeypatch: pytest.MonkeyPatch) -> None:
    root, ids, _ = data
    fake_clock(monkeypatch, speed.time, "perf_counter", [20, 99, 50, 99])  # 0 workers: 20 ms, 2 workers: 50 ms
    result = speed.bench_pipeline(root, ids, SMALL, workers=(0, 2), samples=4)
    assert result == {"samples": 4, "samples_per_s": {"0": pytest.approx(200), "2": pytest.approx(80)},
                      "per_worker": {"0": pytest.approx(200), "2": pytest.approx(40)}}


@pytest.mark.parametrize("method", ["diffmatch", "fixmatch", "supervised"])
def test_train(data: tuple[Path, list[str], dict], method: str) -> None:
    root, ids, _ = data
    result = speed.bench_train(root, ids, method, TINY, SMALL)
    assert_positive_finite({k: v for k, v in result.items() if k not in ("method", "peak_memory_kind")})
    assert result["method"] == method and result["peak_memory_kind"]
    assert list(result["ms"]) == ["data", "forward", "backward", "step", "iteration"]


def test_train_figures_on_a_fake_clock(data: tuple[Path, list[str], dict], monkeypatch: pytest.MonkeyPatch) -> None:
    root, ids, _ = data
    # Five readings an iteration: data 1 ms, forward 2, backward 3, step 4, then 10 ms to the next one.
    # The bare passes that follow take two readings each: 1, 3 and 10 ms (the first is the warm-up).
    fake_clock(monkeypatch, speed, "tick", [1, 2, 3, 4, 10])
    result = speed.bench_train(root, ids, "fixmatch", TINY, SMALL)
    phases = {"data": 1, "forward": 2, "backward": 3, "step": 4, "iteration": 10}
    assert result["ms"] == {k: pytest.approx({"median": v, "min": v}) for k, v in phases.items()}
    assert result["bare_ms"] == {"median": pytest.approx(6.5), "min": pytest.approx(3)}
    assert result["vs_bare"] == pytest.approx((2 + 3) / 6.5)


def test_inference(monkeypatch: pytest.MonkeyPatch) -> None:
    result = speed.bench_inference(TINY, SMALL)
    assert_positive_finite(result)
    fake_clock(monkeypatch, speed, "tick", [1, 4, 2])  # calls of 1 (warm-up), 2 and 4 ms
    result = speed.bench_inference(TINY, SMALL)
    assert result == {"batch_size": 2, "crop": 32, "ms": {"median": pytest.approx(3), "min": pytest.approx(2)},
                      "pairs_per_s": pytest.approx(2 / 0.003)}


def test_durations_drops_the_warmup_calls() -> None:
    calls = []
    times = speed.durations(lambda: calls.append(1), warmup=2, iters=3, device=CPU, amp=False)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)
    assert speed.ms([0.003, 0.001, 0.002]) == pytest.approx({"median": 2.0, "min": 1.0})


def test_format_table_by_hand() -> None:
    results = {"ceg": {"pairs": 4, "read_pairs_per_s": 10.0, "compute_pairs_per_s": 5.0,
                       "run_pairs_per_s": {"2": 2.5}, "run_vs_read": {"2": 4.0}},
               "inference": {"batch_size": 2, "crop": 32, "ms": {"median": 12.5, "min": 10.0}, "pairs_per_s": 160.0}}
    lines = bench.format_table(results).splitlines()
    assert lines[0].split() == ["benchmark", "measure", "value", "unit", "note"]
    assert lines[2].endswith("5.0  pairs/s  2.0x read")  # reading is twice as fast as compute
    assert lines[3].endswith("2.5  pairs/s  4.0x read")
    assert lines[4].split() == ["inference", "change_logits", "160.0", "pairs/s", "12.5", "ms", "per", "batch",
                                "of", "2"]
    assert len({line.index("pairs/s") for line in lines[1:]}) == 1  # columns aligned, values to the right


def small_args(root: Path, out: Path, **changes: object) -> bench.Args:
    return bench.Args(**{"backbone": "resnet18", "crop": 32, "batch_size": 2, "warmup": 0, "iters": 1,
                         "device": "cpu", "data": root, "ceg_workers": (1,), "loader_workers": (0,),
                         "methods": ("supervised",), "out": out, **changes})


def test_main_writes_json_and_table(data: tuple[Path, list[str], dict], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report" / "bench.json"
    returned = bench.main(small_args(data[0], out))
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned)) and set(report) == {"machine", "settings", "results"}
    assert {"device", "name", "cpu_count", "torch", "torch_threads"} <= set(report["machine"])
    assert report["machine"]["device"] == "cpu" and report["machine"]["torch_threads"] == 1
    assert report["settings"]["crop"] == 32 and report["settings"]["amp_used"] is False
    results = report["results"]
    assert list(results) == ["ceg", "data", "train", "inference"]
    assert [t["method"] for t in results["train"]] == ["supervised"]
    assert_positive_finite(results["inference"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["benchmark", "measure", "value", "unit", "note"]
    assert len(lines) == 1 + 3 + 1 + 7 + 1  # header; ceg, data, train and inference rows


def test_main_writes_missing_labels_before_the_data_part(data: tuple[Path, list[str], dict], tmp_path: Path) -> None:
    root, ids, _ = data
    label = root / speed.PSEUDO / "change" / f"{ids[0]}.png"
    label.unlink()
    report = bench.main(small_args(root, tmp_path / "bench.json", parts=("data",)))
    assert list(report["results"]) == ["data"] and label.is_file()


@pytest.mark.parametrize(("changes", "message"), [
    ({"batch_size": 0}, "--batch-size 0: must be at least 1"),
    ({"loader_workers": (0, -1)}, "--loader-workers -1: must be at least 0"),
    ({"ceg_workers": (0,)}, "--ceg-workers 0: must be at least 1"),
    ({"data": Path("/nonexistent/data")}, "/nonexistent/data/vlm: not found"),
])
def test_bad_args_are_input_errors(changes: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=message):
        bench.main(bench.Args(out=tmp_path / "bench.json", **changes))
    assert not (tmp_path / "bench.json").exists()


def test_cli_bad_flag_exits_2(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "diffmatch.bench", "--batch-size", "0", "--out",
                             str(tmp_path / "bench.json")], capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and "--batch-size 0: must be at least 1" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "bench.json").exists()
