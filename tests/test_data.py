"""Dataset loaders: values, counts and precise errors on small files written here, plus the real shared files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pytest

from transformer_patcher.data import (
    ZSRE_SAMPLE,
    DatasetFormatError,
    find_data_file,
    load_counterfact,
    load_fever,
    load_zsre,
    to_edit_examples,
)
from transformer_patcher.editing.tasks import EditExample
from transformer_patcher.errors import PatcherError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

FEVER = [
    {"id": 1, "label": "SUPPORTS", "claim": "Paris is in France.", "evidence": []},
    {"id": 2, "label": "NOT ENOUGH INFO", "claim": "Tilda Swinton is a vegan.", "evidence": []},
    {"id": 3, "label": "REFUTES", "claim": "The Moon is made of cheese.", "evidence": []},
]
ZSRE = [
    {
        "subject": "UniFirst",
        "src": "What is the product made by UniFirst?",
        "pred": "uniform",
        "rephrase": "What will be the product of UniFirst?",
        "alt": "unmanned aircraft",
        "answers": ["uniform", "uniforms"],
        "loc": "nq question: john goodman's character in the big lebowski",
        "loc_ans": "Walter Sobchak",
        "cond": "",
    },
    {
        "subject": "Ada",
        "src": "Who wrote Ada?",
        "rephrase": "Ada was written by?",
        "answers": ["Nabokov"],
        "loc": "who is the president",
        "loc_ans": "someone",
    },
]
CF = [
    {
        "case_id": 1,
        "prompt": "David Robinson professionally plays the sport",
        "target_new": "baseball",
        "subject": "David Robinson",
        "ground_truth": "basketball",
        "rephrase_prompt": "David Robinson's greatest weakness is",
        "locality_prompt": "Shaquille O'Neal plays",
        "locality_ground_truth": "basketball",
    },
    {
        "case_id": 2,
        "prompt": "{} is located in",
        "target_new": {"str": "Rome"},
        "subject": "The Eiffel Tower",
        "ground_truth": {"str": "Paris"},
        "rephrase_prompt": "Where is the Eiffel Tower? It is in",
        "locality_prompt": "The Louvre is in",
        "locality_ground_truth": "Paris",
    },
]


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_json(path: Path, records: list[Any]) -> Path:
    path.write_text(json.dumps(records, indent=1))
    return path


# ------------------------------------------------------------------------------------------------ values
def test_fever_binary_drops_nei(tmp_path: Path) -> None:
    ds = load_fever(write_jsonl(tmp_path / "f.jsonl", FEVER))
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == ["text", "label"]
    assert ds["text"] == ["Paris is in France.", "The Moon is made of cheese."]
    assert ds["label"] == [1, 0]
    assert load_fever(tmp_path / "f.jsonl", drop_nei=False)["label"] == [1, -1, 0]


def test_zsre_columns_and_prefix_stripped(tmp_path: Path) -> None:
    ds = load_zsre(write_json(tmp_path / "z.json", ZSRE))
    assert ds.column_names == ["text", "target", "rephrase", "loc", "loc_ans", "subject"]
    assert len(ds) == 2
    row = ds[0]
    assert row["text"] == "What is the product made by UniFirst?"
    assert row["target"] == "uniform"
    assert row["rephrase"] == "What will be the product of UniFirst?"
    assert row["loc"] == "john goodman's character in the big lebowski"
    assert row["loc_ans"] == "Walter Sobchak"
    assert row["subject"] == "UniFirst"
    assert ds[1]["loc"] == "who is the president"


def test_counterfact_formats_subject_and_accepts_dict_targets(tmp_path: Path) -> None:
    ds = load_counterfact(write_json(tmp_path / "c.json", CF))
    assert ds.column_names == ["text", "target", "ground_truth", "rephrase", "loc", "loc_ans", "subject"]
    assert ds["text"] == ["David Robinson professionally plays the sport", "The Eiffel Tower is located in"]
    assert ds["target"] == ["baseball", "Rome"]
    assert ds["ground_truth"] == ["basketball", "Paris"]
    assert ds[0]["loc"] == "Shaquille O'Neal plays" and ds[0]["loc_ans"] == "basketball"


def test_to_edit_examples(tmp_path: Path) -> None:
    fever = to_edit_examples(load_fever(write_jsonl(tmp_path / "f.jsonl", FEVER)), "fever")
    assert fever == [EditExample("Paris is in France.", 1), EditExample("The Moon is made of cheese.", 0)]
    zsre = to_edit_examples(load_zsre(write_json(tmp_path / "z.json", ZSRE)), "zsre")
    assert zsre[0] == EditExample(
        "What is the product made by UniFirst?",
        "uniform",
        rephrases=("What will be the product of UniFirst?",),
        locality=(("john goodman's character in the big lebowski", "Walter Sobchak"),),
        subject="UniFirst",
    )
    cf = to_edit_examples(load_counterfact(write_json(tmp_path / "c.json", CF)), "counterfact")
    assert cf[1] == EditExample(
        "The Eiffel Tower is located in",
        "Rome",
        rephrases=("Where is the Eiffel Tower? It is in",),
        locality=(("The Louvre is in", "Paris"),),
        subject="The Eiffel Tower",
    )
    with pytest.raises(ValueError, match="unknown dataset kind"):
        to_edit_examples(datasets.Dataset.from_list([{"text": "a"}]), "squad")


# ------------------------------------------------------------------------------------------------ errors
def _expect(loader: Any, path: Path, *parts: str) -> None:
    with pytest.raises(DatasetFormatError) as info:
        loader(path)
    assert isinstance(info.value, PatcherError) and isinstance(info.value, ValueError)
    for part in (path.name, *parts):
        assert part in str(info.value), (part, str(info.value))


def test_fever_bad_json_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(FEVER[0]) + "\n{not json\n")
    _expect(load_fever, path, "line 2", "invalid JSON")


def test_fever_missing_claim(tmp_path: Path) -> None:
    records = [FEVER[0], FEVER[2], {"id": 9, "label": "SUPPORTS"}]
    _expect(load_fever, write_jsonl(tmp_path / "noclaim.jsonl", records), "line 3", "'claim'")


def test_fever_bad_label(tmp_path: Path) -> None:
    records = [{"claim": "x", "label": "MAYBE"}]
    _expect(load_fever, write_jsonl(tmp_path / "badlabel.jsonl", records), "line 1", "'label'", "MAYBE")


def test_zsre_empty_answers(tmp_path: Path) -> None:
    records = [ZSRE[0], {**ZSRE[1], "answers": []}]
    _expect(load_zsre, write_json(tmp_path / "noans.json", records), "record 1", "'answers'")


def test_counterfact_missing_target_new(tmp_path: Path) -> None:
    records = [CF[0], CF[1], {k: v for k, v in CF[0].items() if k != "target_new"}]
    _expect(load_counterfact, write_json(tmp_path / "notarget.json", records), "record 2", "'target_new'", "missing")


def test_missing_file(tmp_path: Path) -> None:
    for loader in (load_fever, load_zsre, load_counterfact):
        with pytest.raises(FileNotFoundError, match=r"nowhere\.json"):
            loader(tmp_path / "nowhere.json")


def test_url_path_uses_load_dataset_and_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "https://example.org/zsre.json"
    calls: list[tuple[Any, ...]] = []

    def fake_load_dataset(builder: str, *, data_files: str, split: str) -> datasets.Dataset:
        calls.append((builder, data_files, split))
        return datasets.Dataset.from_list([ZSRE[1], {**ZSRE[1], "answers": []}][: 1 if len(calls) == 1 else 2])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_zsre(url)["target"] == ["Nabokov"]
    assert calls == [("json", url, "train")]
    with pytest.raises(DatasetFormatError, match=r"zsre\.json: record 1: field 'answers'"):
        load_zsre(url)


def test_find_data_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a" / "fever").mkdir(parents=True)
    (tmp_path / "a" / "fever" / "x.jsonl").write_text("")
    (tmp_path / "b" / "fever").mkdir(parents=True)
    (tmp_path / "b" / "fever" / "x.jsonl").write_text("")
    monkeypatch.setenv("TRANSFORMER_PATCHER_DATA", str(tmp_path / "b"))
    assert find_data_file("fever/x.jsonl", tmp_path / "a") == tmp_path / "a" / "fever" / "x.jsonl"
    assert find_data_file("fever/x.jsonl", None) == tmp_path / "b" / "fever" / "x.jsonl"
    with pytest.raises(FileNotFoundError) as info:
        find_data_file("fever/missing.jsonl", tmp_path / "a")
    message = str(info.value)
    assert str(tmp_path / "a" / "fever" / "missing.jsonl") in message
    assert str(tmp_path / "b" / "fever" / "missing.jsonl") in message


# ------------------------------------------------------------------------------------------------ real files
@pytest.mark.skipif(not SHARED.is_dir(), reason="shared data folder not present")
def test_real_files_counts() -> None:
    fever = load_fever(find_data_file("fever/paper_dev.jsonl", SHARED))
    assert len(fever) == 6666
    assert sorted(set(fever["label"])) == [0, 1] and sum(fever["label"]) == 3333
    zsre = load_zsre(find_data_file("zsre/zsre_mend_train-1k.json", SHARED))
    assert len(zsre) == 1000
    assert not any(loc.startswith("nq question: ") for loc in zsre["loc"])
    cf = load_counterfact(find_data_file("counterfact/counterfact-edit-1k.json", SHARED))
    assert len(cf) == 1000
    examples = to_edit_examples(cf, "counterfact")
    assert examples[0].text == "David Robinson professionally plays the sport" and examples[0].target == "baseball"


def test_embedded_zsre_sample_is_the_default_and_small() -> None:
    """load_zsre() without a path reads the packaged sample: real records, offline, within the 300 KB budget."""
    sample = load_zsre()
    assert len(sample) == 40
    assert sample[0]["text"] == "What is the product made by UniFirst?" and sample[0]["target"] == "uniform"
    examples = to_edit_examples(sample, "zsre")
    assert all(e.text and e.target and e.rephrases and e.locality for e in examples)
    samples = [path for path in ZSRE_SAMPLE.parent.iterdir() if path.suffix == ".json"]
    assert sum(path.stat().st_size for path in samples) < 300_000  # the budget for everything embedded
    provenance = (ZSRE_SAMPLE.parent / "README.md").read_text()
    assert all(f"`{path.name}`" in provenance for path in samples)  # each file has its provenance
