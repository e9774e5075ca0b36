"""Training the NearID head on a frozen SigLIP2 trunk (spec section 5; docs/training.md).

- :mod:`~nearid_metric.train.config`: :class:`TrainConfig` and the config files (no torch);
- :mod:`~nearid_metric.train.loss`: :func:`two_tier_infonce` and :func:`batch_loss`;
- :mod:`~nearid_metric.train.data`: samples, the held-out split, the composition and batches of an epoch;
- :mod:`~nearid_metric.train.optim`: AdamW, the learning-rate schedule, clipping, mixed precision;
- :mod:`~nearid_metric.train.loop`: :func:`train`, the run (feature cache, evaluation, checkpoints, torchrun);
- :mod:`~nearid_metric.train.export`: :func:`export_checkpoint`, the released folder format.
"""
