"""Dataset loaders for FEVER, zsRE and CounterFact (``datasets.Dataset`` objects or ``EditExample`` lists), and the
evaluation suite's own files: unrelated questions and near neighbours."""

from transformer_patcher.data.loaders import (
    DATA_ENV_VAR,
    FEVER_LABELS,
    ZSRE_SAMPLE,
    DataDirError,
    DatasetFormatError,
    find_data_file,
    load_counterfact,
    load_fever,
    load_neighbours,
    load_questions,
    load_zsre,
    to_edit_examples,
)

__all__ = [
    "DATA_ENV_VAR",
    "FEVER_LABELS",
    "ZSRE_SAMPLE",
    "DataDirError",
    "DatasetFormatError",
    "find_data_file",
    "load_counterfact",
    "load_fever",
    "load_neighbours",
    "load_questions",
    "load_zsre",
    "to_edit_examples",
]
