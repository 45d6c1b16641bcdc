"""``python -m diffmatch.vlm_run``: tiny CLIPSeg, Grounding DINO and SAM models built from their configs with
random weights, saved to a folder and loaded as a model id would be; their files read back by CEG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_pair
from PIL import Image

from diffmatch.cli import InputError
from diffmatch.config import CEGConfig

os.environ["HF_HUB_OFFLINE"] = "1"  # read when the hub client is first imported: nothing here may download

needs_transformers = pytest.mark.skipif(find_spec("transformers") is None,
                                        reason='the vlm extra is not installed (pip install -e ".[vlm]")')
REPO = Path(__file__).resolve().parents[1]
CLASSES = CEGConfig().classes  # house building | road grass tree water
WORDS = sorted(set(" ".join(CLASSES)))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_no_other_command_imports_transformers() -> None:
    code = ("import importlib, pkgutil, sys, diffmatch\n"
            "names = [m.name for m in pkgutil.walk_packages(diffmatch.__path__, 'diffmatch.')\n"
            "         if not m.name.endswith('__main__')]\n"
            "for name in names: importlib.import_module(name)\n"
            "heavy = ('transformers', 'huggingface_hub', 'tokenizers', 'safetensors')\n"
            "print(' '.join(names)); print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True)
    names, loaded = out.stdout.splitlines()
    commands = {"ceg", "train", "evaluate", "predict", "prepare", "demo", "bench", "pretrain", "synthetic", "vlm_run"}
    assert {f"diffmatch.{c}" for c in commands} | {"diffmatch.lab.synthetic.scene"} <= set(names.split())
    assert loaded == "[]"


def test_without_the_extra_one_line_error(tmp_path: Path) -> None:
    code = ("import runpy, sys\nsys.modules['transformers'] = None  # as if not installed\n"
            f"sys.argv = ['vlm_run', '--root', {str(tmp_path)!r}]\n"
            "runpy.run_module('diffmatch.vlm_run', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    assert out.returncode == 2
    assert out.stderr == 'error: python -m diffmatch.vlm_run needs the transformers package: pip install -e ".[vlm]"\n'


def test_window_cores_partition_each_axis() -> None:
    from diffmatch.vlm_models import cores

    for length, tile, overlap in ((100, 64, 16), (300, 64, 16), (64, 64, 16), (40, 64, 16), (130, 48, 12)):
        spans = cores(length, tile, overlap)
        bounds = [lo for lo, _ in spans.values()] + [list(spans.values())[-1][1]]
        assert bounds[0] == 0 and bounds[-1] == length and bounds == sorted(bounds)
        for start, (lo, hi) in spans.items():  # each core lies inside its window
            assert start <= lo < hi <= start + min(tile, length)


def _save_tiny_models(folder: Path) -> dict[str, Path]:
    """CLIPSeg, Grounding DINO and SAM with a few thousand random weights, and their processors."""
    from transformers import (
        BertTokenizer,
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
        CLIPTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SamConfig,
        SamImageProcessor,
        SamModel,
        SamProcessor,
        ViTImageProcessor,
    )

    paths = {name: folder / name for name in ("clipseg", "gdino", "sam")}
    torch.manual_seed(0)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}  # letters: every class name tokenises differently
    for c in WORDS:
        vocab[c], vocab[f"{c}</w>"] = len(vocab), len(vocab) + 1
    clip = CLIPSegConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 32, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16, extract_layers=[0, 1], reduce_dim=8, decoder_num_attention_heads=2,
        decoder_intermediate_size=16)
    CLIPSegForImageSegmentation(clip).save_pretrained(paths["clipseg"])
    CLIPSegProcessor(image_processor=ViTImageProcessor(size={"height": 48, "width": 48}),
                     tokenizer=CLIPTokenizer(vocab=vocab, merges=[])).save_pretrained(paths["clipseg"])
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *CLASSES]
    gdino = GroundingDinoConfig(
        backbone_config={"model_type": "swin", "embed_dim": 8, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1],
                         "window_size": 4, "image_size": 64, "out_indices": [2, 3, 4]},
        text_config={"model_type": "bert", "vocab_size": len(words), "hidden_size": 16, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64},
        d_model=64, num_queries=20, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, max_text_len=32, encoder_n_points=2, decoder_n_points=2)
    GroundingDinoForObjectDetection(gdino).save_pretrained(paths["gdino"])
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}),
                           tokenizer=BertTokenizer(vocab={w: i for i, w in enumerate(words)})
                           ).save_pretrained(paths["gdino"])
    sam = SamConfig(
        vision_config={"hidden_size": 16, "output_channels": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 64, "patch_size": 8, "window_size": 4, "global_attn_indexes": [1],
                       "mlp_dim": 32, "num_pos_feats": 4},
        prompt_encoder_config={"hidden_size": 8, "image_size": 64, "patch_size": 8, "mask_input_channels": 4},
        mask_decoder_config={"hidden_size": 8, "mlp_dim": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                             "iou_head_hidden_dim": 16})
    SamModel(sam).save_pretrained(paths["sam"])
    SamProcessor(image_processor=SamImageProcessor(
        size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}, mask_size={"longest_edge": 16},
        mask_pad_size={"height": 16, "width": 16})).save_pretrained(paths["sam"])
    return paths


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("transformers")
    return _save_tiny_models(tmp_path_factory.mktemp("models"))


SIZES = {"p0": (40, 50), "p1": (70, 130)}  # p1 is wider than two 48-pixel (CLIPSeg) and 64-pixel (SAM) windows


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for i, (image_id, size) in enumerate(SIZES.items()):
        write_pair(tmp_path / "data", image_id, size=size, seed=i)
    return tmp_path / "data"


def _args(root: Path, models: dict[str, Path], **kw: object):
    from diffmatch.vlm_run import Args

    paths = {"semantic_model": models["clipseg"], "detector": models["gdino"], "segmenter": models["sam"]}
    return Args(root=root, **{**{k: str(v) for k, v in paths.items()}, **kw})


@needs_transformers
def test_semantic_files_are_ceg_input(root: Path, models: dict[str, Path]) -> None:
    from diffmatch.pseudo import Args as CEGArgs
    from diffmatch.pseudo import main as ceg
    from diffmatch.vlm import read_vlm
    from diffmatch.vlm_run import main

    summary = main(_args(root, models, backend="semantic"))
    assert summary == (4, 0, 0)
    for date in ("A", "B"):
        assert sorted(p.name for p in (root / "vlm" / date).iterdir()) == ["p0.npy", "p1.npy"]
        for image_id, size in SIZES.items():
            probs = np.load(root / "vlm" / date / f"{image_id}.npy")
            assert probs.dtype == np.float16 and probs.shape == (len(CLASSES), *size)
            assert np.allclose(probs.astype(np.float32).sum(0), 1, atol=5e-3)  # softmax over the prompts
            assert read_vlm(root / "vlm" / date, image_id, CEGConfig(), size=size).probs.shape == probs.shape
    table = ceg(CEGArgs(root=root))  # the labels of write_pair: Table 6 on the VLM's output
    assert table is not None and table["pairs"] == 2
    assert all((root / "pseudo" / sub / f"{i}.png").is_file() for sub in ("A", "B", "change") for i in SIZES)


@needs_transformers
def test_semantic_logits_are_the_models_own_and_windows_average(models: dict[str, Path]) -> None:
    import torch.nn.functional as F
    from transformers import AutoProcessor, CLIPSegForImageSegmentation

    from diffmatch.vlm_models import Semantic

    image = np.random.default_rng(1).integers(0, 256, (48, 100, 3), dtype=np.uint8)
    prompts = ["tree", "house", "water"]
    semantic = Semantic(str(models["clipseg"]), prompts, torch.device("cpu"), autocast=False)
    # One window: CLIPSeg's documented use (a copy of the image per prompt), resized to the image.
    model, processor = CLIPSegForImageSegmentation.from_pretrained(models["clipseg"]), AutoProcessor.from_pretrained(
        models["clipseg"])
    crop = image[:, :48]
    with torch.no_grad():
        ref = model(**processor(text=prompts, images=[crop] * 3, padding=True, return_tensors="pt")).logits
    ref = F.interpolate(ref[None], size=(48, 48), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(semantic.logits([crop], 48, 12, 4)[0], ref, atol=1e-5)
    # Windows at x = 0 and 42 (90 = 42 + 48): each alone where it is alone, their mean where both are.
    left, right = (semantic.logits([image[:, x : x + 48]], 48, 0, 4)[0] for x in (0, 42))
    whole = semantic.logits([image[:, :90]], 48, 0, 4)[0]
    assert torch.allclose(whole[..., :42], left[..., :42], atol=1e-5)
    assert torch.allclose(whole[..., 48:], right[..., 6:], atol=1e-5)
    assert torch.allclose(whole[..., 42:48], (left[..., 42:] + right[..., :6]) / 2, atol=1e-5)
    # A tiny batch gives the same logits as a large one.
    assert torch.allclose(semantic.logits([image[:, :90]], 48, 0, 1)[0], whole, atol=1e-5)


@needs_transformers
def test_channels_follow_the_class_order(root: Path, tmp_path: Path, models: dict[str, Path]) -> None:
    from diffmatch.vlm_run import main

    main(_args(root, models, backend="semantic"))
    other = tmp_path / "reversed"
    for date in ("A", "B"):
        (other / date).mkdir(parents=True)
        for image_id in SIZES:
            (other / date / f"{image_id}.png").write_bytes((root / date / f"{image_id}.png").read_bytes())
    main(_args(other, models, backend="semantic", classes=CLASSES[::-1]))
    for image_id in SIZES:
        a, b = (np.load(r / "vlm" / "B" / f"{image_id}.npy").astype(np.float32) for r in (root, other))
        assert np.allclose(a, b[::-1], atol=2e-3) and not np.allclose(a[0], a[1], atol=2e-3)


@needs_transformers
def test_instance_json_round_trips_through_the_readers(root: Path, models: dict[str, Path]) -> None:
    from torchvision.ops import box_iou

    from diffmatch.pseudo import Args as CEGArgs
    from diffmatch.pseudo import main as ceg
    from diffmatch.rle import decode_mask
    from diffmatch.vlm import read_instances, read_vlm
    from diffmatch.vlm_run import main

    summary = main(_args(root, models, box_threshold=0.0))  # random weights: every box counts
    assert summary.written == 4 and summary.instances > 0
    fg = CEGConfig().foreground
    for date in ("A", "B"):
        for image_id, size in SIZES.items():
            path = root / "vlm" / date / f"{image_id}.json"
            records = json.loads(path.read_text())
            assert records, path
            masks = []
            for rec in records:
                assert set(rec) == {"image_id", "category_id", "score", "bbox", "segmentation"}
                assert rec["image_id"] == image_id and CLASSES[rec["category_id"]] in fg
                assert 0 <= rec["score"] <= 1 and len(rec["bbox"]) == 4 and min(rec["bbox"][2:]) > 0
                assert rec["segmentation"]["size"] == list(size) and isinstance(rec["segmentation"]["counts"], str)
                masks.append(decode_mask(rec["segmentation"]))
                assert masks[-1].any()
            scores = [r["score"] for r in records]
            assert scores == sorted(scores, reverse=True)
            boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in records)])
            classes = torch.tensor([r["category_id"] for r in records])
            same = (classes[:, None] == classes[None]) & ~torch.eye(len(records), dtype=torch.bool)
            assert (box_iou(boxes, boxes)[same] <= 0.5 + 1e-4).all()  # class-wise NMS
            inst = read_instances(path, len(CLASSES), size)
            assert np.array_equal(inst.runs.masks(), np.stack(masks)) and inst.classes.tolist() == classes.tolist()
            out = read_vlm(root / "vlm" / date, image_id, CEGConfig(), "json", size)
            assert np.array_equal(out.instances.masks(), np.stack(masks))
    assert ceg(CEGArgs(root=root, instances="json")) is not None


@needs_transformers
def test_instance_backend_alone_and_windows(root: Path, models: dict[str, Path]) -> None:
    from diffmatch.rle import decode_mask
    from diffmatch.vlm_run import main

    main(_args(root, models, backend="instance", box_threshold=0.0, tile=32, overlap=8, batch_size=3))
    files = sorted(p.name for p in (root / "vlm" / "A").iterdir())
    assert files == ["p0.json", "p1.json"]
    records = json.loads((root / "vlm" / "A" / "p1.json").read_text())
    # The 70x130 image in 32-pixel windows: masks reach across the whole image, at its size.
    union = np.any([decode_mask(r["segmentation"]) for r in records], axis=0)
    assert union.shape == SIZES["p1"] and union[:, :40].any() and union[:, 90:].any()


@needs_transformers
def test_resume_and_overwrite(root: Path, models: dict[str, Path]) -> None:
    from diffmatch.vlm_run import main

    main(_args(root, models, backend="semantic"))
    folder = root / "vlm" / "B"
    (folder / "p1.npy").unlink()
    (folder / ".p1.npy.x1y2.tmp").write_bytes(b"left by an interrupted run")
    stamps = {p: p.stat().st_mtime_ns for p in (root / "vlm").rglob("*.npy")}
    assert main(_args(root, models, backend="semantic")) == (1, 3, 0)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and (folder / "p1.npy").is_file()
    assert main(_args(root, models, backend="semantic", split=None)) == (0, 4, 0)
    assert main(_args(root, models, backend="both", box_threshold=0.0)).written == 4  # the JSON is missing
    assert main(_args(root, models, backend="semantic", overwrite=True)).written == 4


@needs_transformers
def test_split_and_bf16(root: Path, models: dict[str, Path]) -> None:
    from diffmatch.vlm_models import Semantic
    from diffmatch.vlm_run import main

    (root / "list").mkdir()
    (root / "list" / "test.txt").write_text("p1.png\n")
    assert main(_args(root, models, backend="semantic", split="test")).written == 2
    assert sorted(p.name for p in (root / "vlm" / "A").iterdir()) == ["p1.npy"]
    image = np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    full, half = (Semantic(str(models["clipseg"]), CLASSES, torch.device("cpu"), autocast=amp).logits(
        [image], 48, 12, 2)[0] for amp in (False, True))  # the --amp code path, here on the CPU
    assert half.dtype == torch.float32 and torch.isfinite(half).all() and (half - full).abs().max() < 0.5


@needs_transformers
def test_errors(root: Path, tmp_path: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from diffmatch.vlm_models import Semantic
    from diffmatch.vlm_run import main

    with pytest.raises(InputError, match=r"--semantic-model no-such-owner/no-such-model: cannot load the model .*hf "
                                         r"download no-such-owner/no-such-model --local-dir DIR"):
        main(_args(root, models, semantic_model="no-such-owner/no-such-model"))
    with pytest.raises(InputError, match=f"--semantic-model {tmp_path}: cannot load the model folder"):
        main(_args(root, models, semantic_model=str(tmp_path)))
    with pytest.raises(InputError, match="a sam model, not clipseg"):
        main(_args(root, models, semantic_model=str(models["sam"])))
    with pytest.raises(InputError, match=r"--foreground \['roof'\]"):
        main(_args(root, models, foreground=("roof",)))

    def no_memory(*args: object, **kwargs: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Semantic, "logits", no_memory)
    with pytest.raises(InputError, match=r"^out of memory on cpu with --batch-size 4; try --batch-size 2$"):
        main(_args(root, models, backend="semantic", batch_size=4))
    monkeypatch.undo()
    (root / "B" / "p0.png").unlink()
    with pytest.raises(InputError, match=r"B/p0\.\*: no image on this date \(1 ids lack one\)"):
        main(_args(root, models))
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(root / "B" / "p0.png")
    (root / "A" / "p1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(InputError, match=r"A/p1\.png: cannot read image"):
        main(_args(root, models, backend="semantic"))


@needs_transformers
def test_command_line_error_is_one_line(root: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "diffmatch.vlm_run", "--root", str(root), "--backend", "semantic",
                          "--semantic-model", str(root / "A")], capture_output=True, text=True, env=_env())
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert out.stderr.startswith(f"error: --semantic-model {root / 'A'}: cannot load the model folder")
