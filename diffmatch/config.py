"""Typed configuration shared by every entry point.

Each entry point parses its own ``Args`` with ``tyro.cli`` in its ``__main__`` block; functions take
the sub-config they need (``DataConfig``, ``ModelConfig``, ...) or plain arguments, never the whole
``Args``. Defaults are the paper's settings (§4.1.2).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

Backbone = Literal["resnet18", "resnet34", "resnet50", "resnet101"]
Method = Literal["supervised", "fixmatch", "diffmatch"]
Distance = Literal["pixel", "authors"]
CEGMode = Literal["pixel", "instance", "mixed"]
T = TypeVar("T")

IGNORE = 255
"""Value of a pixel no loss and no metric sees, in every mask diffmatch reads or writes: padding, CEG
pixels that are unreliable (Eq. 6), labels' ignore regions."""


@dataclass
class DataConfig:
    """Where a data set lives and how its samples are cut."""

    root: Path
    """Data set root: ``A/``, ``B/``, ``label/``, optional ``list/``, ``vlm/`` and ``pseudo/``."""
    split_dir: Path | None = None
    """UniMatch/DiffMatch split folder (``<dir>/5%/labeled.txt`` ...), or ``levir`` / ``whu`` for the
    public lists shipped with the package (a folder of that name, if one exists, comes first). None:
    draw the labelled ids from the training ids with ``label_ratio`` and the seed."""
    unlabeled_root: Path | None = None
    """Unlabelled pairs (with their pseudo labels) from another data set root, for the cross-data-set
    setting of Table 4. None: the unlabelled ids of ``root``."""
    pseudo_dir: str = "pseudo"
    """Folder under each root that holds the CEG outputs (``change/``, ``A/``, ``B/``). Point it at
    the output of ``python -m diffmatch.ceg --mode pixel --out-name pseudo_pixel`` for the pixel-level
    CEG ablation of Table 7."""
    crop_size: int = 256
    """Side of the square training crop (weak view)."""
    val_split: str = "val"
    """Split used to pick the best checkpoint."""
    test_split: str = "test"
    """Split reported at the end of training."""
    label_threshold: int | None = None
    """Binarise labels with values other than 0/255 or 0/1 (stray greys of an annotation tool, JPEG
    noise): value >= T is change. None: such a label is an error naming the file and its values."""


@dataclass
class AugmentConfig:
    """Weak and strong views (§3.1; UniMatch's transforms)."""

    scale: tuple[float, float] = (0.8, 1.2)
    """Random rescale range of the long side (weak view)."""
    hflip_prob: float = 0.5
    """Probability of a horizontal flip (weak view)."""
    jitter: tuple[float, float, float, float] = (0.5, 0.5, 0.5, 0.25)
    """Colour jitter strength: brightness, contrast, saturation, hue (strong view)."""
    jitter_prob: float = 0.8
    """Probability of colour jitter, drawn per date (strong view)."""
    blur_prob: float = 0.5
    """Probability of Gaussian blur, drawn per date (strong view)."""
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Range of the blur's sigma (strong view)."""
    cutmix_prob: float = 0.5
    """Probability of pasting a CutMix box (strong view)."""
    cutmix_area: tuple[float, float] = (0.02, 0.4)
    """Range of the CutMix box area as a share of the crop."""
    cutmix_aspect: tuple[float, float] = (0.3, 1 / 0.3)
    """Range of the CutMix box aspect ratio (height / width)."""


@dataclass
class ModelConfig:
    """Siamese encoder and decoders (§3.4–3.7)."""

    backbone: Backbone = "resnet50"
    """torchvision ResNet shared by both dates; the last stage is dilated (output stride 16)."""
    weights: str = "none"
    """Encoder initialisation: ``imagenet`` (torchvision's ImageNet weights, downloaded and cached on
    first use; the default of ``train``, as in the paper), ``none`` (random) or the path of a local
    ResNet state dict."""
    decoder_channels: int = 256
    """Width of the all-MLP decoders."""
    dual_head: bool = True
    """Dual projection head (§3.4): the CEG change labels train ``w_vl``, not ``w_cr``."""


