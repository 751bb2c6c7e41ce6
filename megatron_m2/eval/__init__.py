"""Evaluation: image–text retrieval recall and zero-shot accuracy in bounded memory."""

from .retrieval import format_table, retrieval_metrics, zero_shot_accuracy

__all__ = ["retrieval_metrics", "zero_shot_accuracy", "format_table"]
