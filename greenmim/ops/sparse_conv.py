"""Sparse convolutions on visible tokens: one adapter interface, two backends.

Tokens are stored *unit-major* (see :mod:`greenmim.plan.windows`): per sample, the visible mask
units in ascending raster order, inside a unit its ``t x t`` tokens in raster order. Two kinds of
convolution occur in the hierarchical encoders, and both are computed on visible positions only:

* **kernel == stride convolutions aligned to mask units** (patch embeddings, Twins' GSA spatial
  reduction). A stride ``s`` dividing ``t`` means every kernel window lies inside one unit, so it
  sees all-visible or all-masked input: on the visible units the result equals the dense conv.
  Output: unit-major tokens with ``t / s`` tokens per unit side.
* **3x3 depthwise submanifold convolution** (Twins' positional encoding generator, PEG; PVTv2's
  MLP conv). Kernel windows cross unit borders; masked and out-of-image neighbours count as zero,
  outputs exist at visible positions only. This equals the dense conv on a zero-filled map, read at
  visible positions.
  Two native implementations: a gather of the 9 neighbours (its backward a gather too, no atomics),
  and per-unit tiles (one gather of each unit with a 1-token border, then the dense depthwise conv
  over the tiles), which moves far less memory for wide maps (PVTv2's MLP).
* **3x3 stride-2 convolution, padding 1** (PVTv2's overlapping downsampling): the same rule; its
  output token ``(y, x)`` reads the 3x3 neighbourhood of input token ``(2y, 2x)``, so its inputs are
  the depthwise conv's neighbour index at the even positions of every unit (no extra planning).

Backends (:func:`get_sparse_backend`):

* ``native``: PyTorch only. kernel == stride convs are a reshape of the unit-major tokens into
  ``s x s`` blocks plus one matrix product; the depthwise conv gathers each token's 9 neighbours
  through an index planned on the host ahead of the step (:func:`~greenmim.plan.geometry.neighbour_index`).
* ``spconv``: kernel == stride convs through ``spconv.pytorch.SparseConv2d`` (CPU build ``pip install
  spconv``, GPU builds ``spconv-cuXXX``). spconv has no grouped/depthwise convolution, so the PEG
  (and PVTv2's stride-2 3x3 conv) use the native gather on this backend too.
* ``auto``: ``native``, on every device. A kernel == stride conv on unit-aligned tokens is a reshape
  plus one matrix product, which needs no index building, no host work and no extra package; on CPU
  it measured faster than spconv for every conv of Twins-L (e.g. the 4x4 patch embedding 7.7 ms vs
  67 ms), and spconv's GPU wheels (``spconv-cuXXX``) stop at CUDA 12.6 and build their index
  tensors with host synchronisation. Ask for ``spconv`` explicitly to use it.

Weights always stay in the ``nn.Conv2d`` modules of the model (timm's names and layout); the
spconv backend converts them to its own layout on every call, so gradients flow to the
``nn.Conv2d`` parameters and checkpoints stay interchangeable with timm.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from ..plan.geometry import VisibleGeometry

SPARSE_BACKENDS = ("auto", "spconv", "native")

# kernel offsets of a 3x3 conv, in the raster order of nn.Conv2d's weight (dy, dx)
OFFSETS_3X3 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


def check_stride_conv(conv: nn.Conv2d, t: int) -> int:
    """The stride ``s`` of a kernel == stride conv that stays inside mask units of ``t x t`` tokens."""
    k, s = tuple(conv.kernel_size), tuple(conv.stride)
    if k != s or k[0] != k[1] or tuple(conv.padding) != (0, 0) or tuple(conv.dilation) != (1, 1) or conv.groups != 1:
        raise ValueError(
            f"sparse stride conv needs kernel == stride (square), no padding, dilation or groups; got {conv}"
        )
    if t % s[0]:
        raise ValueError(
            f"a kernel=stride={s[0]} conv on mask units of {t}x{t} tokens would mix visible and masked tokens; "
            f"use a stride that divides {t} (e.g. Twins' sr_ratios equal to the tokens per unit side: 8, 4, 2, 1)"
        )
    return s[0]


def check_depthwise3x3(conv: nn.Conv2d) -> None:
    c = conv.in_channels
    if (
        tuple(conv.kernel_size) != (3, 3) or tuple(conv.stride) != (1, 1) or tuple(conv.padding) != (1, 1)
        or tuple(conv.dilation) != (1, 1) or conv.groups != c or conv.out_channels != c
    ):
        raise ValueError(f"submanifold conv supports 3x3 depthwise convs only (stride 1, padding 1: Twins' PEG, PVTv2's MLP); got {conv}")


def native_stride_conv(x: torch.Tensor, conv: nn.Conv2d, t: int) -> torch.Tensor:
    """kernel == stride conv on unit-major tokens: ``(B, N_u * t * t, C) -> (B, N_u * (t/s)^2, C_out)``."""
    s = check_stride_conv(conv, t)
    b, n, c = x.shape
    r = t // s
    # (b, unit, block_y, in_y, block_x, in_x, c) -> rows of (c, in_y, in_x): nn.Conv2d's weight order
    x = x.reshape(b, n // (t * t), r, s, r, s, c).permute(0, 1, 2, 4, 6, 3, 5)
    return F.linear(x.reshape(b, -1, c * s * s), conv.weight.reshape(conv.out_channels, -1), conv.bias)


class _SubmanifoldDepthwise(torch.autograd.Function):
    """9-neighbour depthwise conv that keeps only its input for backward (the gathered neighbours are
    recomputed), so it costs one activation of memory instead of nine."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        # x: (N, C); weight: (9, C); neighbours: (N, 9) with N meaning "zero"
        padded = torch.cat([x, x.new_zeros(1, x.shape[1])])
        out = torch.zeros_like(x)
        for k in range(9):
            out.addcmul_(padded.index_select(0, neighbours[:, k]), weight[k])
        ctx.save_for_backward(x, weight, neighbours)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, neighbours = ctx.saved_tensors
        grad_x = grad_w = None
        padded = torch.cat([x, x.new_zeros(1, x.shape[1])])
        if ctx.needs_input_grad[0]:
            # the transpose of a 3x3 submanifold conv is the same conv with the kernel flipped:
            # token i's gradient gathers grad_out at neighbour 8-k with weight k (no atomics)
            grad_out_padded = torch.cat([grad_out, grad_out.new_zeros(1, grad_out.shape[1])])
            grad_x = torch.zeros_like(x)
            for k in range(9):
                grad_x.addcmul_(grad_out_padded.index_select(0, neighbours[:, 8 - k]), weight[k])
        if ctx.needs_input_grad[1]:  # reduced over all tokens: accumulate in fp32
            grad_w = torch.stack(
                [(padded.index_select(0, neighbours[:, k]) * grad_out).sum(0, dtype=torch.float32) for k in range(9)]
            ).to(weight.dtype)
        return grad_x, grad_w, None


