"""Evaluation: image–text retrieval recall, zero-shot classification and its test sets, and the
counting / spatial-relations probe (:mod:`megatron_m2.eval.probe`)."""

from .datasets import (
    FASHION_MNIST_ROOT,
    IMG_EXTENSIONS,
    FashionMNIST,
    IdxFormatError,
    ImageFolder,
    ImageReadError,
    iter_batches,
    read_idx,
)
from .probe import build_probe, evaluate_probe
from .retrieval import (
    cross_lingual_agreement,
    format_table,
    query_rankings,
    retrieval_metrics,
    zero_shot_accuracy,
)
from .zeroshot import (
    BUILTIN_CLASSNAMES,
    LANGUAGES,
    build_classifier,
    evaluate_with_classifier,
    evaluate_zero_shot,
    load_classnames,
    load_templates,
)

__all__ = [
    "retrieval_metrics",
    "cross_lingual_agreement",
    "query_rankings",
    "zero_shot_accuracy",
    "format_table",
    "LANGUAGES",
    "BUILTIN_CLASSNAMES",
    "load_classnames",
    "load_templates",
    "build_classifier",
    "evaluate_with_classifier",
    "evaluate_zero_shot",
    "FASHION_MNIST_ROOT",
    "IMG_EXTENSIONS",
    "IdxFormatError",
    "ImageReadError",
    "read_idx",
    "iter_batches",
    "FashionMNIST",
    "ImageFolder",
    "build_probe",
    "evaluate_probe",
]
