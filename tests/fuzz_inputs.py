"""Fuzz campaigns for bad data and arguments: dataset files, configs, edit inputs and PMET requests.

Every campaign checks a contract against an independent statement of it (written here, not read from the code):

- loaders: a file either loads exactly the rows its valid records describe, or raises ``DatasetFormatError`` naming
  the file and, when one record is at fault, its location (``record i`` in a JSON list, ``line n`` in JSON lines) and
  a field of it that is bad;
- configs: a value is accepted exactly when it satisfies the documented range and type of its field, and a refusal is
  a ``ValueError`` naming a bad field;
- edit inputs: an invalid example raises ``InvalidExampleError`` and leaves the model bit-identical; a valid one is
  edited, and an input longer than ``max_length`` is truncated with an ``InputTruncatedWarning``;
- PMET requests: an invalid request raises ``InvalidExampleError``; an accepted one formats back to its prompt.

Tiny models are built once per campaign; each case restores the trainer's state before the next.
"""

from __future__ import annotations

import json
import math
import string
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers.activations import ACT2FN

from fuzzing import campaign, fuzz_settings, outcome_label
from tiny_models import build
from tiny_tokenizer import sentence, tiny_tokenizer
from transformer_patcher import PatcherConfig, get_patcher_model
from transformer_patcher.core.errors import InvalidExampleError
from transformer_patcher.core.tasks import InputTruncatedWarning
from transformer_patcher.data import DatasetFormatError, load_counterfact, load_fever, load_zsre
from transformer_patcher.methods.patcher import EditConfig, EditExample, MemoryBank, PatchTrainer, task_for_model
from transformer_patcher.methods.pmet import PMETHyperParams
from transformer_patcher.methods.pmet.requests import EditRequest, encode
from transformer_patcher.tuners.patcher.schema import PATCH_DTYPES

NAMES: list[str] = []  # the campaigns of this module, in registration order


def _register(name: str) -> Callable[[Callable[[int], Counter]], Callable[[int], Counter]]:
    NAMES.append(name)
    return campaign(name)


# ------------------------------------------------------------------------------------------------ strategies
SPECIAL_TEXT = [
    "",
    " ",
    "\t\n\r",
    "\u3000\u00a0\u2003",  # Unicode whitespace only
    "\x00",
    "a\x00b",
    "\u200b",  # zero-width space (not whitespace to str.strip)
    "\u200b\u200c\u200d\ufeff",
    "\u202eevil\u202c",  # right-to-left override
    "שלום עולם",
    "مرحبا بالعالم",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 😀",  # astral
    "\U0010ffff",
    "e\u0301",
    "a\u2028b\u2029c\x85d\x1ce",  # characters str.splitlines treats as line breaks
    "line\nbreak",
    '"quoted" \\ back',
    "{}",
    "{0} {x} }{",
    "nq question: ",
]
WHITESPACE = st.text(alphabet=" \t\n\r\x0b\x0c\u3000\u00a0\u2003\u2028", min_size=1, max_size=6)
OVERLONG = st.integers(1_000, 30_000).map(lambda n: "x" * n)
TEXT = st.one_of(st.sampled_from(SPECIAL_TEXT), WHITESPACE, st.text(max_size=30), OVERLONG)
NONBLANK = st.one_of(
    st.text(min_size=1, max_size=20).filter(lambda s: bool(s.strip())),
    st.sampled_from([t for t in SPECIAL_TEXT if t.strip()]),  # valid text can be odd Unicode too
)
SURROGATE = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3).map(lambda s: f"x{s}y")
WRONG_TYPE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)
DELETE = "<delete this field>"
MUTATION = st.one_of(st.just(DELETE), TEXT, SURROGATE, WRONG_TYPE)
NON_OBJECT = st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2))
CORRUPTIONS = [None] * 6 + ["truncate", "garbage", "bom", "blank-lines", "crlf", "empty", "bad-utf8"]


def _string_ok(value: Any) -> bool:
    """A usable text field: a non-blank string UTF-8 can store (no lone surrogate)."""
    if not isinstance(value, str) or not value.strip():
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ loaders
# Per dataset: the fields a valid record has, a factory of valid values, extra mutations, and the independent oracle
# (record -> (bad fields, expected row or None when the record is dropped)).
FEVER_LABELS = {"SUPPORTS": 1, "REFUTES": 0}