def submanifold_depthwise3x3(x: torch.Tensor, conv: nn.Conv2d, neighbours: torch.Tensor) -> torch.Tensor:
    """3x3 depthwise submanifold conv (no residual): ``(B, N, C) -> (B, N, C)``.

    ``neighbours``: :meth:`VisibleGeometry.neighbours` of this stage. Masked and out-of-image
    neighbours count as zero, so the result equals ``conv`` on a zero-filled dense map at the
    visible positions.
    """
    check_depthwise3x3(conv)
    b, n, c = x.shape
    weight = conv.weight.reshape(c, 9).t().to(x.dtype)  # x's dtype, as nn.Conv2d under autocast
    out = _SubmanifoldDepthwise.apply(x.reshape(b * n, c), weight, neighbours)
    if conv.bias is not None:
        out = out + conv.bias.to(x.dtype)
    return out.view(b, n, c)


def unit_tiles(neighbours: torch.Tensor, t: int) -> torch.Tensor:
    """``(N_u, t + 2, t + 2)``: every visible unit's tokens with a 1-token border of its neighbours',
    as indices into the stage's tokens (``B * N``, one past the end, where hidden or outside the
    image), built on the device from the stage's 3x3 neighbour index ``(N_u * t * t, 9)``."""
    n = neighbours.view(-1, t, t, 9)
    tiles = n.new_empty(n.shape[0], t + 2, t + 2)
    for k, (dy, dx) in enumerate(OFFSETS_3X3):  # neighbour k of token (y, x) sits at tile (y + 1 + dy, x + 1 + dx)
        tiles[:, 1 + dy:1 + dy + t, 1 + dx:1 + dx + t] = n[..., k]
    return tiles


