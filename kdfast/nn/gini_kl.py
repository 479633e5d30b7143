"""The discriminability-enforcing loss (arXiv 2202.07073) as a module: lambda_gini * gini + lambda_kl * kl."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kdfast.ops import _validate
from kdfast.ops.gini_kl import TARGETS, gini_kl, gini_kl_from_statistics, gini_kl_statistics


class GiniKLLoss(nn.Module):
    """``lambda_gini * gini + lambda_kl * kl`` of one or several layers' activations (design 3.4; kdfast.ops.gini_kl).

    Add it to the classification loss: ``loss = cross_entropy + GiniKLLoss(C)(features, labels)``. The features
    can be any layer's output, e.g. caught with a forward hook::

        criterion = GiniKLLoss(num_classes=100, warmup_steps=1000)
        features = {}
        model.layer4.register_forward_hook(lambda module, args, output: features.update(layer4=output))
        logits = model(images)
        loss = F.cross_entropy(logits, labels) + criterion(features["layer4"], labels)
        loss.backward()
        log(gini=criterion.gini, kl=criterion.kl)

    Several layers: pass a list, ``criterion([features["layer3"], features["layer4"]], labels)``. Each layer's gini
    and kl are computed on its own (its own features, the same labels) and each term is averaged over the layers,
    as the paper's code does: ``gini = mean_l gini_l``, ``kl = mean_l kl_l``.

    Soft labels (mixup, CutMix, label smoothing): pass ``labels`` as (B, C) probabilities instead of (B,) class
    ids. The class statistics are then weighted by them, exactly: with ``m[b, f]`` the pooled ``|a|``,
    ``n_c = sum_b w[b, c]`` and ``S[f, c] = sum_b w[b, c] m[b, f] / (n_c + delta)``; a class is absent when its
    weight ``n_c`` is exactly 0. One-hot rows give the integer-label loss. The labels are targets: no gradient
    flows into them (they are detached).

    Args:
        num_classes: C >= 1.
        lambda_gini, lambda_kl: weights of the two terms (the paper: 0.5 and 0.5).
        target: the KL target distribution t: ``batch`` (the batch's label distribution,
            ``t_c = n_c / sum_c' n_c'``, i.e. ``n_c / B``), ``uniform`` (1/C), or a (C,) tensor (or sequence) of
            non-negative finite numbers summing to 1, e.g. the training set's class frequencies. It is kept as
            the non-persistent buffer ``target_distribution`` (moved by ``.to()``, not in the state_dict).
            Classes with ``t_c = 0`` contribute 0 to kl.
        warmup_steps: training-mode calls during which the loss is 0 (the paper switches it on after a warm-up).
            The calls are counted in the buffer ``steps``, so a checkpoint's state_dict resumes the count.
            Eval-mode calls neither count nor are switched off.
        sync_ddp: under torch.distributed, sum the per-class statistics of every rank (all-reduce, with
            autograd) so that the loss is the loss of the global batch. The activation gradients then suit
            DistributedDataParallel: each rank's backward returns world_size times the global loss's
            gradient with respect to its activations, and DDP's averaging of the parameter gradients over the
            ranks gives exactly the single-process gradient of the global batch (whatever the per-rank batch
            sizes). Without an initialised process group it computes on the local batch.
        process_group: the group to all-reduce over (None: the default group).
        delta: the paper's stabiliser (1e-10). backend: as in kdfast.ops (None: ``KDFAST_BACKEND``, default auto).

    Shapes: activations (B, F, H, W) or (B, F), or a non-empty list of such tensors (one per layer; same B, any
    F, H, W each); labels (B,) integer class ids or (B, C) soft labels (floating, non-negative, each row summing
    to 1) -> a scalar in the activations' dtype (the widest among the layers; at least float32 inside
    torch.autocast, as torch's losses).

    Integer labels with a ``batch`` or ``uniform`` target run kdfast.ops.gini_kl (one fused op per layer). Soft
    labels and a target tensor finish the loss from the per-class statistics in plain PyTorch, in float64:
    integer labels still take kdfast.ops.gini_kl_statistics (the only pass over the activations); soft labels
    take ``w^T m`` (a matmul over the pooled activations).

    Attributes:
        gini, kl: the two terms of the last call (averaged over the layers), detached (also during the warm-up).
    """

    steps: Tensor
    target_distribution: Tensor | None

    def __init__(
        self,
        num_classes: int,
        lambda_gini: float = 0.5,
        lambda_kl: float = 0.5,
        target: str | Tensor | Sequence[float] = "batch",
        warmup_steps: int = 0,
        sync_ddp: bool = False,
        *,
        process_group=None,
        delta: float = 1e-10,
        backend: str | None = None,
    ):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        self.num_classes = num_classes
        self.lambda_gini = _validate.finite("lambda_gini", lambda_gini)
        self.lambda_kl = _validate.finite("lambda_kl", lambda_kl)
        if isinstance(target, str):
            self.target = _validate.choice("target", target, TARGETS)
            distribution = None
        else:
            self.target = "tensor"
            distribution = _target_distribution(target, num_classes)
        self.register_buffer("target_distribution", distribution, persistent=False)
        self.warmup_steps = warmup_steps
        self.sync_ddp = bool(sync_ddp)
        self.process_group = process_group
        self.delta = _validate.finite("delta", delta, positive=True)
        self.backend = backend
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.gini: Tensor | None = None
        self.kl: Tensor | None = None

    def forward(self, activations: Tensor | Sequence[Tensor], labels: Tensor) -> Tensor:
        layers = _layers(activations)
        soft = _check_labels(labels, layers[0].shape[0], self.num_classes)
        if soft:
            labels = labels.detach()
        terms = [self._terms(layer, labels, soft) for layer in layers]
        dtype = layers[0].dtype
        for layer in layers[1:]:
            dtype = torch.promote_types(dtype, layer.dtype)
        if torch.is_autocast_enabled(layers[0].device.type):  # a loss under autocast is float32, as ops.gini_kl's
            dtype = torch.promote_types(dtype, torch.float32)
        if len(terms) == 1:
            (gini, kl), = terms
        else:  # each term averaged over the layers, as the paper's code does
            gini = torch.stack([g.to(dtype) for g, _ in terms]).mean()
            kl = torch.stack([k.to(dtype) for _, k in terms]).mean()
        gini, kl = gini.to(dtype), kl.to(dtype)
        self.gini, self.kl = gini.detach(), kl.detach()
        loss = self.lambda_gini * gini + self.lambda_kl * kl
        if self.training and self.warmup_steps > 0:
            # On the device, without a host sync or a data-dependent branch (torch.compile traces it as is).
            active = self.steps >= self.warmup_steps
            loss = torch.where(active, loss, torch.zeros_like(loss))
        if self.training:
            self.steps.add_(1)
        return loss

    def _terms(self, activations: Tensor, labels: Tensor, soft: bool) -> tuple[Tensor, Tensor]:
        """(gini, kl) of one layer."""
        synchronised = self.sync_ddp and dist.is_available() and dist.is_initialized()
        if not soft and self.target_distribution is None:
            if synchronised:
                return self._global_terms(activations, labels)
            return gini_kl(activations, labels, self.num_classes, self.target, self.delta, backend=self.backend)
        if soft:
            class_sums, counts = _soft_statistics(activations, labels)
        else:
            class_sums, counts = gini_kl_statistics(activations, labels, self.num_classes, backend=self.backend)
            counts = counts.to(class_sums.dtype)
        if synchronised:
            from torch.distributed.nn.functional import all_reduce

            class_sums = all_reduce(class_sums, op=dist.ReduceOp.SUM, group=self.process_group)
            counts = counts.clone()
            dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=self.process_group)
        return _finish(class_sums, counts, self.target, self.target_distribution, self.delta)

    def _global_terms(self, activations: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        from torch.distributed.nn.functional import all_reduce

        class_sums, counts = gini_kl_statistics(activations, labels, self.num_classes, backend=self.backend)
        # The class sums and counts add up over ranks. all_reduce from torch.distributed.nn is differentiable:
        # its backward all-reduces the gradient (a sum), which is what DDP's averaging expects.
        class_sums = all_reduce(class_sums, op=dist.ReduceOp.SUM, group=self.process_group)
        counts = counts.clone()
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=self.process_group)
        gini, kl = gini_kl_from_statistics(class_sums, counts, self.target, self.delta, backend=self.backend)
        return gini, kl

    def extra_repr(self) -> str:
        target = f"tensor of {self.num_classes}" if self.target == "tensor" else repr(self.target)
        return (
            f"num_classes={self.num_classes}, lambda_gini={self.lambda_gini}, lambda_kl={self.lambda_kl}, "
            f"target={target}, warmup_steps={self.warmup_steps}, sync_ddp={self.sync_ddp}"
        )


# ----------------------------------------------------------------------------------------------------------------
# Checks


def _layers(activations) -> list[Tensor]:
    """The layers' activations as a list, each checked for its rank and dtype; one batch size across them."""
    if isinstance(activations, Tensor):
        named = [("activations", activations)]
    elif isinstance(activations, (list, tuple)):
        if not activations:
            raise ValueError("activations must hold at least one layer's tensor, got an empty list")
        named = [(f"activations[{i}]", layer) for i, layer in enumerate(activations)]
    else:
        raise TypeError(
            "activations must be a tensor (B, F, H, W) or (B, F), or a list of such tensors (one per layer), "
            f"got {type(activations).__name__}"
        )
    for name, layer in named:
        if not isinstance(layer, Tensor):
            raise TypeError(f"{name} must be a tensor (B, F, H, W) or (B, F), got {type(layer).__name__}")
        if layer.dim() not in (2, 4):
            raise ValueError(f"{name} must have shape (B, F, H, W) or (B, F), got {tuple(layer.shape)}")
        if layer.dtype not in _validate.FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 tensor, got {layer.dtype}")
    _validate.same_size("batch size B of every layer", **{name: layer.shape[0] for name, layer in named})
    return [layer for _, layer in named]


