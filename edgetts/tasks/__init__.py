"""Benchmarks: the built-in ``arith`` generator, dataset loading, answer extraction and grading."""

from edgetts.tasks.datasets import DatasetError, Example, load_dataset
from edgetts.tasks.grading import extract_answer, grade, is_equivalent, strip_thinking

__all__ = ["DatasetError", "Example", "extract_answer", "grade", "is_equivalent", "load_dataset", "strip_thinking"]