def tiled_depthwise3x3(x: torch.Tensor, conv: nn.Conv2d, tiles: torch.Tensor) -> torch.Tensor:
    """The 3x3 depthwise submanifold conv of :func:`submanifold_depthwise3x3` (same result), computed
    as one gather of each visible unit's ``(t + 2)^2`` tile (``tiles``: :func:`unit_tiles` of the stage,
    zeros where hidden or outside) and ``conv`` without padding over the tiles: far less memory
    traffic than 9 gathers for wide maps (PVTv2's MLP, 8x its stage width: 4x faster fwd + bwd on CPU
    at 512 channels, t = 8); its input gradient is the gather's scatter-add (``index_add_``).
    Native on every backend."""
    check_depthwise3x3(conv)
    b, n, c = x.shape
    t = tiles.shape[1] - 2
    padded = torch.cat([x.reshape(b * n, c), x.new_zeros(1, c)])
    maps = padded.index_select(0, tiles.reshape(-1)).view(-1, t + 2, t + 2, c).permute(0, 3, 1, 2)
    out = F.conv2d(maps, conv.weight, conv.bias, groups=c)  # (N_u, C, t, t)
    return out.permute(0, 2, 3, 1).reshape(b, n, c)


def check_conv3x3_stride2(conv: nn.Conv2d) -> None:
    if (
        tuple(conv.kernel_size) != (3, 3) or tuple(conv.stride) != (2, 2) or tuple(conv.padding) != (1, 1)
        or tuple(conv.dilation) != (1, 1) or conv.groups != 1
    ):
        raise ValueError(f"the stride-2 sparse conv supports PVTv2's downsampling only (3x3, stride 2, padding 1, no groups); got {conv}")


def stride2_neighbours(neighbours: torch.Tensor, t: int) -> torch.Tensor:
    """The inputs of a 3x3 stride-2 padding-1 conv from a stage with ``t`` tokens per unit side:
    the rows of its 3x3 neighbour index (:func:`~greenmim.plan.geometry.neighbour_index`) at the even positions of every
    unit, i.e. ``(B * N_u * (t/2)^2, 9)`` in the unit-major order of the output stage."""
    if t % 2:
        raise ValueError(f"a stride-2 conv needs an even number of tokens per unit side, got {t}")
    return neighbours.view(-1, t, t, 9)[:, ::2, ::2].reshape(-1, 9)


def submanifold_conv3x3_stride2(x: torch.Tensor, conv: nn.Conv2d, neighbours: torch.Tensor, t: int) -> torch.Tensor:
    """3x3 stride-2 padding-1 conv on unit-major tokens: ``(B, N_u * t * t, C_in) -> (B, N_u * (t/2)^2, C_out)``.

    ``neighbours``: :meth:`VisibleGeometry.neighbours` of the input stage. Masked and out-of-image
    inputs count as zero: the result equals ``conv`` on the zero-filled dense map, read at the
    visible output positions. One gather of the 9 inputs per output, then one matrix product."""
    check_conv3x3_stride2(conv)
    b, n, c = x.shape
    index = stride2_neighbours(neighbours, t)
    padded = torch.cat([x.reshape(b * n, c), x.new_zeros(1, c)])
    cols = padded.index_select(0, index.reshape(-1)).view(index.shape[0], 9 * c)  # (ky, kx, c) per row
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, 9 * c)
    return F.linear(cols, weight, conv.bias).view(b, -1, conv.out_channels)


