from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from diffmatch.augment import image_to_tensor
from diffmatch.config import ModelConfig
from diffmatch.evaluate import Windows, change_logits, change_margin, tile_starts, window_grid
from diffmatch.model import ModelOutput, build_model


class WindowIndex(nn.Module):
    """Returns, for the k-th window it sees, logits (0, k) over the whole window; records batch sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.seen, self.batches = 0, []

    def forward(self, a: Tensor, b: Tensor, *, change_only: bool = False) -> ModelOutput:
        n, _, h, w = a.shape
        k = torch.arange(self.seen, self.seen + n, dtype=torch.float32).view(n, 1, 1, 1)
        self.seen += n
        self.batches.append(n)
        return ModelOutput(torch.cat([torch.zeros(n, 1, h, w), k.expand(n, 1, h, w)], dim=1))


@pytest.fixture(scope="module")
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone="resnet18", decoder_channels=16)).eval()


def test_tile_starts_cover_the_length_and_end_at_the_border() -> None:
    assert tile_starts(10, 4, 2) == [0, 2, 4, 6]
    assert tile_starts(10, 4, 4) == [0, 4, 6]
    assert tile_starts(8, 4, 4) == [0, 4]
    assert tile_starts(3, 4, 2) == [0]
    assert window_grid(4, 10, 4, 2) == [(0, 0), (0, 2), (0, 4), (0, 6)]
    assert window_grid(50, 70, 256, 64) == [(0, 0)]
    with pytest.raises(ValueError, match="overlap"):
        window_grid(10, 10, 4, 4)


def test_overlapping_windows_are_averaged_exactly() -> None:
    model, batches = WindowIndex(), []
    a = torch.zeros(1, 3, 4, 10)
    margin = change_margin(model, a, a, windows=Windows(4, 2, 3), on_batch=batches.append)
    # windows at x = 0, 2, 4, 6 carry margins 0, 1, 2, 3; each column averages the windows over it
    expected = torch.tensor([0, 0, 0.5, 0.5, 1.5, 1.5, 2.5, 2.5, 3, 3]).expand(4, 10)
    assert torch.equal(margin[0], expected)
    assert batches == [3, 1] and model.batches == [3, 1]


def test_pairs_of_one_window_run_as_one_batch() -> None:
    model = WindowIndex()
    a = torch.zeros(3, 3, 8, 8)
    logits = change_logits(model, a, a, windows=Windows(16, 4, 8))
    assert model.batches == [3]
    assert logits.shape == (3, 2, 8, 8)
    assert [float(logits[i, 1, 0, 0]) for i in range(3)] == [0, 1, 2]


def test_uint8_input_is_normalised_like_image_to_tensor(tiny_model: nn.Module) -> None:
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(2))
    as_uint8 = [torch.from_numpy(x).permute(2, 0, 1)[None] for x in (a, b)]
    as_float = [image_to_tensor(Image.fromarray(x))[None] for x in (a, b)]
    from_uint8 = change_margin(tiny_model, *as_uint8, windows=Windows(32, 8, 4))
    from_float = change_margin(tiny_model, *as_float, windows=Windows(32, 8, 4))
    torch.testing.assert_close(from_uint8, from_float, rtol=0, atol=1e-5)


def test_margin_is_the_logit_difference_and_tiles_match_crops(tiny_model: nn.Module) -> None:
    torch.manual_seed(1)
    a, b = torch.randn(2, 3, 64, 96), torch.randn(2, 3, 64, 96)
    logits = change_logits(tiny_model, a, b, windows=Windows(32, 0, 5))
    margin = change_margin(tiny_model, a, b, windows=Windows(32, 0, 5))
    torch.testing.assert_close(margin, logits[:, 1] - logits[:, 0], rtol=0, atol=1e-5)
    with torch.no_grad():
        crop = tiny_model(a[1:, :, 32:, 64:], b[1:, :, 32:, 64:], change_only=True).change
    torch.testing.assert_close(logits[1:, :, 32:, 64:], crop, rtol=0, atol=1e-5)