def _check_labels(labels, batch_size: int, num_classes: int) -> bool:
    """True for soft labels (B, C); False for class ids (B,), which kdfast.ops checks further."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a tensor of class ids (B,) or soft labels (B, C), got {type(labels).__name__}")
    if labels.dim() == 1:
        if labels.dtype.is_floating_point:
            raise TypeError(
                f"labels (B,) must be integer class ids, got {labels.dtype}; soft labels are (B, C) probabilities"
            )
        return False
    if labels.dim() != 2:
        raise ValueError(
            f"labels must be class ids (B,) or soft labels (B, C = {num_classes}), got shape {tuple(labels.shape)}"
        )
    if labels.dtype not in _validate.FLOAT_DTYPES:
        raise TypeError(
            f"soft labels (B, C) must be a float16, bfloat16, float32 or float64 tensor, got {labels.dtype}"
        )
    _validate.same_size("batch size B", activations=batch_size, labels=labels.shape[0])
    _validate.same_size("number of classes C", num_classes=num_classes, labels=labels.shape[1])
    if not torch.compiler.is_compiling():  # one host sync for a clear error; a compiled graph cannot branch on data
        wide = labels.detach().double()
        low, worst = (float(x) for x in torch.stack([wide.min(), (wide.sum(1) - 1).abs().max()]).tolist())
        if not math.isfinite(low) or not math.isfinite(worst):
            raise ValueError("soft labels must be finite, got NaN or inf")
        if low < 0:
            raise ValueError(f"soft labels must be non-negative probabilities, got min {low}")
        tolerance = _sum_tolerance(labels.dtype, num_classes)
        if worst > tolerance:
            raise ValueError(
                f"each row of the soft labels must sum to 1 (within {tolerance:.1e}), got a row off by {worst:.3e}"
            )
    return True


def _sum_tolerance(dtype: torch.dtype, count: int) -> float:
    """How far from 1 a sum of ``count`` probabilities stored in ``dtype`` may be."""
    return max(1e-6, 4 * count * torch.finfo(dtype).eps)


def _target_distribution(target, num_classes: int) -> Tensor:
    if not isinstance(target, Tensor):
        if not isinstance(target, (list, tuple)) or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) for t in target
        ):
            raise TypeError(
                "target must be 'batch', 'uniform' or a (C,) tensor of class probabilities, "
                f"got {type(target).__name__}"
            )
        target = torch.tensor(target, dtype=torch.float64)
    if target.dtype not in _validate.FLOAT_DTYPES:
        raise TypeError(f"target must be a floating tensor of class probabilities, got {target.dtype}")
    if tuple(target.shape) != (num_classes,):
        raise ValueError(f"target must have shape (C,) = ({num_classes},), got {tuple(target.shape)}")
    wide = target.detach().double()
    if not torch.isfinite(wide).all():
        raise ValueError("target must be finite, got NaN or inf")
    if (wide < 0).any():
        raise ValueError(f"target must be non-negative probabilities, got min {wide.min().item()}")
    tolerance = _sum_tolerance(target.dtype, num_classes)
    if abs(wide.sum().item() - 1) > tolerance:
        raise ValueError(f"target must sum to 1 (within {tolerance:.1e}), got {wide.sum().item()}")
    return target.detach().clone()


# ----------------------------------------------------------------------------------------------------------------
# The statistics of soft labels and the finish, in plain PyTorch


def _soft_statistics(activations: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """``class_sums[c, f] = sum_b w[b, c] m[b, f]`` (m the spatially pooled |a|) and ``counts[c] = sum_b w[b, c]``,
    both float64 (as kdfast.ops.gini_kl_statistics accumulates), differentiable in the activations."""
    _validate.nonempty("activations", activations, "(B, F, ...)")
    _validate.same_device(activations=activations, labels=weights)
    magnitudes = activations.abs()
    if activations.dim() == 2:
        pooled = magnitudes.double()
    else:
        pooled = magnitudes.flatten(2).sum(-1, dtype=torch.float64) / (activations.shape[2] * activations.shape[3])
    w = weights.double()
    return w.t() @ pooled, w.sum(0)


def _finish(
    class_sums: Tensor, counts: Tensor, target: str, distribution: Tensor | None, delta: float
) -> tuple[Tensor, Tensor]:
    """(gini, kl) from the (C, F) class sums and the (C,) class weights, float64 (design 3.4's formulas)."""
    present = (counts > 0).unsqueeze(1)  # absent classes (weight exactly 0): their rows read as 0
    sums = torch.where(present, class_sums, torch.zeros_like(class_sums))
    S = (sums / (counts + delta).unsqueeze(1)).t()  # (F, C)
    p = S / (S.sum(dim=1, keepdim=True) + delta)
    gini = (1.0 - (p * p).sum(dim=1)).mean()
    P = p.sum(dim=0)
    q = (P + delta) / P.sum()
    if distribution is not None:
        t = distribution.to(device=q.device, dtype=q.dtype)
    elif target == "batch":
        t = counts / counts.sum()
    else:
        t = torch.full_like(q, 1.0 / q.shape[0])
    kl = (torch.xlogy(t, t) - torch.xlogy(t, q)).sum()  # t_c = 0 terms are exactly 0
    return gini, kl
