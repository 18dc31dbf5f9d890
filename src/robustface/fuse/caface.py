"""CAFace: cluster-and-aggregate feature fusion (Kim et al., NeurIPS 2022, ``mk-minchul/caface``).

:class:`CAFace` is the published aggregator (config ``catv9_g4_conf512_small``, 786,524
parameters), with module names that give the released checkpoint's state-dict keys:

- **Style Input Maker** (``style_maker``): per image, ``z_c = sum_k style[c, k] * cfc[c, k]`` over
  the (mean, std) style of 384 backbone channels, PReLU (one slope), Linear 384->64, BN1d(64).
  ``cfc`` and ``cfcs.0`` are the same tensor (both keys are in the state dict).
- **Norm embedding** (``norm_emb``): BN1d(1, affine=False) of the feature norms, clipped to
  [-3, 3], times 10, truncated toward 0 (``.long()``), +30, a row of a 61x64 sinusoid table, times
  a learnable ``scale``. The network input is ``cat[style64, normemb64]``.
- **Cluster Network** (``fusion_net.clustering_layer``): 2 pre-LN ViT blocks over the images and
  4 group tokens; the updated tokens are discarded. One-head assignment attention, softmax over
  the clusters, ``A_norm = A / clip(sum_n A, 1).detach()``; cluster features ``A_norm @ unit``
  and cluster styles ``A_norm @ LN(x)``.
- **Aggregation Network** (``fusion_net.conf_mlp``): 2 MixerBlocks (one LayerNorm each, used
  before both mixings; gate on the token skip) and an Mlp 256->256->512; softmax over the
  clusters per channel; ``fused = sum_m w_m * mu_m`` (not normalised: callers L2-normalise).
- **Per-frame weights** (for plots, as the official demo): ``sum_m A[m,n] / S_m * mean_c w_m``
  with ``S_m`` the cluster's soft count over the whole set and ``w`` the final (last chunk's)
  aggregation weights; they sum to 1.

**Sequential memory** (:meth:`CAFace.fuse_sequential`): the set is cut into near-equal
``array_split`` parts of at most ``chunk_size`` images, processed one by one; the running cluster
features and styles are ``Fbar_t = (S_{t-1} Fbar_{t-1} + C_t F_t) / clip(S_{t-1} + C_t, 1e-6)``
with ``S_t = S_{t-1} + C_t`` and ``C_t = sum_n A`` (before the division). The memory is detached
in eval mode and kept in the graph in training. The result does not depend on the order of the
chunks, but it does depend on how the set is chunked (attention mixes images within a chunk).

Deliberate deviations from the official code:

- A frame with a non-finite feature or style, or a zero feature, raises ``ValueError``
  (upstream drops NaN frames per chunk, and only when the set is longer than a chunk; elsewhere
  they poison the result).
- The per-frame weights divide by ``clip(S_m, 1e-12)`` (upstream by ``S_m``: 0/0 if a cluster's
  soft count underflows to 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robustface.errors import DataFormatError
from robustface.fuse.base import AGGREGATORS, Aggregator, FusionMemory
from robustface.models.loading import load_weights
from robustface.utils.guards import check_int

__all__ = [
    "CAFace",
    "CAFaceAggregator",
    "CAFaceCheckpoint",
    "CAFaceMemory",
    "CAFaceOutput",
    "load_caface_checkpoint",
]

FEATURE_DIM = 512
STYLE_CHANNELS = 384  # body[15] (128 ch) + body[45] (256 ch) of IR-101
STYLE_DIM = 64
NORM_DIM = 64
EMBED_DIM = STYLE_DIM + NORM_DIM
NUM_CLUSTERS = 4
DEPTH = 2
NUM_HEADS = 8
DROP_PATH_RATE = 0.1
NORM_CLIP = 3
NORM_MULTI = 10


class StyleInputMaker(nn.Module):
    """Per-image style code: channel-wise weighted (mean, std) -> PReLU -> Linear -> BN1d."""

    def __init__(self, channels: int = STYLE_CHANNELS, out_dim: int = STYLE_DIM) -> None:
        super().__init__()
        self.cfcs = nn.ParameterList([nn.Parameter(torch.zeros(channels, 2))])
        self.cfc = self.cfcs[0]  # the same tensor under the released key ``cfc`` too
        self.relu = nn.PReLU()
        self.linear = nn.Linear(channels, out_dim)
        self.bn = nn.BatchNorm1d(out_dim)

    def forward(self, style: torch.Tensor) -> torch.Tensor:
        """(N, channels, 2) -> (N, out_dim)."""
        return self.bn(self.linear(self.relu((style * self.cfc).sum(-1))))


class NormEmbedding(nn.Module):
    """Sinusoid embedding of the batch-normalised, clipped and bucketed feature norm."""

    def __init__(self, dim: int = NORM_DIM) -> None:
        super().__init__()
        self.norm_bn = nn.BatchNorm1d(1, affine=False)
        rows = 2 * NORM_CLIP * NORM_MULTI + 1
        position = torch.arange(rows, dtype=torch.float32).unsqueeze(1)
        div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
        pe = torch.zeros(rows, dim)
        pe[:, 0::2] = torch.sin(position * div)
        pe[:, 1::2] = torch.cos(position * div)
        self.register_buffer("pe", pe)
        self.scale = nn.Parameter(torch.tensor(0.1))

    def forward(self, norms: torch.Tensor) -> torch.Tensor:
        """(B, T, 1) norms -> (B, T, dim); the BN statistics are over all B*T norms."""
        z = self.norm_bn(norms.transpose(1, 2)).transpose(1, 2)
        z = torch.clip(z, -NORM_CLIP, NORM_CLIP) * NORM_MULTI
        index = z.long() + NORM_CLIP * NORM_MULTI  # truncation toward 0, as upstream
        return self.scale * self.pe[index.squeeze(-1)]


def _drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class _Mlp(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class _AttnBlock(nn.Module):
    def __init__(self, dim: int, heads: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, 4 * dim, dim)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + _drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + _drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class _Assign(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)


class _ClusterBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm_tokens = nn.LayerNorm(dim)
        self.norm_x = nn.LayerNorm(dim)
        self.assign = _Assign(dim)


class ClusterNetwork(nn.Module):
    """Group tokens + ViT blocks + assignment attention (module ``clustering_layer``)."""

    def __init__(self, dim: int = EMBED_DIM, clusters: int = NUM_CLUSTERS) -> None:
        super().__init__()
        tokens = torch.randn(clusters, dim)
        nn.init.orthogonal_(tokens)
        self.group_token = nn.Parameter((tokens / tokens.norm(dim=-1, keepdim=True)).unsqueeze(0))
        rates = torch.linspace(0, DROP_PATH_RATE, DEPTH).tolist()
        self.blocks = nn.ModuleList(_AttnBlock(dim, NUM_HEADS, rate) for rate in rates)
        self.cluster_block = _ClusterBlock(dim)

    def forward(
        self, x: torch.Tensor, unit: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (cluster features (B,M,512), group tokens (B,M,C), A (B,M,T) softmax over M,
        cluster styles (B,M,C))."""
        b, t, _ = x.shape
        tokens = self.group_token.expand(b, -1, -1)
        h = torch.cat([x, tokens], dim=1)
        for block in self.blocks:
            h = block(h)
        h = h[:, :t]  # the updated group tokens are discarded
        cb = self.cluster_block
        key = cb.norm_x(h)
        q = cb.assign.q_proj(cb.norm_tokens(tokens))
        k = cb.assign.k_proj(key)
        attn = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=1)
        normed = attn / torch.clip(attn.sum(-1, keepdim=True), min=1.0).detach()
        return normed @ unit, tokens, attn, normed @ key