class SparseConvBackend:
    """The adapter interface: convolutions on unit-major visible tokens (see the module docstring)."""

    name = ""

    def stride_conv(self, x: torch.Tensor, conv: nn.Conv2d, geometry: VisibleGeometry, t: int) -> torch.Tensor:
        """kernel == stride conv: ``(B, N_u * t * t, C_in) -> (B, N_u * (t/s)^2, C_out)``, unit-major."""
        raise NotImplementedError

    def depthwise3x3(self, x: torch.Tensor, conv: nn.Conv2d, geometry: VisibleGeometry, t: int) -> torch.Tensor:
        """3x3 depthwise submanifold conv: ``(B, N, C) -> (B, N, C)`` (native gather on every backend)."""
        return submanifold_depthwise3x3(x, conv, geometry.neighbours(t))

    def conv3x3_stride2(self, x: torch.Tensor, conv: nn.Conv2d, geometry: VisibleGeometry, t: int) -> torch.Tensor:
        """3x3 stride-2 padding-1 conv: ``(B, N_u * t * t, C_in) -> (B, N_u * (t/2)^2, C_out)`` (native gather
        on every backend)."""
        return submanifold_conv3x3_stride2(x, conv, geometry.neighbours(t), t)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NativeBackend(SparseConvBackend):
    """PyTorch only: reshape + matmul for kernel == stride convs, 9-neighbour gather for the PEG."""

    name = "native"

    def stride_conv(self, x, conv, geometry, t):
        return native_stride_conv(x, conv, t)


@contextlib.contextmanager
def _single_thread(enabled: bool):
    """One intra-op thread while spconv's CPU kernels run (see :class:`SpconvBackend`)."""
    if not enabled:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _SpconvCall(torch.autograd.Function):
    """Runs a spconv module's forward and backward (its own autograd graph, built inside) with one
    intra-op thread on CPU: spconv 2.3.8's CPU gather/scatter races at 2+ threads (measured: wrong
    output and input-gradient rows, none with one thread)."""

    @staticmethod
    def forward(ctx, features, weight, bias, module, make_tensor):
        cpu = not features.is_cuda
        with _single_thread(cpu), torch.enable_grad():
            inputs = [t.detach().requires_grad_(t.requires_grad) for t in (features, weight, bias)]
            out = torch.func.functional_call(module, {"weight": inputs[1], "bias": inputs[2]}, (make_tensor(inputs[0]),))
        ctx.cpu, ctx.inputs, ctx.out = cpu, inputs, out.features
        ctx.mark_non_differentiable(out.indices)
        return out.features.detach(), out.indices

    @staticmethod
    def backward(ctx, grad_out, _grad_indices):
        wanted = [t for t in ctx.inputs if t.requires_grad]
        grads = iter(())
        if wanted:
            with _single_thread(ctx.cpu):
                grads = iter(torch.autograd.grad(ctx.out, wanted, grad_out))
        return tuple(next(grads) if t.requires_grad else None for t in ctx.inputs) + (None, None)


