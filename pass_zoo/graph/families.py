"""Per-family knowledge the generic adapter cannot trace: multi-head attention, norms whose
statistics span the channels, and modules that store the sizes of the splits they make.

Torch-Pruning's dependency graph couples an attention block's ``qkv`` rows with the ``proj``
columns that read them, but it knows nothing about *heads*: after pruning, the module's
``num_heads`` (and friends) still describe the dense shape, and per-head parameters such as Swin's
relative position bias table are either left alone or cut along the wrong axis (Torch-Pruning
issue #490). Each attention module type the adapter can prune registers one ``AttentionFamily``
here, in the timm style (a registry keyed by module type, not if-chains over model names):

* the head layout of its ``qkv`` rows (``[3, heads, head_dim]`` for every type registered here);
* its per-head parameters, which Torch-Pruning must leave alone and the family slices itself;
* ``set_heads`` -- the fix applied after Torch-Pruning removed some heads' rows and columns, both
  when slimming and when an export replays the pruning history on a fresh model;
* the attention matmul MACs (``q @ k^T`` and ``attn @ v``), which ``count_macs`` and the layer
  sequence count on top of conv/linear MACs.

A head is one unit: its q, k and v rows of ``qkv`` and its ``head_dim`` columns of ``proj``. The
search-time gate multiplies ``proj``'s input (the concatenated per-head attention outputs) by the
head mask. Heads do not interact before ``proj``, so zeroing a head's slice there is exactly
removing the head; ``head_dim`` and the softmax scale are unchanged by head pruning.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Type

import torch
import torch.nn as nn
from timm.layers.attention import Attention
from timm.layers.blur_pool import BlurPool2d
from timm.layers.grn import GlobalResponseNorm
from timm.layers.mixed_conv2d import MixedConv2d
from timm.layers.norm import RmsNorm2d, RmsNorm2dFp32
from timm.layers.selective_kernel import SelectiveKernel
from timm.models.mambaout import GatedConvBlock
from timm.models.swin_transformer import WindowAttention

from ..errors import AdapterError

ATTENTION_FAMILIES: Dict[Type[nn.Module], "AttentionFamily"] = {}
_BY_NAME: Dict[str, "AttentionFamily"] = {}


def register_attention(module_type: Type[nn.Module]):
    """Class decorator: ``@register_attention(timm.layers.Attention)`` registers a family instance."""
    def wrap(cls):
        family = cls(module_type)
        ATTENTION_FAMILIES[module_type] = family
        _BY_NAME[family.name] = family
        return cls
    return wrap


def _lookup(registry: Dict[Type[nn.Module], object], module: nn.Module):
    """``module``'s entry in a type registry: its exact type first, then its bases; None if absent."""
    for cls in type(module).__mro__:
        if cls in registry:
            return registry[cls]
    return None


def attention_family(module: nn.Module) -> Optional["AttentionFamily"]:
    """The family of ``module`` (exact type first, then its bases), or None if it is not attention."""
    return _lookup(ATTENTION_FAMILIES, module)


def family_by_name(name: str) -> "AttentionFamily":
    """The family a slim spec's fixup names; ``KeyError`` if this pass-zoo does not know it."""
    return _BY_NAME[name]


def attention_modules(model: nn.Module):
    """``(name, module, family)`` for every registered attention module of ``model``."""
    for name, mod in model.named_modules():
        fam = attention_family(mod)
        if fam is not None:
            yield name, mod, fam


