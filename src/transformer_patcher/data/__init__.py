"""Dataset loaders for FEVER, zsRE and CounterFact, returning ``datasets.Dataset`` objects or ``EditExample`` lists."""

from .loaders import (
    DATA_ENV_VAR,
    FEVER_LABELS,
    ZSRE_SAMPLE,
    DatasetFormatError,
    find_data_file,
    load_counterfact,
    load_fever,
    load_zsre,
    to_edit_examples,
)

__all__ = [
    "DATA_ENV_VAR",
    "FEVER_LABELS",
    "ZSRE_SAMPLE",
    "DatasetFormatError",
    "find_data_file",
    "load_counterfact",
    "load_fever",
    "load_zsre",
    "to_edit_examples",
]
