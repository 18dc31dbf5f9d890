"""The priors of model inversion: BatchNorm statistics, total variation, pixel L2 norm.

**BN statistics** (ArcFace TPAMI, section 3.3). A forward hook on every BatchNorm layer
(``BatchNorm1d/2d/3d``) takes the batch statistics of the layer's *input* and compares them with the
layer's running statistics::

    L_bn = sum_i w_i * ( ||mu~_i - mu_i||_2^2 + ||sigma~_i - sigma_i||_2^2 )

``mu~_i`` / ``sigma~_i``: per-channel mean and standard deviation of the input over every axis but
the channels (batch and spatial), the variance biased as BatchNorm normalises with it;
``mu_i`` / ``sigma_i``: ``running_mean`` and ``sqrt(running_var)``. Both standard deviations
include the layer's ``eps`` (``sqrt(var + eps)``, the divisor BatchNorm uses), which keeps the
gradient finite where a channel's batch variance is 0. ``w_i`` is 1, except ``first_weight`` on
the first BatchNorm layer the forward pass reaches (DeepInversion weights it 10x).

**Total variation**: per image, the L2 norm of the differences between vertically and between
horizontally adjacent pixels (summed over the two directions), averaged over the batch.
**L2 norm**: per image, the L2 norm of its pixels, averaged over the batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["BNStatistics", "batchnorm_layers", "bn_distance", "pixel_l2", "total_variation"]


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """``(name, layer)`` of every BatchNorm layer of ``model`` that keeps running statistics."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def bn_layer_loss(x: Tensor, layer: nn.modules.batchnorm._BatchNorm) -> Tensor:
    """``||mu~ - mu||^2 + ||sigma~ - sigma||^2`` of ``layer``'s input ``x`` (see the module)."""
    dims = [d for d in range(x.dim()) if d != 1]
    x = x.float()
    mean = x.mean(dim=dims)
    var = x.var(dim=dims, unbiased=False)
    std = torch.sqrt(var + layer.eps)
    running_std = torch.sqrt(layer.running_var.float() + layer.eps)
    return (mean - layer.running_mean.float()).square().sum() + (std - running_std).square().sum()


class BNStatistics:
    """Hooks on every BatchNorm layer of ``model``; after a forward pass :meth:`loss` is the
    weighted sum of the layers' terms (see the module docstring). Use as a context manager (the
    hooks are removed on exit). ``ValueError`` when ``model`` has no BatchNorm layer."""

    def __init__(self, model: nn.Module, first_weight: float = 1.0, name: str = "model") -> None:
        self.layers = batchnorm_layers(model)
        if not self.layers:
            raise ValueError(
                f"{name} has no BatchNorm layer with running statistics, so the BN prior "
                "(loss.bn_weight) has nothing to match: set loss.bn_weight=0"
            )
        self.first_weight = float(first_weight)
        self._terms: list[Tensor] = []
        self._handles: list[Any] = []

    def __enter__(self) -> BNStatistics:
        self._handles = [layer.register_forward_hook(self._hook) for _, layer in self.layers]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        self._terms.append(bn_layer_loss(inputs[0], layer))  # type: ignore[arg-type]

    def loss(self) -> Tensor:
        """The prior of the last forward pass (first layer reached weighted ``first_weight``);
        clears the recorded terms."""
        if not self._terms:
            raise RuntimeError("no forward pass through the hooked model since the last loss()")
        terms, self._terms = self._terms, []
        total = self.first_weight * terms[0]
        for term in terms[1:]:
            total = total + term
        return total


def total_variation(x: Tensor) -> Tensor:
    """Batch mean of ``||x[h+1] - x[h]||_2 + ||x[w+1] - x[w]||_2`` (``x``: N x C x H x W)."""
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).flatten(1)
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).flatten(1)
    return (dh.norm(dim=1) + dw.norm(dim=1)).mean()


def pixel_l2(x: Tensor) -> Tensor:
    """Mean over the batch of each image's pixel L2 norm."""
    return x.flatten(1).norm(dim=1).mean()


def bn_distance(model: nn.Module, images: Tensor) -> float:
    """The BN-statistics term (every layer weighted 1) of a batch of ``images`` (``N x 3 x H x W``
    in ``[-1, 1]``) under ``model`` in eval mode: how far the batch's statistics are from those the
    model saw in training (lower: more natural to the model)."""
    with torch.no_grad(), BNStatistics(model) as prior:
        model(images)
        return float(prior.loss())