def _fever_oracle(rec: dict[str, Any]) -> tuple[list[str], dict[str, Any] | None]:
    bad = [] if _string_ok(rec.get("claim")) else ["claim"]
    label = rec.get("label")
    if not isinstance(label, str) or label not in (*FEVER_LABELS, "NOT ENOUGH INFO"):
        bad.append("label")
    if bad:
        return bad, None
    return [], None if label == "NOT ENOUGH INFO" else {"text": rec["claim"], "label": FEVER_LABELS[label]}


def _zsre_oracle(rec: dict[str, Any]) -> tuple[list[str], dict[str, Any] | None]:
    bad = [f for f in ("src", "rephrase", "loc", "loc_ans", "subject") if not _string_ok(rec.get(f))]
    answers = rec.get("answers")
    if not isinstance(answers, list) or not answers or not all(_string_ok(a) for a in answers):
        bad.append("answers")
    loc = rec.get("loc")
    if "loc" not in bad and loc.startswith("nq question: "):
        loc = loc[len("nq question: ") :]
        if not loc.strip():
            bad.append("loc")
    if bad:
        return bad, None
    fields = {"text": rec["src"], "target": answers[0], "rephrase": rec["rephrase"], "loc": loc}
    return [], fields | {"loc_ans": rec["loc_ans"], "subject": rec["subject"]}