class MixerBlock(nn.Module):
    """MLP-Mixer block with one LayerNorm (used before both mixings) and a gated token skip."""

    def __init__(self, tokens: int, channels: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(channels)
        self.tokens_mlp_block = _Mlp(tokens, 2 * tokens, tokens)
        self.channels_mlp_block = _Mlp(channels, channels // 2, channels)
        self.skip_connect_gate = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tokens_mlp_block(self.ln(x).transpose(1, 2)).transpose(1, 2)
        out = x * self.skip_connect_gate + y
        return out + self.channels_mlp_block(self.ln(out))


class FusionNet(nn.Module):
    """Cluster Network + Aggregation Network (``clustering_layer`` + ``conf_mlp``); the
    aggregation weights have one channel per feature dimension."""

    def __init__(self, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        self.clustering_layer = ClusterNetwork()
        width = 2 * EMBED_DIM
        self.conf_mlp = nn.Sequential(
            *(MixerBlock(NUM_CLUSTERS, width) for _ in range(DEPTH)),
            _Mlp(width, width, feature_dim),
        )
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)


@dataclass
class CAFaceMemory:
    """Running cluster features (B,M,512), cluster styles (B,M,C) and soft counts (B,M,1)."""

    features: torch.Tensor
    styles: torch.Tensor
    counts: torch.Tensor


@dataclass
class CAFaceOutput:
    """One forward pass: ``fused`` (B,512, not normalised), ``frame_weights`` (B,T: this chunk's
    frames over the soft counts so far), the cluster ``weights`` (B,M,512), the assignment
    ``assign`` (B,M,T, softmax over M) and the updated memory."""

    fused: torch.Tensor
    frame_weights: torch.Tensor
    weights: torch.Tensor
    assign: torch.Tensor
    memory: CAFaceMemory


def _frame_weights(
    assign: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Per-frame weight for plots, as the official demo: ``sum_m A[m,n] / S_m * mean_c w[m,c]``
    with ``S_m`` the soft count of cluster m over all frames so far; the weights sum to 1."""
    influence = assign / torch.clip(counts, min=1e-12)
    return (influence * weights.mean(-1, keepdim=True)).sum(1)


def _running_mean(
    prev: torch.Tensor, prev_count: torch.Tensor, new: torch.Tensor, new_count: torch.Tensor
) -> torch.Tensor:
    return (prev_count * prev + new_count * new) / torch.clip(prev_count + new_count, min=1e-6)


class CAFace(nn.Module):
    """The CAFace aggregator (published config ``catv9_g4_conf512_small``).

    ``style_channels``: the channels of the per-image styles, 384 as published (IR-101's blocks
    15 and 45); a smaller backbone's blocks give fewer (see :mod:`robustface.fuse.styles`).
    ``feature_dim``: the backbone's feature dimension, 512 as published (only the last Linear of
    the aggregation network depends on it)."""

    def __init__(
        self, style_channels: int = STYLE_CHANNELS, feature_dim: int = FEATURE_DIM
    ) -> None:
        super().__init__()
        self.style_channels = check_int("style_channels", style_channels, minimum=1)
        self.feature_dim = check_int("feature_dim", feature_dim, minimum=1)
        self.style_maker = StyleInputMaker(self.style_channels)
        self.fusion_net = FusionNet(self.feature_dim)
        self.norm_emb = NormEmbedding()

    def _check(self, features: torch.Tensor, styles: torch.Tensor | None) -> None:
        if features.ndim != 3 or features.shape[-1] != self.feature_dim:
            raise ValueError(
                f"features: expected shape (sets, images, {self.feature_dim}), "
                f"got {tuple(features.shape)}"
            )
        if features.shape[1] == 0:
            raise ValueError("features: a set has no images (empty set)")
        if styles is None:
            raise ValueError(
                "styles: CAFace needs the per-image styles (sets, images, "
                f"{self.style_channels}, 2); got None"
            )
        expected = (*features.shape[:2], self.style_channels, 2)
        if tuple(styles.shape) != expected:
            raise ValueError(f"styles: expected shape {expected}, got {tuple(styles.shape)}")
        for name, tensor in (("features", features), ("styles", styles)):
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{name}: contains NaN or infinite values")
        zero = (features.norm(dim=-1) == 0).nonzero()
        if len(zero):
            set_index, frame = zero[0].tolist()
            raise ValueError(f"features: set {set_index}, image {frame} has a zero-norm feature")

    def forward(
        self,
        features: torch.Tensor,
        styles: torch.Tensor | None,
        memory: CAFaceMemory | None = None,
    ) -> CAFaceOutput:
        """Fuse ``features`` (B,T,d: ``f*|f|``, the unit feature times its norm) with ``styles``
        (B,T,C,2), updating ``memory`` (the previous chunks' state) when given."""
        self._check(features, styles)
        b, t, _ = features.shape
        norm = features.norm(dim=-1, keepdim=True)
        unit = features / (norm + 1e-5)
        style = self.style_maker(styles.reshape(b * t, self.style_channels, 2)).reshape(b, t, -1)
        x = torch.cat([style, self.norm_emb(norm)], dim=-1)
        mu, tokens, attn, cluster_style = self.fusion_net.clustering_layer(x, unit)
        counts = attn.sum(-1, keepdim=True)
        if memory is not None:
            mu = _running_mean(memory.features, memory.counts, mu, counts)
            cluster_style = _running_mean(memory.styles, memory.counts, cluster_style, counts)
            counts = counts + memory.counts
        weights = self.fusion_net.conf_mlp(torch.cat([tokens, cluster_style], dim=-1))
        weights = weights.softmax(dim=1)
        frame_weights = _frame_weights(attn, counts, weights)
        new_memory = CAFaceMemory(mu, cluster_style, counts)
        if not self.training:
            new_memory = CAFaceMemory(mu.detach(), cluster_style.detach(), counts.detach())
        return CAFaceOutput((mu * weights).sum(1), frame_weights, weights, attn, new_memory)

    def fuse_sequential(
        self, features: torch.Tensor, styles: torch.Tensor | None, chunk_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse sets of T images chunk by chunk with the memory: ``ceil(T / chunk_size)``
        near-equal parts (T=75, size 8: 8,8,8,8,8,7,7,7,7,7). Activations are held for one chunk
        at a time. Returns (fused (B,512), per-frame weights (B,T): every frame's assignment over
        the total soft counts, with the last chunk's aggregation weights, as the official demo)."""
        chunk_size = check_int("chunk_size", chunk_size, minimum=1)
        self._check(features, styles)
        t = features.shape[1]
        parts = np.array_split(np.arange(t), math.ceil(t / chunk_size))
        memory: CAFaceMemory | None = None
        assign = []
        for part in parts:
            start, stop = int(part[0]), int(part[-1]) + 1
            out = self(features[:, start:stop], styles[:, start:stop], memory)
            memory = out.memory
            # in eval nothing of a finished chunk stays in the graph: memory constant in T
            assign.append(out.assign if self.training else out.assign.detach())
        frames = _frame_weights(torch.cat(assign, dim=-1), out.memory.counts, out.weights)
        return out.fused, frames


@dataclass
class CAFaceCheckpoint:
    """A released CAFace Lightning checkpoint: the aggregator (eval mode), the backbone's state
    dict (``model.`` prefix removed), the class centers (or ``None``) and the hyper-parameters."""

    aggregator: CAFace
    backbone_state_dict: dict[str, torch.Tensor]
    centers: torch.Tensor | None
    hyper_parameters: dict[str, Any]


def _sizes_from_state(agg: Mapping[str, Any]) -> tuple[int, int]:
    """``(style_channels, feature_dim)`` of an aggregator state dict, read from the shapes of
    ``style_maker.cfc`` and the last Linear's bias (the published 384 and 512 where those are
    absent or not tensors: the key and shape checks then name them)."""
    cfc, bias = agg.get("style_maker.cfc"), agg.get("fusion_net.conf_mlp.2.fc2.bias")
    channels = cfc.shape[0] if isinstance(cfc, torch.Tensor) and cfc.ndim == 2 else STYLE_CHANNELS
    dim = bias.shape[0] if isinstance(bias, torch.Tensor) and bias.ndim == 1 else FEATURE_DIM
    return max(int(channels), 1), max(int(dim), 1)


def load_caface_checkpoint(
    path: str | Path, *, unsafe_legacy_load: bool = False
) -> CAFaceCheckpoint:
    """Read a CAFace ``.ckpt`` (``state_dict`` with ``model.*``, ``aggregator.*``,
    ``center.weight``; ``hyper_parameters``) weights-only. The style channel count and the
    feature dimension are read from the tensors' shapes (the released file: 384 and 512; one
    written by :func:`robustface.fuse.training.train_caface`: its backbone's). Missing or
    unexpected aggregator keys and wrong shapes raise :class:`DataFormatError` naming the file
    and the keys."""
    obj = load_weights(path, unsafe_legacy_load=unsafe_legacy_load)
    if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping):
        raise DataFormatError(path, "not a CAFace checkpoint: no 'state_dict' mapping")
    state = obj["state_dict"]
    agg = {k[len("aggregator.") :]: v for k, v in state.items() if k.startswith("aggregator.")}
    if not agg:
        raise DataFormatError(path, "not a CAFace checkpoint: no 'aggregator.*' keys")
    aggregator = CAFace(*_sizes_from_state(agg))
    expected = aggregator.state_dict()
    missing = sorted(set(expected) - set(agg))
    unexpected = sorted(set(agg) - set(expected))
    if missing or unexpected:
        raise DataFormatError(
            path,
            f"aggregator keys do not match CAFace: missing {missing}, unexpected {unexpected}",
        )
    wrong = [
        f"{k} {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__} "
        f"(expected {tuple(expected[k].shape)})"
        for k, v in agg.items()
        if not isinstance(v, torch.Tensor) or v.shape != expected[k].shape
    ]
    if wrong:
        raise DataFormatError(path, f"aggregator tensors with wrong shapes: {', '.join(wrong)}")
    aggregator.load_state_dict(agg)
    aggregator.eval()
    backbone = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    hyper = obj.get("hyper_parameters") or {}
    # an argparse.Namespace (older Lightning) loads only with unsafe_legacy_load
    hyper = dict(hyper) if isinstance(hyper, Mapping) else dict(vars(hyper))
    return CAFaceCheckpoint(aggregator, backbone, state.get("center.weight"), hyper)


@AGGREGATORS.register("caface")
class CAFaceAggregator(Aggregator):
    """CAFace behind the :class:`~robustface.fuse.base.Aggregator` interface.

    ``model`` is a :class:`CAFace` network or the path of a released checkpoint (read by
    :func:`load_caface_checkpoint`). :meth:`fuse` runs the whole set in chunks of ``chunk_size``
    (near-equal parts, as :meth:`CAFace.fuse_sequential`; the official demo uses 512); a
    :meth:`memory` takes chunks as they come. Styles are per image, ``(n, C, 2)``
    (``C = model.style_channels``, 384 as published); features ``(n, model.feature_dim)``.
    """

    needs_styles = True

    def __init__(
        self,
        model: CAFace | str | Path,
        *,
        chunk_size: int = 512,
        unsafe_legacy_load: bool = False,
    ) -> None:
        if isinstance(model, (str, Path)):
            model = load_caface_checkpoint(model, unsafe_legacy_load=unsafe_legacy_load).aggregator
        if not isinstance(model, CAFace):
            raise TypeError(f"model must be a CAFace or a checkpoint path, got {type(model)}")
        super().__init__(dim=model.feature_dim)
        self.model = model.eval()
        self.chunk_size = check_int("chunk_size", chunk_size, minimum=1)

    def memory(self) -> _CAFaceFusionMemory:
        return _CAFaceFusionMemory(self)

    @torch.inference_mode()
    def fuse(self, features: Any, styles: Any = None) -> torch.Tensor:
        x, s = self.check(features, styles)
        fused, _ = self.model.fuse_sequential(x[None], s[None], self.chunk_size)
        return F.normalize(fused[0], dim=0)


class _CAFaceFusionMemory(FusionMemory):
    """CAFace's running cluster features, styles and soft counts over the chunks given so far."""

    aggregator: CAFaceAggregator

    def __init__(self, aggregator: CAFaceAggregator) -> None:
        super().__init__(aggregator)
        self.state: CAFaceMemory | None = None
        self.fused: torch.Tensor | None = None

    @torch.inference_mode()
    def _update(self, features: torch.Tensor, styles: torch.Tensor | None) -> None:
        out = self.aggregator.model(features[None], styles[None], self.state)
        self.state, self.fused = out.memory, out.fused[0]

    def result(self) -> torch.Tensor:
        self._check_not_empty()
        assert self.fused is not None  # set by the first update
        return F.normalize(self.fused, dim=0)
