"""The first look's Fourier alignment against latents built with known spectra."""
import math
from types import SimpleNamespace

import pytest
import torch

from sae.analysis.transcoders import key_frequency_alignment, key_pairs_mask
from sae.host_models.config import TokenPositions
from sae.tasks.modular import build_dataset
from tests.conftest import TINY_P, tiny_task


class DesignedLatents:
    """encode((a, b) rows) -> 4 latents: 1 + cos(2 pi 3 (a + b) / p) (a product term, pair (3, 3)),
    1 + cos(2 pi 5 a / p) (pair (5, 0)), noise, and a latent that never fires."""

    d_sae = 4

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        a, b = rows[:, 0, 0], rows[:, 0, 1]
        noise = torch.rand(len(rows), generator=torch.Generator().manual_seed(int(a.sum() + 7 * b.sum())))
        return torch.stack([1 + torch.cos(2 * math.pi * 3 * (a + b) / TINY_P),
                            1 + torch.cos(2 * math.pi * 5 * a / TINY_P), noise, torch.zeros_like(a)], dim=1)


def designed_run() -> SimpleNamespace:
    dataset = build_dataset(tiny_task())
    table = lambda tokens: tokens[:, [0, 2]].float()[:, None]  # noqa: E731  ([n, 1, 2]: a and b)
    data = SimpleNamespace(dataset=dataset, positions=TokenPositions.answer, train=table(dataset.train[0]),
                           test=table(dataset.test[0]))
    return SimpleNamespace(sae=DesignedLatents(), data=data)


def test_latents_built_on_key_frequencies_put_their_power_there():
    result = key_frequency_alignment(designed_run(), keys=[3, 5])
    by_latent = {row["latent"]: row for row in result["latents"]}
    assert result["alive"] == 3 and 3 not in by_latent  # the silent latent is left out
    assert by_latent[0]["key_share"] == pytest.approx(1.0, abs=1e-5) and (by_latent[0]["k_a"], by_latent[0]["k_b"]) == (3, 3)
    assert by_latent[1]["key_share"] == pytest.approx(1.0, abs=1e-5) and (by_latent[1]["k_a"], by_latent[1]["k_b"]) == (5, 0)
    assert by_latent[2]["key_share"] < 0.2  # noise: near chance
    # the product latent's power is all on (3, 3), the single-input latent's all on (5, 0)
    assert by_latent[0]["product_share"] == pytest.approx(1.0, abs=1e-5) and by_latent[0]["single_share"] < 1e-6
    assert by_latent[1]["single_share"] == pytest.approx(1.0, abs=1e-5) and by_latent[1]["product_share"] < 1e-6
    assert by_latent[2]["product_share"] + by_latent[2]["single_share"] <= by_latent[2]["key_share"] + 1e-12
    assert result["top_product"] == pytest.approx(1 / 3) and result["top_on_key"] >= 2 / 3
    size = TINY_P // 2 + 1
    assert result["chance"] == pytest.approx(key_pairs_mask(size, [3, 5]).sum().item() / (size * size - 1), rel=0.3)
    assert result["key_share"] == pytest.approx((2 + by_latent[2]["key_share"]) / 3)