class SpconvBackend(SparseConvBackend):
    """kernel == stride convs through ``spconv.pytorch.SparseConv2d``.

    The spconv module is only a template kept outside the model (one per conv shape, its own
    parameters unused): on each call the ``nn.Conv2d`` weight is converted to spconv's layout and
    passed in through :func:`torch.func.functional_call`, so gradients reach the ``nn.Conv2d``
    parameters and state_dicts keep timm's layout.

    spconv has no grouped/depthwise convolution: :meth:`depthwise3x3` (Twins' PEG) is the native
    9-neighbour gather on this backend too.

    Two workarounds for spconv 2.3.8's CPU build, both measured here: its CPU kernels run with one
    intra-op thread (they race at 2+ threads), and where CUDA is unavailable its backward's
    unconditional ``torch.cuda.current_stream()`` call is answered with the null stream (the CPU
    path never uses it).
    """

    name = "spconv"

    def __init__(self):
        self.spconv = import_spconv()
        from spconv import constants

        self._krsc = getattr(constants, "ALL_WEIGHT_IS_KRSC", True)
        self._templates: Dict[Tuple[int, int, int], nn.Module] = {}
        if not torch.cuda.is_available():
            from spconv.pytorch import ops as spconv_ops

            spconv_ops.get_current_stream = lambda: 0

    def _template(self, c_in: int, c_out: int, s: int, device: torch.device) -> nn.Module:
        key = (c_in, c_out, s)
        if key not in self._templates:
            self._templates[key] = self.spconv.SparseConv2d(c_in, c_out, s, s, bias=True)
        return self._templates[key].to(device)

    def _weight(self, module: nn.Module, conv: nn.Conv2d) -> torch.Tensor:
        w = conv.weight  # nn.Conv2d: (out, in, kh, kw)
        if self._krsc or module.algo != self.spconv.ConvAlgo.Native:
            w = w.permute(0, 2, 3, 1)  # KRSC: (out, kh, kw, in)
        else:
            w = w.permute(2, 3, 0, 1)  # RSKC: (kh, kw, out, in)
        return w.contiguous()

    def stride_conv(self, x, conv, geometry, t):
        s = check_stride_conv(conv, t)
        if s == 1:  # a per-token linear layer; spconv's 1x1 path also expects another weight layout
            return native_stride_conv(x, conv, t)
        if x.is_cuda:
            from spconv.cppconstants import CPU_ONLY_BUILD

            if CPU_ONLY_BUILD:
                raise RuntimeError(
                    "the installed spconv is the CPU-only build; for CUDA tensors install the GPU build matching "
                    "your CUDA (e.g. `pip install spconv-cu120`) or use sparse_backend='native'"
                )
        b, n, c = x.shape
        module = self._template(c, conv.out_channels, s, x.device)
        h, w = geometry.shape(t)
        indices = geometry.sparse_indices(t)

        def make_tensor(features):
            return self.spconv.SparseConvTensor(features, indices, [h, w], geometry.batch_size)

        bias = conv.bias if conv.bias is not None else x.new_zeros(conv.out_channels)
        features, out_idx = _SpconvCall.apply(
            x.reshape(b * n, c).contiguous(), self._weight(module, conv), bias, module, make_tensor
        )
        # spconv emits outputs in its own order: put them back in unit-major order
        oh, ow = h // s, w // s
        out_idx = out_idx.long()
        out_keys = (out_idx[:, 0] * oh + out_idx[:, 1]) * ow + out_idx[:, 2]
        lookup = torch.empty(geometry.batch_size * oh * ow, dtype=torch.long, device=x.device)
        lookup[out_keys] = torch.arange(out_keys.numel(), device=x.device)
        order = lookup[geometry.token_keys(t // s)]
        return features.index_select(0, order).view(b, -1, conv.out_channels)


def spconv_available() -> bool:
    try:
        import_spconv()
    except ImportError:
        return False
    return True


def import_spconv():
    """``spconv.pytorch``, or an ImportError naming the package to install."""
    try:
        import spconv.pytorch as spconv
    except ImportError as exc:
        raise ImportError(
            "sparse_backend='spconv' needs the spconv package: `pip install spconv` (CPU build) or the GPU "
            "build for your CUDA, e.g. `pip install spconv-cu120`; or use sparse_backend='native'"
        ) from exc
    return spconv


def get_sparse_backend(name: str = "auto") -> SparseConvBackend:
    """The sparse-conv backend ``name``: ``'auto'`` (= native), ``'spconv'`` or ``'native'``."""
    if name not in SPARSE_BACKENDS:
        raise ValueError(f"sparse_backend must be one of {', '.join(SPARSE_BACKENDS)}, got '{name}'")
    return SpconvBackend() if name == "spconv" else NativeBackend()
