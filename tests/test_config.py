"""The configs: ``to_dict`` / ``from_dict`` round trips through JSON, as run folders and checkpoints store
them."""

from __future__ import annotations

import json
from pathlib import Path

from diffmatch.config import (
    AugmentConfig,
    CEGConfig,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    Stabilisers,
    TrainArgs,
    from_dict,
    to_dict,
)


def through_json(config: object) -> dict:
    return json.loads(json.dumps(to_dict(config)))


def test_to_dict_gives_plain_json_values() -> None:
    data = DataConfig(root=Path("data/levir"), split_dir=Path("levir"))
    assert to_dict(data)["root"] == "data/levir" and to_dict(data)["split_dir"] == "levir"
    assert to_dict(data)["unlabeled_root"] is None
    assert to_dict(CEGConfig(classes=("a", "b"), foreground=("a",), background=("b",)))["classes"] == ["a", "b"]
    assert to_dict(AugmentConfig())["scale"] == [0.8, 1.2]


def test_train_args_round_trip_with_every_kind_of_field() -> None:
    args = TrainArgs(
        data=DataConfig(root=Path("/data/LEVIR-CD256"), split_dir=Path("levir"), unlabeled_root=Path("WHU-CD256"),
                        pseudo_dir="pseudo_pixel", crop_size=128, label_threshold=128),
        label_ratio=0.1,
        method="fixmatch",
        augment=AugmentConfig(scale=(0.5, 2.0), hflip_prob=0.0),
        model=ModelConfig(backbone="resnet18", weights="none", dual_head=False),
        loss=LossConfig(tau=0.9, distance="authors", stabilise=Stabilisers(ema_teacher=0.99)),
        optim=OptimConfig(lr=0.01),
        out_dir=Path("runs/x"),
        seed=3,
        device="cpu",
        select_on="test",
        max_iters=7,
    )
    back = from_dict(TrainArgs, through_json(args))
    assert back == args
    assert isinstance(back.data.root, Path) and isinstance(back.out_dir, Path)
    assert isinstance(back.data.split_dir, Path) and back.data.split_dir == Path("levir")
    assert back.augment.scale == (0.5, 2.0) and isinstance(back.augment.scale, tuple)
    assert back.max_iters == 7 and back.device == "cpu"


def test_none_and_defaults_survive_the_round_trip() -> None:
    args = TrainArgs(data=DataConfig(root=Path("r")))
    back = from_dict(TrainArgs, through_json(args))
    assert back == args and back.data.split_dir is None and back.max_iters is None


def test_missing_keys_take_the_defaults() -> None:
    # An older run's config.json without the newer fields still loads, with today's defaults.
    saved = through_json(TrainArgs(data=DataConfig(root=Path("r")), seed=5))
    del saved["tensorboard"], saved["loss"]["stabilise"]["class_thresholds"]
    back = from_dict(TrainArgs, saved)
    assert back.seed == 5 and back.tensorboard is False and back.loss.stabilise.class_thresholds is False


def test_ceg_config_round_trip() -> None:
    cfg = CEGConfig(mode="pixel", gamma=0.5, seg_gamma=0.7, delta=0.1, classes=("house", "road"),
                    foreground=("house",), background=("road",), connectivity=4)
    assert from_dict(CEGConfig, through_json(cfg)) == cfg

