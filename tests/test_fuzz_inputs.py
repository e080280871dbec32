"""Bad data and arguments: every fuzz campaign of ``fuzz_inputs`` at a small count, plus one regression test per bug
the campaigns found (each names the input that used to break)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import fuzz_inputs
from fuzzing import CAMPAIGNS
from tiny_models import build
from tiny_tokenizer import sentence, tiny_tokenizer
from transformer_patcher import PatcherConfig, get_patcher_model
from transformer_patcher.core.errors import InvalidExampleError
from transformer_patcher.core.tasks import InputTruncatedWarning
from transformer_patcher.data import DatasetFormatError, load_counterfact, load_fever, load_zsre
from transformer_patcher.methods.patcher import CausalLMTask, EditConfig, EditExample, task_for_model
from transformer_patcher.methods.pmet import PMETHyperParams
from transformer_patcher.methods.pmet.requests import EditRequest, encode


@pytest.mark.parametrize("name", fuzz_inputs.NAMES)
def test_campaign(name: str) -> None:
    tally = CAMPAIGNS[name](30)
    assert sum(tally.values()) >= 20  # hypothesis may stop early on a small search space, never on zero cases
    assert any(label.startswith("refused") for label in tally), tally


# ------------------------------------------------------------------------------------------------ loaders
ZSRE = {
    "subject": "Ada",
    "src": "Who wrote Ada?",
    "rephrase": "Ada's author?",
    "answers": ["N"],
    "loc": "q",
    "loc_ans": "a",
}


def _write(tmp_path: Path, name: str, data: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def _refused(loader: Any, path: Path, *parts: str) -> None:
    with pytest.raises(DatasetFormatError) as info:
        loader(path)
    for part in (str(path), *parts):
        assert part in str(info.value), (part, str(info.value))


@pytest.mark.parametrize("label", [[1], {"a": 1}, ["SUPPORTS"]])
def test_fever_unhashable_label_names_the_line(tmp_path: Path, label: object) -> None:
    """Was: TypeError: unhashable type: 'list' (``label in FEVER_LABELS``)."""
    path = _write(
        tmp_path,
        "f.jsonl",
        json.dumps({"claim": "c", "label": "SUPPORTS"}) + "\n" + json.dumps({"claim": "c", "label": label}),
    )
    _refused(load_fever, path, "line 2", "'label'")


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    """Was: a bare UnicodeDecodeError without the file."""
    path = _write(tmp_path, "f.jsonl", b'{"claim": "a", "label": "SUPPORTS"}\n{"claim": "\xff", "label": "SUPPORTS"}\n')
    _refused(load_fever, path, "line 2", "not valid UTF-8")


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_lone_surrogate_escape_names_the_record(tmp_path: Path, fmt: str) -> None:
    """``"\\ud800"`` is valid JSON but not text. Was: UnicodeEncodeError from Arrow, no file or record named."""
    records = [ZSRE, {**ZSRE, "src": "x\ud800"}]
    text = json.dumps(records) if fmt == "json" else "\n".join(json.dumps(r) for r in records)
    assert "\\ud800" in text
    _refused(load_zsre, _write(tmp_path, f"z.{fmt}", text), "record 1" if fmt == "json" else "line 2", "'src'")


@pytest.mark.parametrize("name", ["z.json", "z.jsonl"])
def test_deeply_nested_json_is_a_format_error(tmp_path: Path, name: str) -> None:
    """Was: RecursionError from the json module."""
    _refused(load_zsre, _write(tmp_path, name, "[" * 100_000 + "]" * 100_000), "nested too deeply")
    _refused(load_zsre, _write(tmp_path, "x.jsonl", '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"), "line 1")


def test_unicode_line_separators_inside_jsonl_strings(tmp_path: Path) -> None:
    """``json.dumps(ensure_ascii=False)`` writes U+2028, U+0085 and \\x1c raw; they are text, not line ends.
    Was: str.splitlines cut the record apart ("invalid JSON")."""
    claim = "a\u2028b\x85c\x1cd\u2029e"
    path = _write(tmp_path, "f.jsonl", json.dumps({"claim": claim, "label": "REFUTES"}, ensure_ascii=False) + "\n")
    assert load_fever(path).to_list() == [{"text": claim, "label": 0}]


def test_byte_order_mark_is_skipped(tmp_path: Path) -> None:
    """Was: "line 1: invalid JSON (Unexpected UTF-8 BOM)" for a JSON list saved by Windows tools."""
    path = _write(tmp_path, "z.json", b"\xef\xbb\xbf" + json.dumps([ZSRE]).encode())
    assert load_zsre(path)["text"] == ["Who wrote Ada?"]


def test_zsre_loc_that_is_only_the_prefix_is_refused(tmp_path: Path) -> None:
    """Was: accepted with an empty ``loc``, which fails later inside evaluation."""
    path = _write(tmp_path, "z.json", json.dumps([ZSRE, {**ZSRE, "loc": "nq question:  "}]))
    _refused(load_zsre, path, "record 1", "'loc'")


def test_documented_text_is_kept_as_is(tmp_path: Path) -> None:
    """NUL, zero-width, right-to-left, astral and 50k-character strings load unchanged; unknown fields are ignored."""
    texts = ["a\x00b", "\u200b", "\u202eevil", "𝔘😀", "x" * 50_000]
    records = [{"claim": t, "label": "SUPPORTS", "extra": [1, {"a": None}]} for t in texts]
    path = _write(tmp_path, "f.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in records))
    assert load_fever(path)["text"] == texts


def test_nei_only_and_empty_files_say_no_usable_records(tmp_path: Path) -> None:
    _refused(load_fever, _write(tmp_path, "e.jsonl", ""), "no usable records")
    path = _write(tmp_path, "n.jsonl", json.dumps({"claim": "c", "label": "NOT ENOUGH INFO"}))
    _refused(load_fever, path, "no usable records")


def test_counterfact_target_dict_without_text(tmp_path: Path) -> None:
    record = {
        "prompt": "{} is in",
        "subject": "S",
        "target_new": {"str": 5},
        "ground_truth": "g",
        "rephrase_prompt": "r",
        "locality_prompt": "l",
        "locality_ground_truth": "g",
    }
    _refused(load_counterfact, _write(tmp_path, "c.json", json.dumps([record])), "record 0", "'target_new'")


def test_path_of_the_wrong_type() -> None:
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike, got int"):
        load_zsre(5)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize(
    "bad",
    [
        {"lr": math.nan},
        {"lr": math.inf},
        {"weight_decay": -0.1},
        {"grad_clip": math.nan},
        {"grad_clip": 0.0},
        {"repeats": 2.5},
        {"max_steps": True},
        {"lr_factor": 1.0},  # was: accepted, then ReduceLROnPlateau raised inside the first edit
        {"seed": 2**64},  # was: accepted, then torch.manual_seed overflowed inside the first edit
        {"seed": -1},
        {"act_margin": math.inf},
        {"memory_loss_weight": -1.0},
        {"dropout": "yes"},
        {"early_patience": -1},
        {"lr": "0.01"},  # was: TypeError '<=' not supported between 'str' and 'int'
        {"max_patches": 0},
        {"give_up_after": 0},
        {"init": "random"},
        {"solve_margin": math.nan},
    ],
)
def test_edit_config_names_the_bad_field(bad: dict) -> None:
    (name,) = bad
    with pytest.raises(ValueError, match=name):
        EditConfig(**bad)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_modules": 5}, "target_modules"),
        ({"target_modules": ["a", 1]}, "target_modules"),
        ({"target_modules": ""}, "target_modules"),
        ({"key_module": 5}, "key_module"),
        ({"patch_activation": []}, "patch_activation"),  # was: TypeError unhashable type: 'list'
    ],
)
def test_patcher_config_names_the_bad_field(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PatcherConfig(**kwargs)


def test_patcher_config_accepts_a_tuple_of_module_names() -> None:
    assert PatcherConfig(target_modules=("mlp.down_proj",)).target_modules == ["mlp.down_proj"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layers": 5}, "layers"),  # was: TypeError 'int' object is not iterable
        ({"layers": (-1, 0)}, "layers"),  # was: accepted although -1 is the deepest block
        ({"context_template_lengths": ((1.5, 2),)}, "context_template_lengths"),  # was: accepted
        ({"context_template_lengths": (("a", "b"),)}, "context_template_lengths"),  # was: TypeError
        ({"context_template_lengths": 5}, "context_template_lengths"),  # was: TypeError
        ({"extra": None}, "extra"),
    ],
)
def test_pmet_hparams_name_the_bad_field(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PMETHyperParams(**kwargs)


# ------------------------------------------------------------------------------------------------ edit inputs
def _task(name: str, **kwargs: Any):
    model = get_patcher_model(build(name)).eval()
    return model, task_for_model(model, tiny_tokenizer(), **kwargs)


@pytest.mark.parametrize("name", ["bert", "gpt2", "bart"])
def test_inputs_longer_than_the_model_are_truncated_with_a_warning(name: str) -> None:
    """Was: IndexError/RuntimeError deep in the model for inputs beyond its 64 positions (max_length was 128)."""
    model, task = _task(name)
    assert task.max_length == 64  # for_model lowers max_length to the model's positions
    target: int | str = 1 if task.kind == "classification" else sentence(70, 71)
    with pytest.warns(InputTruncatedWarning, match="truncated"):
        batch = task.batch_for(model, [(sentence(*range(10, 110)), target)])
    assert batch.inputs["input_ids"].shape[1] == 64
    with torch.no_grad():
        model(**batch.model_kwargs())


def test_causal_prompt_keeps_room_for_the_answer() -> None:
    model, task = _task("gpt2")
    with pytest.warns(InputTruncatedWarning):
        batch = task.batch_for(model, [(sentence(*range(10, 110)), sentence(70, 71, 72))])
    assert batch.inputs["input_ids"][0, -3:].tolist() == [70, 71, 72]
    assert batch.labels.tolist() == [70, 71, 72]


@pytest.mark.parametrize("name", ["gpt2", "bart"])
def test_target_longer_than_max_length_is_refused(name: str) -> None:
    model, task = _task(name)
    with pytest.raises(InvalidExampleError, match="at most 63 fit"):
        task.batch_for(model, [(sentence(5), sentence(*([70] * 64)))])


def test_task_built_with_too_large_max_length_is_refused_by_the_model_check() -> None:
    model = get_patcher_model(build("gpt2")).eval()
    task = CausalLMTask(tiny_tokenizer(), max_length=128)
    with pytest.warns(InputTruncatedWarning), pytest.raises(InvalidExampleError, match=r"model has 64 positions"):
        task.batch_for(model, [(sentence(*range(10, 200)), sentence(70))])


def test_short_inputs_do_not_warn() -> None:
    model, task = _task("bert")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task.batch_for(model, [(sentence(5, 6), 1)])


@pytest.mark.parametrize("label", [np.int64(1), torch.tensor(1)])
def test_integer_scalar_labels_are_accepted(label: object) -> None:
    model, task = _task("bert")
    assert task.batch_for(model, [(sentence(5, 6), label)]).labels.tolist() == [1]  # type: ignore[list-item]


@pytest.mark.parametrize("label", [np.bool_(True), np.float64(1.0), torch.tensor(1.0)])
def test_non_integer_scalar_labels_are_refused(label: object) -> None:
    model, task = _task("bert")
    with pytest.raises(InvalidExampleError, match="outside the classifier head"):
        task.batch_for(model, [(sentence(5, 6), label)])  # type: ignore[list-item]


def test_non_text_input_is_refused() -> None:
    model, task = _task("gpt2")
    with pytest.raises(InvalidExampleError, match="must be text"):
        task.batch_for(model, [(b"w5", sentence(70))])  # type: ignore[list-item]


def test_unicode_input_maps_to_unknown_tokens() -> None:
    model, task = _task("gpt2")
    text = "\x00 \u200b \u202eevil 𝔘😀"
    batch = task.batch_for(model, [(text, sentence(70))])
    assert batch.inputs["input_ids"][0, 1:5].tolist() == [task.tokenizer.unk_token_id] * 4


def test_edit_example_refusal_leaves_the_trainer_untouched() -> None:
    trainer = fuzz_inputs._trainer("gpt2")
    guard = fuzz_inputs._Guard(trainer)
    with pytest.raises(InvalidExampleError, match="at most 63 fit"):
        trainer.edit(EditExample(sentence(5), sentence(*([70] * 80))), edit_id=3)
    guard.assert_unchanged()


# ------------------------------------------------------------------------------------------------ PMET requests
def test_subject_with_braces_keeps_the_prompt() -> None:
    """Was: the escaped prompt no longer contained the subject, so ``text`` silently lost it."""
    request = EditRequest("x a{b y", "a{b", "t")
    assert request.template == "x {} y"
    assert request.text == "x a{b y"


@pytest.mark.parametrize("prompt", ["{} is {x}", "{} and {}", "{} of {0}"])
def test_slot_prompt_with_other_braces_is_refused(prompt: str) -> None:
    """Was: accepted, then KeyError/IndexError from ``str.format`` when PMET encoded it."""
    with pytest.raises(InvalidExampleError, match="not a usable template"):
        EditRequest(prompt, "S", "t")


def test_encode_finds_the_subject_after_literal_braces() -> None:
    """Was: the subject's last token was located in the escaped text ("{{"), off by one per brace."""

    def characters(text: str, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    request = EditRequest("w5 {w9} w6 w7", "w6", "t")
    encoded = encode(characters, request.template, request.subject)
    assert "".join(chr(i) for i in encoded.ids) == "w5 {w9} w6 w7"
    assert encoded.lookup == len("w5 {w9} w6") - 1


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"text": "S x", "subject": "S"}, "no target"),
        ({"prompt": "S x", "target": "t"}, "no subject"),
        ({"text": 5, "subject": "S", "target": "t"}, "prompt must be text, got int"),  # was: str(5) accepted
        ({"text": "S x", "subject": "S", "target": ["t"]}, "target must be text"),
        ({"text": "S x", "subject": "", "target": "t"}, "subject is empty"),
    ],
)
def test_from_record_refuses_absent_or_non_text_fields(record: dict, match: str) -> None:
    with pytest.raises(InvalidExampleError, match=match):
        EditRequest.from_record(record)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"folds": float("nan")}, "folds must be an integer"),  # was: accepted
        ({"memory_rows": float("inf")}, "memory_rows must be an integer"),
        ({"max_examples": -3}, "max_examples must be >= 1"),
        ({"eval_every": 0}, "eval_every must be >= 1"),
        ({"batch_size": 2.5}, "batch_size must be an integer"),
        ({"folds": "a"}, "folds must be an integer"),  # was: TypeError
        ({"finetune_options": {"lr": float("nan")}}, "FineTuneConfig.lr must be a finite number"),
        ({"finetune_options": {"max_step": 3}}, r"unknown fine-tuning option\(s\) \['max_step'\]; valid: .*max_steps"),
        ({"edit_options": {"learning_rate": 1.0}}, r"unknown edit option\(s\) \['learning_rate'\]; valid: .*lr"),
        ({"edit_options": None}, "edit_options must be a dict"),
    ],
)
def test_experiment_config_names_the_bad_field(kwargs: dict, match: str) -> None:
    from transformer_patcher.experiments.sme.experiment import ExperimentConfig

    with pytest.raises(ValueError, match=match):
        ExperimentConfig(model="tiny", **kwargs)
