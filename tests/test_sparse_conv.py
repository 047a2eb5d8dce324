"""Sparse-conv adapters: each op equals its dense nn.Conv2d counterpart on a zero-filled map at the
visible positions (values and gradients), and the spconv and native backends agree."""
import sys

import pytest
import torch
import torch.nn as nn

from greenmim.plan.masking import random_mask
from greenmim.ops.sparse_conv import NativeBackend, get_sparse_backend, submanifold_depthwise3x3
from greenmim.plan.geometry import VisibleGeometry
from greenmim.plan.windows import tokens_to_grid

GRID = (3, 4)  # non-square unit grid


def setup(t, channels, batch=2, ratio=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = random_mask(batch, GRID[0] * GRID[1], ratio, generator=gen)
    n_vis = int((~mask[0]).sum())
    x = torch.randn(batch, n_vis * t * t, channels, generator=gen, requires_grad=True)
    return mask, x, VisibleGeometry(mask.numpy(), GRID, torch.device("cpu"))


def dense_reference(op, x, mask, t, t_out):
    """``op`` on the zero-filled dense map, read back at the visible positions (as a dense map)."""
    dense = op(tokens_to_grid(x, mask, GRID, t))
    keep = (~mask).view(-1, 1, GRID[0], 1, GRID[1], 1).expand(-1, -1, -1, t_out, -1, t_out)
    return dense * keep.reshape(mask.shape[0], 1, GRID[0] * t_out, GRID[1] * t_out)


def grads(out, inputs):
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return torch.autograd.grad((out * weight).sum(), inputs)


def backends():
    names = ["native"]
    try:
        import spconv.pytorch  # noqa: F401

        names.append("spconv")
    except ImportError:
        pass
    return names


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("t,s,c_in,c_out", [(8, 4, 3, 8), (8, 8, 6, 6), (4, 2, 5, 7), (1, 1, 4, 4)])
def test_stride_conv_equals_dense(backend, t, s, c_in, c_out):
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, s, s)
    mask, x, geometry = setup(t, c_in)
    out = get_sparse_backend(backend).stride_conv(x, conv, geometry, t)
    assert out.shape == (x.shape[0], x.shape[1] // (s * s), c_out)
    got = tokens_to_grid(out, mask, GRID, t // s)
    ref = dense_reference(conv, x, mask, t, t // s)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    params = [x, conv.weight, conv.bias]
    for g_got, g_ref in zip(grads(got, params), grads(ref, params)):
        torch.testing.assert_close(g_got, g_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("t", [8, 2, 1])
def test_submanifold_depthwise_equals_dense(t):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, 1, 1, groups=6)  # Twins' PEG conv
    mask, x, geometry = setup(t, 6, ratio=0.6)
    out = submanifold_depthwise3x3(x, conv, geometry.neighbours(t))
    got = tokens_to_grid(out, mask, GRID, t)
    ref = dense_reference(conv, x, mask, t, t)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    params = [x, conv.weight, conv.bias]
    for g_got, g_ref in zip(grads(got, params), grads(ref, params)):
        torch.testing.assert_close(g_got, g_ref, atol=1e-4, rtol=1e-4)


def test_submanifold_depthwise_gradcheck():
    conv = nn.Conv2d(3, 3, 3, 1, 1, groups=3).double()
    mask, x, geometry = setup(2, 3, batch=2)
    x = x.detach().double().requires_grad_()
    nbr = geometry.neighbours(2)
    weight = conv.weight.detach().reshape(3, 9).t().contiguous().requires_grad_()
    from greenmim.ops.sparse_conv import _SubmanifoldDepthwise

    assert torch.autograd.gradcheck(lambda a, w: _SubmanifoldDepthwise.apply(a.reshape(-1, 3), w, nbr), (x, weight))


def test_backends_agree():
    pytest.importorskip("spconv.pytorch")
    torch.manual_seed(0)
    native, sparse = get_sparse_backend("native"), get_sparse_backend("spconv")
    for t, s, c_in, c_out in [(32, 4, 3, 8), (8, 8, 8, 8), (4, 2, 8, 16)]:
        conv = nn.Conv2d(c_in, c_out, s, s)
        mask, x, geometry = setup(t, c_in, ratio=0.25, seed=t)
        a = native.stride_conv(x, conv, geometry, t)
        b = sparse.stride_conv(x, conv, geometry, t)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        params = [x, conv.weight, conv.bias]
        for ga, gb in zip(grads(a, params), grads(b, params)):
            torch.testing.assert_close(ga, gb, atol=1e-4, rtol=1e-4)


def test_spconv_backend_keeps_conv2d_parameters():
    pytest.importorskip("spconv.pytorch")
    conv = nn.Conv2d(4, 8, 2, 2)
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    mask, x, geometry = setup(4, 4)
    get_sparse_backend("spconv").stride_conv(x, conv, geometry, 4).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.shape == (8, 4, 2, 2)
    assert all(torch.equal(before[k], v) for k, v in conv.state_dict().items())


def test_auto_and_errors(monkeypatch):
    assert isinstance(get_sparse_backend("native"), NativeBackend)
    with pytest.raises(ValueError, match="sparse_backend"):
        get_sparse_backend("cuda")
    monkeypatch.setitem(sys.modules, "spconv.pytorch", None)  # as if spconv were not installed
    assert get_sparse_backend("auto").name == "native"
    with pytest.raises(ImportError, match="pip install spconv"):
        get_sparse_backend("spconv")


def test_rejects_unit_crossing_convs():
    mask, x, geometry = setup(4, 4)
    with pytest.raises(ValueError, match="divides 4"):
        NativeBackend().stride_conv(x, nn.Conv2d(4, 4, 8, 8), geometry, 4)
    with pytest.raises(ValueError, match="kernel == stride"):
        NativeBackend().stride_conv(x, nn.Conv2d(4, 4, 3, 2), geometry, 4)
    with pytest.raises(ValueError, match="depthwise"):
        submanifold_depthwise3x3(x, nn.Conv2d(4, 4, 3, 1, 1), geometry.neighbours(4))
