"""sae.saes.row_topk against torch.topk: the same values in every row (exactly: selection does no
arithmetic), indices that point at them, one index per entry."""
import pytest
import torch

import sae.saes.row_topk as row_topk_module
from sae.saes.row_topk import group_count, kernel_applies, row_topk

pytestmark = pytest.mark.skipif(row_topk_module.numba is None, reason="numba not installed")


@pytest.fixture(autouse=True, params=[1, 2], ids=["1 thread", "2 threads"])
def torch_threads(request):
    """Every test on both builds of the kernel: one torch thread takes the serial build, more the parallel."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_one_thread_takes_the_serial_build(torch_threads):
    """A parallel build at one thread starts numba's OpenMP pool, whose spinning idle threads took
    other processes' cores (two 1-thread SLURM tasks ran 10x slower)."""
    serial = row_topk_module._kernel() is row_topk_module._topk_rows_serial
    assert serial == (torch_threads == 1)


def assert_selects_the_top_k(pre: torch.Tensor, k: int, values: torch.Tensor, indices: torch.Tensor) -> None:
    expected = pre.topk(k, dim=1).values  # sorted, descending
    assert torch.equal(values.sort(dim=1, descending=True).values, expected)
    assert torch.equal(pre.gather(1, indices), values)
    assert (indices.sort(dim=1).values.diff(dim=1) > 0).all()  # no entry picked twice


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, k", [(2048, 16), (2000, 16), (300, 32), (16, 16), (17, 1), (5, 3), (640, 1)])
def test_same_values_as_torch_topk(n, k, dtype):
    generator = torch.Generator().manual_seed(n + k)
    pre = torch.randn(257, n, generator=generator, dtype=dtype) * torch.rand(257, 1, generator=generator, dtype=dtype)
    assert kernel_applies(pre, k)
    assert_selects_the_top_k(pre, k, *row_topk(pre, k))


def test_ties_at_the_cut_and_constant_rows():
    """Integer-valued rows: many entries tie with the k-th; any of the tied may be kept."""
    generator = torch.Generator().manual_seed(0)
    pre = torch.randint(0, 4, (200, 130), generator=generator).float()
    pre[0] = 1.0  # every entry tied
    pre[1, :] = float("-inf")
    pre[1, 7] = 0.0
    assert_selects_the_top_k(pre, 9, *row_topk(pre, 9))


def test_infinities_select_as_in_torch():
    pre = torch.randn(64, 200)
    pre[::3, ::7] = float("-inf")
    pre[1::5, 11] = float("inf")
    assert_selects_the_top_k(pre, 12, *row_topk(pre, 12))


@pytest.mark.parametrize("column", [0, 40, 77, 99])
def test_a_row_with_nan_takes_torch_topk(column):
    pre = torch.randn(8, 100)
    pre[3, column] = float("nan")
    values, indices = row_topk(pre, 5)
    expected_values, expected_indices = pre[3].topk(5, sorted=False)
    assert torch.allclose(values[3], expected_values, equal_nan=True)
    assert torch.equal(indices[3], expected_indices)
    clean = torch.arange(8) != 3
    assert_selects_the_top_k(pre[clean], 5, values[clean], indices[clean])


def test_gradient_flows_to_the_selected_entries_as_through_torch_topk():
    pre = torch.randn(32, 300, dtype=torch.float64, requires_grad=True)
    values, indices = row_topk(pre, 7)
    weights = torch.randn(32, 7, dtype=torch.float64)
    (values * weights).sum().backward()
    expected = torch.zeros_like(pre).scatter_(1, indices, weights)
    assert torch.equal(pre.grad, expected)


def test_other_dtypes_and_shapes_fall_back_to_torch():
    pre = torch.randn(10, 64).to(torch.bfloat16)
    assert not kernel_applies(pre, 4)
    values, indices = row_topk(pre, 4)
    assert torch.equal(values.sort(dim=1).values, pre.topk(4).values.sort(dim=1).values)


def test_a_non_contiguous_input_is_read_correctly():
    pre = torch.randn(300, 64).t()  # [64, 300], strided
    assert_selects_the_top_k(pre, 10, *row_topk(pre, 10))


def test_groups_never_fewer_than_k():
    for n, k in [(2048, 16), (16384, 32), (16, 16), (10, 1), (100, 90)]:
        assert k <= group_count(n, k) <= n
