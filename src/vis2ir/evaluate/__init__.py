"""Evaluation: reference predictors (`baselines`), metrics and the ablation runner."""
