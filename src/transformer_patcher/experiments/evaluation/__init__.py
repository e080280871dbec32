"""Evaluation of edited models as their users see them: batched greedy decoding, teacher-forced reads, the locality
suite (unrelated and neighbouring questions, raw and chat, free generation, perplexity) and EasyEdit's measures."""

from transformer_patcher.core.decoding import greedy_continuations
from transformer_patcher.experiments.evaluation.forced import ForcedReads, Reads
from transformer_patcher.experiments.evaluation.parts import (
    PRESETS,
    SuiteConfig,
    available_formats,
    benchmark_parts,
    easyedit_locality_part,
    flatten,
    label_part,
    locality_parts,
    neighbours_from_file,
    perplexity_windows,
)
from transformer_patcher.experiments.evaluation.suite import LABELS, PERPLEXITY, REFERENCE, EvaluationSuite, Part

__all__ = [
    "LABELS",
    "PERPLEXITY",
    "PRESETS",
    "REFERENCE",
    "EvaluationSuite",
    "ForcedReads",
    "Part",
    "Reads",
    "SuiteConfig",
    "available_formats",
    "benchmark_parts",
    "easyedit_locality_part",
    "flatten",
    "greedy_continuations",
    "label_part",
    "locality_parts",
    "neighbours_from_file",
    "perplexity_windows",
]
