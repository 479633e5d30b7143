"""A thin training loop and the three recipes (design.md section 6).

- :func:`fit` (kdfast.train.loop): AdamW, warm-up + cosine schedule, AMP, gradient clipping, JSON-lines metrics,
  a tqdm bar, exact checkpoint/resume, a
  finite-loss guard (NonFiniteLoss), DDP under torchrun.
- kdfast.train.data: the embedded synthetic datasets (MovingShapes, Shapes) and loaders of real local data.
- kdfast.train.metrics: FG-ARI and mBO, batched in torch.
- kdfast.train.recipes: ``slotmatch``, ``wecolora``, ``gini``; each is also ``kdfast train <recipe>``.
"""

from kdfast.train.loop import NonFiniteLoss, Result, TrainConfig, TrainingInterrupted, fit, load_model

__all__ = ["NonFiniteLoss", "Result", "TrainConfig", "TrainingInterrupted", "fit", "load_model"]