class AttentionFamily:
    """One attention module type: ``qkv`` (Linear, rows ``[3, heads, head_dim]``) -> heads -> ``proj``."""

    name = "attention"
    qkv_attr, proj_attr = "qkv", "proj"

    def __init__(self, module_type: Type[nn.Module]):
        self.module_type = module_type

    # ---- shape
    def qkv(self, mod: nn.Module) -> nn.Linear:
        return getattr(mod, self.qkv_attr)

    def proj(self, mod: nn.Module) -> nn.Linear:
        return getattr(mod, self.proj_attr)

    def heads(self, mod: nn.Module) -> int:
        return int(mod.num_heads)

    def head_dim(self, mod: nn.Module) -> int:
        return self.qkv(mod).out_features // (3 * self.heads(mod))

    def head_of_qkv_row(self, mod: nn.Module) -> torch.Tensor:
        """Head index of every ``qkv`` output row (q, k and v rows of a head share it)."""
        attn_dim = self.heads(mod) * self.head_dim(mod)
        return (torch.arange(3 * attn_dim) % attn_dim) // self.head_dim(mod)

    def per_head_params(self, mod: nn.Module) -> List[nn.Parameter]:
        """Parameters with a head axis, sliced by ``set_heads`` (Torch-Pruning must not touch them)."""
        return []

    def check(self, mod: nn.Module) -> Optional[str]:
        """Why this module's heads cannot be pruned exactly (None: they can)."""
        qkv, proj = getattr(mod, self.qkv_attr, None), getattr(mod, self.proj_attr, None)
        if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear):
            return "qkv/proj are not Linear layers"
        if qkv.out_features % (3 * self.heads(mod)):
            return f"qkv has {qkv.out_features} rows, not 3 x {self.heads(mod)} heads"
        return None

    # ---- pruning
    def set_heads(self, mod: nn.Module, kept: Sequence[int], head_dim: int) -> None:
        """After Torch-Pruning removed the other heads' qkv rows / proj columns: fix the module.

        ``kept``: indices of the kept heads, in the module's head numbering before the fix;
        ``head_dim``: unchanged by head pruning, passed in because a half-fixed module cannot tell.
        """
        kept = [int(k) for k in kept]
        heads_now = self.qkv(mod).out_features // (3 * head_dim)
        if heads_now != len(kept) or self.proj(mod).in_features != len(kept) * head_dim:
            raise AdapterError(f"{type(mod).__name__}: qkv/proj have {heads_now} heads after pruning, "
                               f"the fixup keeps {len(kept)}")
        index = torch.as_tensor(kept, dtype=torch.long)
        for pname, axis in self._per_head_axes(mod):
            p = getattr(mod, pname)
            setattr(mod, pname, nn.Parameter(p.detach().index_select(axis, index.to(p.device)).clone(),
                                             requires_grad=p.requires_grad))
        self._set_head_count(mod, len(kept), head_dim)

    def _per_head_axes(self, mod: nn.Module):
        return []

    def _set_head_count(self, mod: nn.Module, heads: int, head_dim: int) -> None:
        mod.num_heads = heads

    # ---- cost
    def matmul_macs(self, mod: nn.Module, x: torch.Tensor) -> int:
        """MACs of ``q @ k^T`` and ``attn @ v`` for input ``x`` of shape (batch*windows, tokens, dim)."""
        n_seq, tokens = int(x.shape[0]), int(x.shape[1])
        return 2 * n_seq * tokens * tokens * self.heads(mod) * self.head_dim(mod)


@register_attention(Attention)
class TimmAttention(AttentionFamily):
    """``timm.layers.Attention``: ViT, DeiT and most plain transformer blocks in timm."""

    name = "timm.layers.Attention"

    def head_dim(self, mod):
        return int(mod.head_dim)

    def check(self, mod):
        reason = super().check(mod)
        if reason:
            return reason
        if getattr(mod, "gate", None) is not None:
            return "gated attention output (a second per-head projection) is not supported"
        return None

    def _set_head_count(self, mod, heads, head_dim):
        mod.num_heads = heads
        mod.attn_dim = heads * head_dim  # the forward reshapes the heads' output to attn_dim


@register_attention(WindowAttention)
class SwinWindowAttention(AttentionFamily):
    """``timm.models.swin_transformer.WindowAttention``: one relative position bias column per head."""

    name = "timm.swin.WindowAttention"

    def per_head_params(self, mod):
        return [mod.relative_position_bias_table]

    def _per_head_axes(self, mod):
        return [("relative_position_bias_table", 1)]  # ((2Wh-1)(2Ww-1), heads)


# ------------------------------------------------------------------------------ channel norms
CHANNEL_NORMS: Dict[Type[nn.Module], "ChannelNormFamily"] = {}


def register_channel_norm(module_type: Type[nn.Module]):
    """Class decorator: a norm with per-channel parameters whose statistics span the channels."""
    def wrap(cls):
        CHANNEL_NORMS[module_type] = cls(module_type)
        return cls
    return wrap


def channel_norm_family(module: nn.Module) -> Optional["ChannelNormFamily"]:
    return _lookup(CHANNEL_NORMS, module)


