"""Distillation inside the stacks people train with: :mod:`mlot_kernels.integrations.transformers`
(``transformers.Trainer``)."""
