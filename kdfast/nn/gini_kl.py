"""The discriminability-enforcing loss (arXiv 2202.07073) as a module: lambda_gini * gini + lambda_kl * kl."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kdfast.ops import _validate
from kdfast.ops.gini_kl import TARGETS, gini_kl, gini_kl_from_statistics, gini_kl_statistics


class GiniKLLoss(nn.Module):
    """``lambda_gini * gini + lambda_kl * kl`` of a layer's activations (design 3.4; kdfast.ops.gini_kl).

    Add it to the classification loss: ``loss = cross_entropy + GiniKLLoss(C)(features, labels)``. The features
    can be any layer's output, e.g. caught with a forward hook::

        criterion = GiniKLLoss(num_classes=100, warmup_steps=1000)
        features = {}
        model.layer4.register_forward_hook(lambda module, args, output: features.update(layer4=output))
        logits = model(images)
        loss = F.cross_entropy(logits, labels) + criterion(features["layer4"], labels)
        loss.backward()
        log(gini=criterion.gini, kl=criterion.kl)

    Args:
        num_classes: C >= 1.
        lambda_gini, lambda_kl: weights of the two terms (the paper: 0.5 and 0.5).
        target: ``batch`` or ``uniform``, the KL target (see kdfast.ops.gini_kl).
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

    Shapes: activations (B, F, H, W) or (B, F), labels (B,) -> a scalar in the activations' dtype.

    Attributes:
        gini, kl: the two terms of the last call, detached (also during the warm-up).
    """

    steps: Tensor

    def __init__(
        self,
        num_classes: int,
        lambda_gini: float = 0.5,
        lambda_kl: float = 0.5,
        target: str = "batch",
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
        self.target = _validate.choice("target", target, TARGETS)
        self.warmup_steps = warmup_steps
        self.sync_ddp = bool(sync_ddp)
        self.process_group = process_group
        self.delta = _validate.finite("delta", delta, positive=True)
        self.backend = backend
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.gini: Tensor | None = None
        self.kl: Tensor | None = None

    def forward(self, activations: Tensor, labels: Tensor) -> Tensor:
        if self._synchronised():
            gini, kl = self._global_terms(activations, labels)
        else:
            gini, kl = gini_kl(activations, labels, self.num_classes, self.target, self.delta, backend=self.backend)
        self.gini, self.kl = gini.detach(), kl.detach()
        loss = self.lambda_gini * gini + self.lambda_kl * kl
        if self.training and self.warmup_steps > 0:
            # On the device, without a host sync or a data-dependent branch (torch.compile traces it as is).
            active = self.steps >= self.warmup_steps
            loss = torch.where(active, loss, torch.zeros_like(loss))
        if self.training:
            self.steps.add_(1)
        return loss

    def _synchronised(self) -> bool:
        return self.sync_ddp and dist.is_available() and dist.is_initialized()

    def _global_terms(self, activations: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        from torch.distributed.nn.functional import all_reduce

        class_sums, counts = gini_kl_statistics(activations, labels, self.num_classes, backend=self.backend)
        # The class sums and counts add up over ranks. all_reduce from torch.distributed.nn is differentiable:
        # its backward all-reduces the gradient (a sum), which is what DDP's averaging expects.
        class_sums = all_reduce(class_sums, op=dist.ReduceOp.SUM, group=self.process_group)
        counts = counts.clone()
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=self.process_group)
        gini, kl = gini_kl_from_statistics(class_sums, counts, self.target, self.delta, backend=self.backend)
        return gini.to(activations.dtype), kl.to(activations.dtype)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, lambda_gini={self.lambda_gini}, lambda_kl={self.lambda_kl}, "
            f"target={self.target!r}, warmup_steps={self.warmup_steps}, sync_ddp={self.sync_ddp}"
        )