@dataclass
class CEGConfig:
    """Change event generation from single-date VLM outputs (§3.2; the file formats: docs/data.md)."""

    mode: CEGMode = "mixed"
    """Change labels to write: ``pixel`` (Eq. 7), ``instance`` (Eq. 8–10) or ``mixed`` (Eq. 11)."""
    gamma: float = 0.8
    """Reliability threshold γ on the concept probability (Eq. 6) for the change labels."""
    seg_gamma: float | None = None
    """Reliability threshold for the single-date masks (§3.5); None: the same as ``gamma``."""
    delta: float = 0.0
    """Instance-level threshold δ: an instance whose IoU sum is <= δ is a change event (Eq. 10)."""
    classes: tuple[str, ...] = ("house", "building", "road", "grass", "tree", "water")
    """The VLM's prompt list, in the order of its ``.npy`` channels and JSON ``category_id``."""
    foreground: tuple[str, ...] = ("house", "building")
    """Classes of the foreground concept (§3.2.1)."""
    background: tuple[str, ...] = ("road", "grass", "tree", "water")
    """Classes of the background concept (§3.2.1)."""
    connectivity: Literal[4, 8] = 8
    """Pixel connectivity of the components that stand in for instances when a VLM gives none."""

    @property
    def single_date_gamma(self) -> float:
        return self.gamma if self.seg_gamma is None else self.seg_gamma


@dataclass
class Stabilisers:
    """Remedies from the semi-supervised literature for a step that collapses on a small budget; none is in
    the paper or the authors' code, all are off by default (what each does on the benchmark:
    docs/benchmark.md)."""

    warmup_iters: int = 0
    """Warm-up of ``fixmatch`` and ``diffmatch``: for the first this many iterations the terms trained on
    the model's own pseudo labels (L_u and the strong-view half of L_c) are held back; L_s, the labelled
    half of L_c and the CEG guidance (whose labels come from the VLM) train from the first iteration, and
    λ_vl follows its schedule over the whole run. 0 in the paper's recipe."""
    rampup_iters: int = 0
    """Sigmoid ramp-up of the pseudo-label terms (L_u, the strong-view half of L_c) over this many
    iterations after the warm-up (Mean Teacher, Tarvainen and Valpola 2017; CCT): their weight grows from
    exp(-5) to 1. 0 in the paper's recipe."""
    class_thresholds: bool = False
    """FlexMatch's class-wise confidence thresholds (Zhang et al. 2021) in place of one τ for L_u and L_c,
    from a learning status kept over the unlabelled set (``step.LearningStatus``): a class the model is
    rarely sure of gets a lower threshold. Off in the paper."""
    weak_bn_stats: bool = False
    """BatchNorm running statistics from the labelled and weak views alone: the strong view's forward
    pass normalises with its own batch but does not update them. Its colour jitter, drawn per date,
    inflates |f_A - f_B|, and with it the statistics that evaluation and eval-mode pseudo labels use,
    which shrinks every change prediction (docs/benchmark.md). Off in the paper and the authors' code."""
    ema_teacher: float = 0.0
    """EMA decay of a teacher network that gives the pseudo labels of L_u and L_c in place of the
    student's own weak-view predictions (Mean Teacher, Tarvainen and Valpola 2017; UniMatch-V2
    uses one). It starts as a copy of the student when the pseudo-label terms start (after the warm-up).
    0: no teacher, as in FixMatch and the paper."""
    halve_supervised: bool = False
    """``supervised`` only: train on L_s / 2, the weight Eq. 1 gives L_s in the semi-supervised methods
    (a control of what the halving alone does). Off in the paper."""


@dataclass
class LossConfig:
    """Loss terms and their weights (Eq. 1, 3, 14, 15). The switches are Table 7."""

    tau: float = 0.95
    """Confidence threshold τ of the FixMatch pseudo labels (Eq. 3)."""
    lambda_c: float = 0.1
    """Weight λ_c of the contrastive consistency loss (Eq. 15)."""
    lambda_vl: float = 0.1
    """Initial weight λ_vl of the VLM guidance loss, falling linearly to 0 (§4.1.2)."""
    margin: float = 2.0
    """Margin ε of the batch-balanced contrastive loss (Eq. 14)."""
    vl_guidance: bool = True
    """CEG change labels supervise the change head (§3.3)."""
    seg_guidance: bool = True
    """CEG single-date masks supervise the segmentation decoder (§3.5)."""
    contrastive: bool = True
    """Contrastive consistency regularisation on the segmentation features (§3.6)."""
    distance: Distance = "pixel"
    """Distance map of L_c (§3.6): ``pixel``, the L2 distance over the decoder channels at each pixel,
    scaled by sqrt(64 / channels) so that at 256 channels it has the magnitude of the released code's;
    ``authors``, the released code's ``pairwise_distance`` over the width axis of NCHW features, for
    reproducing its tables term for term (docs/differences.md)."""
    stabilise: Stabilisers = field(default_factory=Stabilisers)
    """Additions to the step from the semi-supervised literature, all off in the paper."""