def _cf_target(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("str")
    return value if _string_ok(value) else None


def _cf_oracle(rec: dict[str, Any]) -> tuple[list[str], dict[str, Any] | None]:
    plain = ("subject", "prompt", "rephrase_prompt", "locality_prompt")
    bad = [f for f in plain if not _string_ok(rec.get(f))]
    targets = {f: _cf_target(rec.get(f)) for f in ("target_new", "ground_truth", "locality_ground_truth")}
    bad += [f for f, value in targets.items() if value is None]
    if bad:
        return bad, None
    prompt, subject = rec["prompt"], rec["subject"]
    return [], {
        "text": prompt.replace("{}", subject) if "{}" in prompt else prompt,
        "target": targets["target_new"],
        "ground_truth": targets["ground_truth"],
        "rephrase": rec["rephrase_prompt"],
        "loc": rec["locality_prompt"],
        "loc_ans": targets["locality_ground_truth"],
        "subject": subject,
    }


_FEVER_FIELDS = {"id": st.integers(0, 10**6), "claim": NONBLANK, "label": st.sampled_from(["SUPPORTS", "REFUTES"])}
_ZSRE_FIELDS = {
    "subject": NONBLANK,
    "src": NONBLANK,
    "rephrase": NONBLANK,
    "answers": st.lists(NONBLANK, min_size=1, max_size=3),
    "loc": NONBLANK.map(lambda s: "nq question: " + s),
    "loc_ans": NONBLANK,
}
_CF_TARGET = st.one_of(NONBLANK, NONBLANK.map(lambda s: {"str": s, "id": "Q1"}))
_CF_FIELDS = {
    "case_id": st.integers(0, 10**6),
    "prompt": st.one_of(NONBLANK, NONBLANK.map(lambda s: "{} " + s)),
    "subject": NONBLANK,
    "target_new": _CF_TARGET,
    "ground_truth": _CF_TARGET,
    "rephrase_prompt": NONBLANK,
    "locality_prompt": NONBLANK,
    "locality_ground_truth": _CF_TARGET,
}
_EXTRA_MUTATIONS = {
    "fever": st.sampled_from(["NOT ENOUGH INFO", "supports", " SUPPORTS", "MAYBE", 0, 1, -1, 2, 1.0]),
    "zsre": st.sampled_from(["nq question: ", "nq question:   ", [], [""], ["ok", 5], ["ok", None], ["ok"]]),
    "counterfact": st.sampled_from([{"str": ""}, {"str": 5}, {}, {"id": "Q1"}, {"str": "ok"}, ["ok"]]),
}
DATASETS: dict[str, tuple[Callable[..., Any], dict[str, st.SearchStrategy], Callable]] = {
    "fever": (load_fever, _FEVER_FIELDS, _fever_oracle),
    "zsre": (load_zsre, _ZSRE_FIELDS, _zsre_oracle),
    "counterfact": (load_counterfact, _CF_FIELDS, _cf_oracle),
}


@st.composite
def _record(draw: st.DrawFn, kind: str) -> Any:
    _, fields, _ = DATASETS[kind]
    if draw(st.integers(0, 9)) == 0:
        return draw(NON_OBJECT)
    record = {name: draw(strategy) for name, strategy in fields.items()}
    if draw(st.booleans()):  # half the records stay valid, the others get one field replaced or deleted
        name, value = draw(st.sampled_from(sorted(fields))), draw(st.one_of(MUTATION, _EXTRA_MUTATIONS[kind]))
        if value == DELETE:
            record.pop(name, None)
        else:
            record[name] = value
    extra = draw(st.dictionaries(st.text(max_size=8).filter(lambda k: k not in fields), JSON_VALUE, max_size=2))
    return record | extra


def _serialise(records: list[Any], fmt: str, ascii_only: bool, corruption: str | None, cut: float) -> bytes:
    if fmt == "json":
        text = json.dumps(records, ensure_ascii=ascii_only, indent=1 if cut < 0.5 else None)
    else:
        sep = "\n\n" if corruption == "blank-lines" else "\n"
        text = "".join(json.dumps(r, ensure_ascii=ascii_only) + sep for r in records)
    if corruption == "crlf":
        text = text.replace("\n", "\r\n")
    data = text.encode("utf-8", errors="surrogatepass")  # a raw lone surrogate is invalid UTF-8 on disk
    position = int(cut * len(data))
    if corruption == "truncate":
        data = data[:position]
    elif corruption == "garbage":
        data = data[:position] + b'}\x00{[,"' + data[position:]
    elif corruption == "bad-utf8":
        data = data[:position] + b"\xc3\x28" + data[position:]
    elif corruption == "bom":
        data = b"\xef\xbb\xbf" + data
    elif corruption == "empty":
        data = b""
    return data


def _expected(kind: str, records: list[Any], fmt: str, corruption: str | None) -> tuple[str, Any]:
    """("rows", expected rows) or ("error", (location or None, bad fields)) for a file the generator described."""
    _, _, oracle = DATASETS[kind]
    if fmt == "jsonl" and records and isinstance(records[0], list):
        return "error", (None, [])  # a JSON-lines file starting with "[" reads as one JSON document
    rows = []
    for i, rec in enumerate(records):
        location = f"record {i}" if fmt == "json" else f"line {2 * i + 1 if corruption == 'blank-lines' else i + 1}"
        if not isinstance(rec, dict):
            return "error", (location, ["expected a JSON object"])
        bad, row = oracle(rec)
        if bad:
            return "error", (location, [repr(f) for f in bad])
        if row is not None:
            rows.append(row)
    if not rows:
        return "error", (None, ["no usable records"])
    return "rows", rows


def _loader_campaign(kind: str, max_examples: int) -> Counter:
    loader, _, _ = DATASETS[kind]
    tally: Counter = Counter()
    folder = Path(tempfile.mkdtemp(prefix=f"fuzz-{kind}-"))

    @fuzz_settings(max_examples)
    @given(
        records=st.lists(_record(kind), max_size=4),
        fmt=st.sampled_from(["json", "jsonl"]),
        ascii_only=st.booleans(),
        corruption=st.sampled_from(CORRUPTIONS),
        cut=st.floats(0, 1),
    )
    def case(records: list[Any], fmt: str, ascii_only: bool, corruption: str | None, cut: float) -> None:
        path = folder / f"{kind}.{fmt}"
        data = _serialise(records, fmt, ascii_only, corruption, cut)
        path.write_bytes(data)
        try:
            data.decode("utf-8")
            raw_surrogates = False
        except UnicodeDecodeError:
            raw_surrogates = True  # a lone surrogate written raw, a cut or inserted byte: not UTF-8
        benign = corruption in (None, "bom", "blank-lines", "crlf")
        records = json.loads(json.dumps(records))  # as the file reads back: an escaped surrogate pair is one character
        try:
            dataset = loader(path)
        except DatasetFormatError as error:
            message = str(error)
            assert isinstance(error, ValueError) and str(path) in message, message
            if raw_surrogates:
                assert "not valid UTF-8" in message, message
            elif corruption == "empty":
                assert "no usable records" in message, message
            elif benign:
                verdict, detail = _expected(kind, records, fmt, corruption)
                assert verdict == "error", f"refused a valid file: {message}"
                location, fields = detail
                if location is not None:
                    assert f": {location}:" in message, (location, message)
                if fields:
                    assert any(f in message for f in fields), (fields, message)
            tally[outcome_label(error)] += 1
            return
        assert not raw_surrogates, "a file that is not UTF-8 was accepted"
        if benign:
            verdict, rows = _expected(kind, records, fmt, corruption)
            assert verdict == "rows", f"accepted an invalid file: {rows}"
            assert dataset.to_list() == rows
        tally[f"accepted: loads {len(dataset)} records"] += 1

    case()
    return tally


@_register("loader: FEVER")
def fuzz_fever(max_examples: int) -> Counter:
    return _loader_campaign("fever", max_examples)


@_register("loader: zsRE")
def fuzz_zsre(max_examples: int) -> Counter:
    return _loader_campaign("zsre", max_examples)


@_register("loader: CounterFact")
def fuzz_counterfact(max_examples: int) -> Counter:
    return _loader_campaign("counterfact", max_examples)


# ------------------------------------------------------------------------------------------------ configs
SPECIAL_VALUES = [0, 0.0, -0.0, -1, 1, 2, 0.5, 1.0, 1e300, -1e-300, 2**32, 2**64, math.nan, math.inf, -math.inf]
SPECIAL_VALUES += [True, False, None, "", "1", "nan", [], {}, [1], (1,)]
CONFIG_VALUE = st.one_of(
    st.sampled_from(SPECIAL_VALUES),
    st.integers(-10, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _numeric(check: Callable[[Any], bool], *, integer: bool = False, optional: bool = False) -> Callable[[Any], bool]:
    kind = _is_int if integer else _is_number
    return lambda v: (optional and v is None) or (kind(v) and check(v))


_ANY = lambda v: True  # noqa: E731
_POSITIVE = lambda v: v > 0  # noqa: E731
_NON_NEGATIVE = lambda v: v >= 0  # noqa: E731
_BOOL = lambda v: isinstance(v, bool)  # noqa: E731

EDIT_CONFIG_SPEC: dict[str, Callable[[Any], bool]] = {
    "lr": _numeric(_POSITIVE),
    "weight_decay": _numeric(_NON_NEGATIVE),
    "grad_clip": _numeric(_POSITIVE),
    "repeats": _numeric(_POSITIVE, integer=True),
    "dropout": _BOOL,
    "max_steps": _numeric(_POSITIVE, integer=True),
    "start_val_step": _numeric(_NON_NEGATIVE, integer=True),
    "check_every": _numeric(_POSITIVE, integer=True),
    "use_validation": _BOOL,
    "early_patience": _numeric(_NON_NEGATIVE, integer=True),
    "early_threshold": _numeric(_NON_NEGATIVE),
    "lr_factor": _numeric(lambda v: 0 < v < 1),
    "lr_every": _numeric(_POSITIVE, integer=True),
    "lr_patience": _numeric(_NON_NEGATIVE, integer=True),
    "lr_threshold": _numeric(_NON_NEGATIVE),
    "act_top_k": _numeric(_POSITIVE, integer=True),
    "act_margin": _numeric(_ANY, optional=True),
    "memory_top_k": _numeric(_POSITIVE, integer=True),
    "memory_beta": _numeric(_ANY, optional=True),
    "memory_gamma": _numeric(_ANY, optional=True),
    "act_loss_weight": _numeric(_NON_NEGATIVE),
    "memory_loss_weight": _numeric(_NON_NEGATIVE, optional=True),
    "max_patches": _numeric(_POSITIVE, integer=True),
    "value_init": lambda v: isinstance(v, str) and v in ("normal", "uniform"),
    "cache": _BOOL,
    "keep_failed": _BOOL,
    "seed": _numeric(lambda v: 0 <= v < 2**32, integer=True),
    "extra": lambda v: isinstance(v, dict),
}


def _names_ok(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value)
    if isinstance(value, (list, tuple, set)):
        return all(isinstance(v, str) and v for v in value)
    return False


PATCHER_CONFIG_SPEC: dict[str, Callable[[Any], bool]] = {
    "target_modules": lambda v: v is None or _names_ok(v),
    "key_module": lambda v: v is None or (isinstance(v, str) and bool(v)),
    "layer_index": _is_int,
    "patch_activation": lambda v: v is None or (isinstance(v, str) and v in ACT2FN),
    "num_patches": _numeric(_NON_NEGATIVE, integer=True),
    "init_value_scale": _numeric(_POSITIVE),
    "patch_dtype": lambda v: v is None or (isinstance(v, str) and v in PATCH_DTYPES),
}


def _layers_ok(value: Any) -> bool:
    if not isinstance(value, (list, tuple)) or not value or not all(_is_int(i) and i >= 0 for i in value):
        return False
    return list(value) == sorted(set(value))


def _pairs_ok(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_int(n) and n >= 1 for n in p) for p in value
    )


PMET_SPEC: dict[str, Callable[[Any], bool]] = {
    "layers": _layers_ok,
    "variant": lambda v: isinstance(v, str) and v in ("pmet", "memit"),
    "v_lr": _numeric(_POSITIVE),
    "v_num_grad_steps": _numeric(_POSITIVE, integer=True),
    "clamp_norm_factor": _numeric(_POSITIVE),
    "v_weight_decay": _numeric(_NON_NEGATIVE),
    "kl_factor": _numeric(_NON_NEGATIVE),
    "nll_loss_factor": _numeric(_POSITIVE),
    "mom2_update_weight": _numeric(_POSITIVE),
    "mom2_ridge": _numeric(_NON_NEGATIVE),
    "mom2_n_texts": _numeric(_POSITIVE, integer=True),
    "mom2_max_length": _numeric(_POSITIVE, integer=True),
    "context_template_lengths": _pairs_ok,
    "requests_per_step": _numeric(_POSITIVE, integer=True),
    "extra": lambda v: isinstance(v, dict),
}

_EXTRA_VALUES: dict[str, list[Any]] = {
    "EditConfig": ["normal", "uniform", "zeros", 0.999, 1.5],
    "PatcherConfig": [
        *("gelu", "relu", "silu", "nope", "float16", "bfloat16", "int8", ["a"], ["a", 1], ("q",)),
        *({"x", "y"}, [""], "model.layers.1.mlp.down_proj"),
    ],
    "PMETHyperParams": [
        *((3, 4), [1, 2], (2, 1), (1, 1), (-1, 0), (), ((10, 5),), [[1, 2]], ((0, 1),), ((1.5, 2),)),
        *("pmet", "memit", ((1, 2, 3),), "12", (True,)),
    ],
}


def _config_campaign(
    name: str, make: Callable[..., Any], spec: dict[str, Callable[[Any], bool]], max_examples: int, check: Callable
) -> Counter:
    tally: Counter = Counter()
    value = st.one_of(CONFIG_VALUE, st.sampled_from(_EXTRA_VALUES[name]))

    @fuzz_settings(max_examples)
    @given(st.dictionaries(st.sampled_from(sorted(spec)), value, max_size=3))
    def case(options: dict[str, Any]) -> None:
        bad = [field for field, v in options.items() if not spec[field](v)]
        try:
            config = make(**options)
        except ValueError as error:
            assert bad, f"{name}({options!r}) refused valid values: {error}"
            assert any(field in str(error) for field in bad), (bad, str(error))
            tally[outcome_label(error)] += 1
            return
        assert not bad, f"{name}({options!r}) accepted bad {bad}"
        check(config)
        tally["accepted"] += 1

    case()
    return tally


def _edit_config_round_trip(config: EditConfig) -> None:
    assert EditConfig.from_dict(config.to_dict()) == config


def _patcher_config_round_trip(config: PatcherConfig) -> None:
    PatcherConfig.validate_config_dict(json.loads(json.dumps(config.to_dict())), "fuzzed config")


def _pmet_round_trip(config: PMETHyperParams) -> None:
    assert PMETHyperParams(**config.to_dict(), extra=config.extra) == config


@_register("config: EditConfig")
def fuzz_edit_config(max_examples: int) -> Counter:
    return _config_campaign("EditConfig", EditConfig, EDIT_CONFIG_SPEC, max_examples, _edit_config_round_trip)


@_register("config: PatcherConfig")
def fuzz_patcher_config(max_examples: int) -> Counter:
    return _config_campaign(
        "PatcherConfig", PatcherConfig, PATCHER_CONFIG_SPEC, max_examples, _patcher_config_round_trip
    )


@_register("config: PMETHyperParams")
def fuzz_pmet_hparams(max_examples: int) -> Counter:
    return _config_campaign("PMETHyperParams", PMETHyperParams, PMET_SPEC, max_examples, _pmet_round_trip)


@_register("config: ExperimentConfig options")
def fuzz_experiment_options(max_examples: int) -> Counter:
    """ExperimentConfig's seed and its EditConfig/PMET option dicts, which it validates at construction."""
    from transformer_patcher.experiments.sme.experiment import ExperimentConfig

    tally: Counter = Counter()
    value = st.one_of(CONFIG_VALUE, st.sampled_from(_EXTRA_VALUES["EditConfig"]))
    edit_fields = sorted(set(EDIT_CONFIG_SPEC) - {"seed"})
    pmet_fields = sorted(set(PMET_SPEC) - {"extra"})  # provenance only: not an option

    @fuzz_settings(max_examples)
    @given(
        seed=st.one_of(st.integers(0, 100), CONFIG_VALUE),
        edit=st.dictionaries(st.sampled_from([*edit_fields, "not_a_field"]), value, max_size=2),
        pmet=st.dictionaries(st.sampled_from([*pmet_fields, "not_a_field"]), value, max_size=2),
        schedule=st.sampled_from(["official", "quick"]),
    )
    def case(seed: Any, edit: dict[str, Any], pmet: dict[str, Any], schedule: str) -> None:
        bad = [] if EDIT_CONFIG_SPEC["seed"](seed) else ["seed"]
        bad += [f for f, v in edit.items() if f == "not_a_field" or not EDIT_CONFIG_SPEC[f](v)]
        bad += [f for f, v in pmet.items() if f == "not_a_field" or not PMET_SPEC[f](v)]
        try:
            config = ExperimentConfig(model="tiny", seed=seed, edit_options=edit, pmet_options=pmet, schedule=schedule)
        except (ValueError, TypeError) as error:  # TypeError: an unknown keyword, named as Python names it
            assert bad, f"refused valid options: {error}"
            assert any(field in str(error) for field in bad), (bad, str(error))
            tally[outcome_label(error)] += 1
            return
        assert not bad, f"accepted bad {bad}"
        assert config.edit_config().seed == seed
        tally["accepted"] += 1

    case()
    return tally


# ------------------------------------------------------------------------------------------------ edit inputs
WORD_SENTENCE = st.lists(st.integers(4, 127), min_size=1, max_size=160).map(lambda ids: sentence(*ids))
INPUT_TEXT = st.one_of(
    TEXT,
    WORD_SENTENCE,
    st.integers(1, 400).map(lambda n: "w5 " * n),
    st.sampled_from([None, 5, b"w5 w6", ["w5"]]),
)


def _trainer(name: str) -> PatchTrainer:
    """A patched tiny model with one committed patch and a small memory; edits train for at most 2 steps."""
    base = build(name)
    if base.config.is_encoder_decoder and base.config.decoder_start_token_id is None:
        base.config.decoder_start_token_id = 2
    model = get_patcher_model(base).eval()
    task = task_for_model(model, tiny_tokenizer())
    layer = model.base_model.patch_layer()
    generator = torch.Generator().manual_seed(0)
    layer.add_patches(
        torch.randn(1, layer.query_dim, generator=generator),
        0.0,
        torch.randn(1, layer.output_dim, generator=generator),
        edit_id=1,
    )
    layer.commit()
    memory = MemoryBank(torch.randn(8, layer.query_dim, generator=generator))
    return PatchTrainer(model, task, EditConfig.quick(max_steps=2, keep_failed=True), memory)


def _probe_logits(trainer: PatchTrainer) -> torch.Tensor:
    target: int | str = 0 if trainer.task.kind == "classification" else sentence(70)
    batch = trainer.task.batch_for(trainer.model, [(sentence(5, 6, 7), target)])
    with torch.no_grad():
        return trainer.model(**batch.model_kwargs()).logits


class _Guard:
    """The trainer's full state (patches, memory) and reference logits; asserts both are back after each case."""

    def __init__(self, trainer: PatchTrainer) -> None:
        self.trainer = trainer
        self.state = {k: v.clone() for k, v in trainer.state_tensors().items()}
        self.logits = _probe_logits(trainer)
        self.memory = trainer.memory.rows().clone()

    def assert_unchanged(self) -> None:
        state = self.trainer.state_tensors()
        assert state.keys() == self.state.keys()
        assert all(torch.equal(state[k], self.state[k]) for k in state), "patches or memory changed"
        assert self.trainer.layer.num_trainable_patches() == 0
        assert torch.equal(_probe_logits(self.trainer), self.logits), "logits changed"

    def restore(self) -> None:
        self.trainer.load_state_tensors(self.state)
        assert torch.equal(self.trainer.memory.rows(), self.memory)
        self.assert_unchanged()


def _attempt(trainer: PatchTrainer, guard: _Guard, example: EditExample, refuse: bool, truncate: bool) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            record = trainer.edit(example, edit_id=2)
        except InvalidExampleError as error:
            assert refuse, f"refused a valid example {example!r}: {error}"
            guard.assert_unchanged()
            return outcome_label(error)
    assert not refuse, f"accepted an invalid example {example!r}"
    warned = any(issubclass(w.category, InputTruncatedWarning) for w in caught)
    assert warned == truncate, f"truncation warning {warned}, expected {truncate}"
    guard.restore()
    if truncate:
        return "accepted: truncated with warning"
    return "accepted: edited" if record.needed else "accepted: no edit needed"


LABEL = st.one_of(
    st.integers(-3, 4),
    st.sampled_from([True, False, 1.0, 0.5, "1", None, [1], 2**70]),
    st.integers(0, 1).map(np.int64),
    st.integers(0, 1).map(torch.tensor),
)


@_register("edit inputs: classification")
def fuzz_classification_inputs(max_examples: int) -> Counter:
    trainer = _trainer("bert")
    guard, tokenizer, tally = _Guard(trainer), trainer.task.tokenizer, Counter()

    @fuzz_settings(max_examples)
    @given(text=INPUT_TEXT, label=LABEL)
    def case(text: Any, label: Any) -> None:
        is_label = not isinstance(label, (bool, float, str, list, type(None))) and label.__index__() in (0, 1)
        valid_text = isinstance(text, str) and bool(text.strip())
        truncate = valid_text and len(tokenizer(text)["input_ids"]) > trainer.task.max_length
        example = EditExample(text, label)
        tally[_attempt(trainer, guard, example, not (is_label and valid_text), truncate)] += 1

    case()
    return tally


TARGET = st.one_of(
    TEXT,
    st.lists(st.integers(4, 127), min_size=1, max_size=80).map(lambda ids: sentence(*ids)),
    st.sampled_from([f"{sentence(70)} notaword", " w70 ", 3, None, ["w70"]]),
)


@_register("edit inputs: generation")
def fuzz_generation_inputs(max_examples: int) -> Counter:
    trainers = {name: _trainer(name) for name in ("gpt2", "t5")}
    guards = {name: _Guard(trainer) for name, trainer in trainers.items()}
    tokenizer, tally = tiny_tokenizer(), Counter()

    @fuzz_settings(max_examples)
    @given(name=st.sampled_from(sorted(trainers)), text=INPUT_TEXT, target=TARGET)
    def case(name: str, text: Any, target: Any) -> None:
        trainer = trainers[name]
        task = trainer.task
        refuse, truncate = not isinstance(text, str) or not text.strip(), False
        if not isinstance(target, str) or not target.strip():
            refuse = True
        else:
            answer = f" {target.strip()}" if task.kind == "causal_lm" else target
            ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            refuse = refuse or tokenizer.unk_token_id in ids or len(ids) > task.max_length - 1
            if not refuse:
                room = task.max_length - len(ids) if task.kind == "causal_lm" else task.max_length
                truncate = len(tokenizer(text)["input_ids"]) > room
        tally[f"{_attempt(trainer, guards[name], EditExample(text, target), refuse, truncate)} ({name})"] += 1

    case()
    return tally


# ------------------------------------------------------------------------------------------------ PMET requests
_PIECE = st.one_of(st.sampled_from(["", " ", "{", "}", "{}", "{0}", "{x}", "w5 ", " w6"]), st.text(max_size=8))
FIELD = st.one_of(TEXT, WRONG_TYPE, st.just(DELETE))


@st.composite
def _request_fields(draw: st.DrawFn) -> dict[str, Any]:
    source = draw(st.sampled_from(["text", "braces", "braces", "any"]))
    if source == "braces":
        subject: Any = draw(st.sampled_from(["a{b", "}", "{}", "S", "{x}", "x}}y", "{{", "{0}"]))
    else:
        subject = draw(NONBLANK if source == "text" else FIELD)
    shape = draw(st.sampled_from(["literal", "literal", "slot", "free"]))
    before, after = draw(_PIECE), draw(_PIECE)
    if shape == "literal" and isinstance(subject, str) and subject != DELETE:
        prompt: Any = before + subject + after
    elif shape == "slot":
        prompt = before + "{}" + after
    else:
        prompt = draw(FIELD)
    return {"prompt": prompt, "subject": subject, "target": draw(st.one_of(NONBLANK, NONBLANK, NONBLANK, FIELD))}


def _characters(text: str, **_: Any) -> dict[str, list[int]]:
    """A tokenizer with one token per character, so token positions are string positions."""
    return {"input_ids": [ord(c) for c in text]}


@_register("PMET requests")
def fuzz_pmet_requests(max_examples: int) -> Counter:
    tokenizer, tally = tiny_tokenizer(), Counter()

    @fuzz_settings(max_examples)
    @given(fields=_request_fields(), from_record=st.booleans(), text_key=st.booleans())
    def case(fields: dict[str, Any], from_record: bool, text_key: bool) -> None:
        usable = all(_string_ok(v) and v != DELETE for v in fields.values())
        prompt, subject = fields["prompt"], fields["subject"]
        try:
            if from_record:
                names = {"prompt": "text" if text_key else "prompt", "subject": "subject", "target": "target"}
                record = {names[k]: v for k, v in fields.items() if v != DELETE}
                request = EditRequest.from_record(record)
            else:
                values = {k: None if v == DELETE else v for k, v in fields.items()}
                request = EditRequest(values["prompt"], values["subject"], values["target"])
        except InvalidExampleError as error:
            tally[outcome_label(error)] += 1
            return
        assert usable, f"accepted an unusable request {fields!r}"
        assert "{}" in prompt or subject in prompt
        # the template has exactly one slot, an anonymous one; the unescaped text before it, then the subject, start
        # the request's text
        parts = list(string.Formatter().parse(request.template))
        slots = [i for i, (_, field, _, _) in enumerate(parts) if field is not None]
        assert len(slots) == 1 and parts[slots[0]][1] == "", (request.template, parts)
        prefix = "".join(literal for literal, _, _, _ in parts[: slots[0] + 1])
        assert request.text.startswith(prefix + subject), (request.text, prefix, subject)
        if "{}" not in prompt:
            assert request.text == prompt, (request.text, prompt)
        # PMET reads at the subject's last token: with one token per character that is the end of prefix + subject
        encoded = encode(_characters, request.template, subject)
        assert encoded.lookup == len(prefix) + len(subject) - 1, (encoded.lookup, prefix, subject)
        assert encode(tokenizer, request.template, subject).lookup >= 0
        tally["accepted"] += 1

    case()
    return tally