class ChannelNormFamily:
    """A norm that mixes statistics across channels but can still be pruned exactly.

    Its per-channel parameters are sliced by Torch-Pruning like any unwrapped parameter. A zeroed
    input channel is not a removed one (it still counts in the cross-channel statistic), so the
    search-time gate replaces the module's output with what the slimmed module computes: the
    cross-channel statistic over the kept channels only (``gated_forward``). The consumers' input
    gates then zero the dropped channels as usual.
    """

    def __init__(self, module_type: Type[nn.Module]):
        self.module_type = module_type

    def per_channel_params(self, mod: nn.Module) -> List[nn.Parameter]:
        raise NotImplementedError

    def gated_forward(self, mod: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The module's output for the channels ``keep`` (0/1, or soft during the search) keeps."""
        raise NotImplementedError


@register_channel_norm(GlobalResponseNorm)
class GlobalResponseNormFamily(ChannelNormFamily):
    """ConvNeXt-V2's GRN: ``x + b + g * x * n(x)``, ``n`` = each channel's spatial L2 norm divided by
    the mean of those norms over the channels -- the mean the slimmed module takes over fewer channels."""

    def per_channel_params(self, mod):
        return [mod.weight, mod.bias]

    def gated_forward(self, mod, x, keep):
        shape = [1] * x.dim()
        shape[mod.channel_dim] = -1
        keep = keep.to(x.dtype).view(shape)
        x_g = x.norm(p=2, dim=mod.spatial_dim, keepdim=True)
        mean = (x_g * keep).sum(dim=mod.channel_dim, keepdim=True) / keep.sum().clamp_min(1e-12)
        return x + torch.addcmul(mod.bias.view(mod.wb_shape), mod.weight.view(mod.wb_shape), x * (x_g / (mean + mod.eps)))


@register_channel_norm(RmsNorm2d)
class RmsNorm2dFamily(ChannelNormFamily):
    """RMS norm over the channels of an NCHW map (MobileNetV5), with or without an activation after it
    (``RmsNormAct2d``): the mean of squares the slimmed module takes over fewer channels."""

    compute_dtype = None  # the input's

    def per_channel_params(self, mod):
        return [mod.weight]

    def gated_forward(self, mod, x, keep):
        dtype = x.dtype
        x = x.to(self.compute_dtype or dtype)
        keep = keep.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2)))
        mean_square = (x.pow(2) * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1e-12)
        y = (x * torch.rsqrt(mean_square + mod.eps) * mod.weight.to(x.dtype).view_as(keep)).to(dtype)
        return mod.act(mod.drop(y)) if hasattr(mod, "act") else y


@register_channel_norm(RmsNorm2dFp32)
class RmsNorm2dFp32Family(RmsNorm2dFamily):
    """The same, computed in float32 whatever the input's dtype."""

    compute_dtype = torch.float32


# ---- stored split sizes
# A module that splits its input by sizes it stored at construction (``torch.split(x, self.splits)``)
# breaks once slimming narrows the parts: Torch-Pruning prunes the layers on either side of the split
# and keeps its own record of the part sizes, but not the module's. Each such type registers a fix
# that re-reads the sizes from its slimmed layers; it runs after every pruning step and after an
# export replays the pruning history, so nothing about it needs to be stored.
SPLIT_SIZE_FIXES: Dict[Type[nn.Module], Callable[[nn.Module], None]] = {}
# types whose split makes equal parts from one stored size: a channel is pruned at the same place in
# every part (SKNet's paths), so the parts stay equal
EQUAL_PARTS: set = set()


def register_split_sizes(module_type: Type[nn.Module], equal_parts: bool = False):
    """Function decorator: ``fix(module)`` rewrites the split sizes a ``module_type`` stores."""
    def wrap(fix):
        SPLIT_SIZE_FIXES[module_type] = fix
        if equal_parts:
            EQUAL_PARTS.add(module_type)
        return fix
    return wrap


def stores_split_sizes(module: nn.Module) -> bool:
    return _lookup(SPLIT_SIZE_FIXES, module) is not None


def splits_equal_parts(module: nn.Module) -> bool:
    return any(isinstance(module, t) for t in EQUAL_PARTS)


def fix_split_sizes(model: nn.Module) -> None:
    """Re-read every registered module's stored split sizes from its (possibly slimmed) layers."""
    for mod in model.modules():
        fix = _lookup(SPLIT_SIZE_FIXES, mod)
        if fix is not None:
            fix(mod)


@register_split_sizes(MixedConv2d)
def _fix_mixed_conv2d(mod: nn.Module) -> None:
    """MixNet's mixed-kernel conv: one conv per part of the input channels, outputs concatenated."""
    convs = list(mod.values())
    mod.splits = [c.in_channels for c in convs]
    mod.in_channels, mod.out_channels = sum(mod.splits), sum(c.out_channels for c in convs)


@register_split_sizes(GatedConvBlock)
def _fix_gated_conv_block(mod: nn.Module) -> None:
    """MambaOut's block: ``fc1`` -> (gate, identity part, conv part); the gate multiplies the
    concatenated identity and conv parts channel by channel, so it is as wide as ``fc2``'s input."""
    hidden, conv = mod.fc2.in_features, mod.conv.out_channels
    mod.split_indices = (hidden, hidden - conv, conv)


@register_split_sizes(SelectiveKernel, equal_parts=True)
def _fix_selective_kernel(mod: nn.Module) -> None:
    """SKNet's selective kernel: ``split(x, in_channels // paths)``, one conv path per part."""
    if mod.split_input:
        mod.in_channels = sum(path.conv.in_channels for path in mod.paths)


@register_split_sizes(BlurPool2d)
def _fix_blur_pool2d(mod: nn.Module) -> None:
    """Anti-aliased downsampling (TResNet, and ``aa_layer=`` in many timm CNNs): a depthwise blur whose
    filter is stored once per channel. Every channel has the same filter, so the module takes the width
    of its input instead (timm's own ``channels=None`` mode)."""
    if mod.channels is not None:
        mod.channels, mod.filt = None, mod.filt[:1].clone()