@dataclass
class OptimConfig:
    """SGD with poly decay (§4.1.2)."""

    lr: float = 0.02
    """Learning rate of the encoder."""
    decoder_lr_mult: float = 10.0
    """Decoders and heads learn this many times faster than the encoder."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 1e-4
    """SGD weight decay."""
    poly_power: float = 0.9
    """Exponent of the per-iteration poly decay."""


@dataclass
class TrainArgs:
    """Train DiffMatch (or the FixMatch / supervised baselines) on a change-detection data set."""

    data: DataConfig
    """The data set."""
    label_ratio: float = 0.05
    """Share of the training pairs that keep their labels (picks ``5%/`` etc. in a split folder)."""
    method: Method = "diffmatch"
    """``supervised`` (L_s), ``fixmatch`` (L_s + L_u) or ``diffmatch`` (every term of §3)."""
    epochs: int = 80
    """Passes over the unlabelled set (the labelled set for ``supervised``)."""
    batch_size: int = 8
    """Pairs per batch, for the labelled and each unlabelled batch."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Weak and strong views."""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(weights="imagenet"))
    """Network; the encoder starts from ImageNet weights, as in the paper (§4.1.2)."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss terms and ablation switches."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser."""
    out_dir: Path = Path("runs/diffmatch")
    """Run folder: config, ids, metrics.jsonl, last.pt, best.pt."""
    resume: bool = False
    """Continue the run in ``out_dir`` from its ``last.pt``."""
    check_data: bool = True
    """Check every file the run will read (images, labels, pseudo labels) before building the model;
    ``--no-check-data`` skips the check."""
    seed: int = 0
    """Seed of the labelled draw, the augmentations and the initialisation."""
    num_workers: int = 4
    """DataLoader worker processes per loader."""
    device: str | None = None
    """``cpu``, ``cuda`` or ``cuda:N``; None: cuda when available."""
    amp: bool = False
    """bf16 autocast on CUDA."""
    log_every: int = 20
    """Print a console line every this many iterations."""
    eval_interval: int = 1000
    """Evaluate on the validation split every this many iterations and after the last one: the same
    schedule for every method, whatever its epoch length."""
    save_every: float = 60.0
    """Seconds between saves of ``last.pt``, made at epoch ends (a resumed run restarts at the epoch
    after the last save) and always after the last epoch; 0: after every epoch. With a few labelled
    pairs an epoch is a few iterations, and saving each one would cost more than training it."""
    select_on: Literal["val", "test"] = "val"
    """Split that picks ``best.pt``; ``test`` reproduces the authors' protocol."""
    max_iters: int | None = None
    """Stop after this many iterations in total (smoke tests and benchmarks); None: ``epochs``."""
    tensorboard: bool = False
    """Also write TensorBoard event files to ``out_dir/tensorboard``: loss terms, learning rates, λ_vl,
    confident share, pairs/s, validation metrics and change maps of the first validation pairs (needs
    ``pip install -e ".[tensorboard]"``)."""

    @property
    def selection_split(self) -> str:
        """The split that picks ``best.pt``: ``data.val_split``, or ``data.test_split`` with ``--select-on test``."""
        return self.data.val_split if self.select_on == "val" else self.data.test_split

    @property
    def model_for_inference(self) -> ModelConfig:
        """The model config without initial weights (a checkpoint supplies them)."""
        return dataclasses.replace(self.model, weights="none")


def to_dict(config: object) -> dict:
    """A config as plain JSON-ready values (paths as strings, tuples as lists)."""

    def plain(value: object) -> object:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        return value

    return plain(config)  # type: ignore[return-value]


def from_dict(cls: type[T], values: dict) -> T:
    """Rebuild a (nested) config dataclass from ``to_dict``'s output."""
    hints = typing.get_type_hints(cls)
    values = _moved_into_nested(cls, values)
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in values:
            continue
        value, hint = values[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint):
            value = from_dict(hint, value)  # type: ignore[arg-type]
        elif value is not None and (hint is Path or Path in typing.get_args(hint)):
            value = Path(value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def _moved_into_nested(cls: type, values: dict) -> dict:
    """``values`` with the keys that are no field of ``cls`` but one of a nested config moved into it: the
    configs of runs saved before a setting moved (e.g. ``loss.warmup_iters``, now
    ``loss.stabilise.warmup_iters``) still load."""
    hints, names = typing.get_type_hints(cls), {f.name for f in dataclasses.fields(cls)}
    values = dict(values)
    for f in dataclasses.fields(cls):
        inner = hints[f.name]
        if not dataclasses.is_dataclass(inner):
            continue
        moved = {k: values.pop(k) for k in [k for k in values if k not in names] if k in
                 {g.name for g in dataclasses.fields(inner)}}
        if moved:
            values[f.name] = {**values.get(f.name, {}), **moved}
    return values
