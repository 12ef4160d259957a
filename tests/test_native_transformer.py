"""The stacked Transformer's compiled pieces (models/csrc/attention_cpu.cpp, norm_cpu.cpp) compute what the eager
stacked Transformer does, which test_models checks against the single forecasters."""

import pytest
import torch
import torch.nn.functional as F

from models import ModelSpec, build_model, native
from models.stacked import stack
from tests.stacked_pairs import assert_same_bits_on_one_and_two_threads, assert_same_step

pytestmark = pytest.mark.skipif(
    native.load() is None, reason="the compiled stacked layers are switched off or could not be built here"
)


def eager_rank_one_attention(x, slopes, consts, heads):
    """The reference: q, k and v formed as tensors, then PyTorch's attention; (K, B, T, width)."""
    k, batch, steps = x.shape
    width = slopes.shape[1] // 3
    formed = torch.addcmul(consts.unsqueeze(1), x.unsqueeze(-1), slopes[:, None, None, :])  # (K, B, T, 3W)
    q, key, value = (part.reshape(k * batch, steps, heads, width // heads).transpose(1, 2)
                     for part in formed.split(width, dim=-1))  # fmt: skip
    out = F.scaled_dot_product_attention(q, key, value).transpose(1, 2)
    return out.reshape(k, batch, steps, width)


# Windows of 1, 7 and 16 steps fill one vector of 16 (with padding), 33 three, 64 four; heads of 1 to 8 wide.
@pytest.mark.parametrize("steps, width, heads", [(1, 4, 1), (7, 12, 3), (16, 8, 1), (33, 16, 2), (64, 32, 4)])
def test_rank_one_attention_matches_pytorch_attention_forward_and_backward(steps, width, heads):
    torch.manual_seed(steps)
    x = torch.randn(3, 5, steps)
    slopes = torch.randn(3, 3 * width, requires_grad=True)
    consts = torch.randn(3, steps, 3 * width, requires_grad=True)
    grad = torch.randn(3, 5, steps, width)
    out = native.rank_one_attention(x, slopes, consts, heads)
    got = torch.autograd.grad(out, (slopes, consts), grad)
    # Against PyTorch's attention in float64: scores are summed in another order here (from per-network
    # terms, not q . k), so float32 rounding differs from float32 SDPA's (by as much as each is off).
    exact = [t.detach().double().requires_grad_() for t in (slopes, consts)]
    expected = eager_rank_one_attention(x.double(), *exact, heads)
    want = torch.autograd.grad(expected, exact, grad.double())
    for g, w in zip([out.detach(), *got], [expected.detach(), *want]):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=2e-6 * float(w.abs().max()))


def test_rank_one_attention_keeps_a_nan_network_apart_and_refuses_what_it_cannot_run():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 9)
    x[1, 2, 5] = float("nan")
    slopes = torch.randn(3, 24, requires_grad=True)
    consts = torch.randn(3, 9, 24, requires_grad=True)
    out = native.rank_one_attention(x, slopes, consts, 2)
    out.sum().backward()
    assert torch.isnan(out[1, 2]).all() and not torch.isnan(out[[0, 2]]).any()
    assert torch.isnan(slopes.grad[1]).all() and not torch.isnan(slopes.grad[[0, 2]]).any()
    assert not torch.isnan(consts.grad[[0, 2]]).any()
    expected = eager_rank_one_attention(x[[0, 2]], slopes[[0, 2]], consts[[0, 2]], 2)
    torch.testing.assert_close(out[[0, 2]], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="values' gradient"):
        native.rank_one_attention(x.clone().requires_grad_(), slopes, consts, 2)
    with pytest.raises(RuntimeError, match="shapes do not agree"):
        native.rank_one_attention(x, slopes, consts, 5)
    with pytest.raises(RuntimeError, match="windows of 1 to 64"):
        long = torch.randn(3, 4, 65)
        native.rank_one_attention(long, slopes, torch.randn(3, 65, 24), 2)


@pytest.mark.parametrize("width", [8, 32, 37])
def test_residual_norm_matches_layer_norm_with_each_networks_affine(width):
    torch.manual_seed(width)
    a, b = (torch.randn(4, 11, width, requires_grad=True) for _ in range(2))
    matrix = torch.randn(4, 3 * width, requires_grad=True)  # weight and bias as views of a stack's rows
    weight, bias = matrix[:, :width].view(4, 1, width), matrix[:, 2 * width :].view(4, 1, width)
    grad = torch.randn(4, 11, width)
    out = native.ResidualNorm.apply(a, b, weight, bias, 1e-5)
    expected = torch.addcmul(bias, F.layer_norm(a + b, (width,), eps=1e-5), weight)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(out, (a, b, matrix), grad)
    want = torch.autograd.grad(expected, (a, b, matrix), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def stacked_transformers(window: int, k: int = 3, layers: int = 2):
    spec = ModelSpec(architecture="transformer", hidden=12, layers=layers, heads=3, window=window, horizon=2)
    networks = [build_model(spec, torch.Generator().manual_seed(seed)) for seed in range(k)]
    compiled, eager = stack("transformer", networks), stack("transformer", networks)
    eager.use_compiled = False
    return compiled, eager


@pytest.mark.parametrize("window, layers", [(10, 1), (10, 2), (40, 3), (70, 2)])
def test_the_compiled_stacked_transformer_trains_as_the_eager_one(window, layers):
    compiled, eager = stacked_transformers(window, layers=layers)
    x, target = torch.randn(3, 6, window), torch.randn(3, 6, 2)
    assert compiled.compiled(x) == (window <= native.ATTENTION_MAX_STEPS) and not eager.compiled(x)
    assert_same_step(compiled, eager, x, target)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x[:2], 2), eager(x[:2], 2), rtol=1e-5, atol=1e-6)


def test_a_nan_network_is_kept_apart_in_the_compiled_stacked_transformer():
    compiled, eager = stacked_transformers(12)
    x, target = torch.randn(3, 6, 12), torch.randn(3, 6, 2)
    x[1, 4, 7] = float("nan")
    out_c, grads_c = assert_same_step(compiled, eager, x, target, equal_nan=True)
    assert torch.isnan(out_c[1, 4]).all() and torch.isnan(grads_c[1]).any()
    assert not torch.isnan(out_c[[0, 2]]).any() and not torch.isnan(grads_c[[0, 2]]).any()


def test_one_and_two_threads_give_the_same_bits():
    compiled, _ = stacked_transformers(20, k=4)
    assert_same_bits_on_one_and_two_threads(compiled, torch.randn(4, 9, 20), torch.randn(4, 9, 2))
