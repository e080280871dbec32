"""Dataset loaders: values, counts and precise errors on small files written here, plus the real shared files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pytest

from transformer_patcher.core.errors import PatcherError
from transformer_patcher.core.examples import EditExample
from transformer_patcher.data import (
    ZSRE_SAMPLE,
    DatasetFormatError,
    find_data_file,
    load_counterfact,
    load_fever,
    load_neighbours,
    load_questions,
    load_zsre,
    to_edit_examples,
)
from transformer_patcher.data.benchmarks import counterfact_benchmark, generation_memory, zsre_benchmark
from transformer_patcher.data.neighbours import guess_subject, neighbours_of, question_template, subject_pool
from transformer_patcher.data.suite_data import detokenize_wikitext, section_openings, suite_sources

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


# ------------------------------------------------------------------------------ EasyEdit's zsRE convention
def test_zsre_alt_target_is_easyedits_convention(tmp_path: Path) -> None:
    path = write_json(tmp_path / "zsre.json", ZSRE)
    ours = load_zsre(path)
    assert ours["target"] == ["uniform", "Nabokov"] and "ground_truth" not in ours.column_names
    alt = load_zsre(path, target="alt")
    assert alt["target"] == ["unmanned aircraft"]  # the record without an alt is skipped, as EasyEdit does
    assert alt["ground_truth"] == ["uniform"]
    with pytest.raises(ValueError, match="target must be one of"):
        load_zsre(path, target="pred")
    no_alt = write_json(tmp_path / "no-alt.json", [ZSRE[1]])
    with pytest.raises(DatasetFormatError, match="empty alt"):
        load_zsre(no_alt, target="alt")


# ------------------------------------------------------------------------------ the evaluation suite's data
def test_suite_question_and_neighbour_files(tmp_path: Path) -> None:
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"text": "who wrote it?", "id": 1}\n\n{"text": "where is it?"}\n')
    assert load_questions(questions) == ["who wrote it?", "where is it?"]
    neighbours = tmp_path / "n.json"
    neighbours.write_text(json.dumps([{"text": "What is the capital of Peru?", "neighbours": ["... of Chile?"]}]))
    assert load_neighbours(neighbours) == {"What is the capital of Peru?": ["... of Chile?"]}
    for bad, message in (
        ('[{"text": "a"}, {"text": " "}]', r"q2\.json: record 1: field 'text' is not a non-empty string"),
        ('[{"text": "a", "neighbours": "b"}]', r"record 0: field 'neighbours' is not a non-empty list"),
    ):
        path = tmp_path / "q2.json"
        path.write_text(bad)
        with pytest.raises(DatasetFormatError, match=message):
            load_neighbours(path) if "neighbours" in bad else load_questions(path)


def test_guess_subject_and_template_neighbours() -> None:
    assert guess_subject("What is the capital of Australia?") == "Australia"
    assert guess_subject("Who was Lady Sarah Lennox's father?") == "Lady Sarah Lennox"
    assert guess_subject("What university did Watts Humphrey attend?") == "Watts Humphrey"
    assert guess_subject("who plays the drums in the band") is None
    assert question_template("What is {x} in Peru?", "Peru") == "What is {{x}} in {}?"
    found = neighbours_of("What is the capital of Australia?", "Australia", 3)
    assert len(found) == 3 and all(q.startswith("What is the capital of ") and "Australia" not in q for q in found)
    assert all(
        q.removeprefix("What is the capital of ").removesuffix("?") in subject_pool()["countries"] for q in found
    )
    people = neighbours_of("Where was Watts Humphrey born?", "Watts Humphrey", 2)
    assert all(q.removeprefix("Where was ").removesuffix(" born?") in subject_pool()["people"] for q in people)
    assert neighbours_of("who plays the drums", None, 3) == []
    assert neighbours_of("q", None, 2, found=["a", "q", "a", "b", "c"]) == ["a", "b"]


def test_benchmark_neighbours_come_from_the_data_and_never_from_the_stream(tmp_path: Path) -> None:
    records = [
        {**ZSRE[0], "src": f"What was {name}'s occupation?", "subject": name, "rephrase": "r"}
        for name in ("Ann Lee", "Bo Chan", "Cy Dore", "Di Eno")
    ]
    benchmark = zsre_benchmark(write_json(tmp_path / "zsre.json", records), data_dir=tmp_path).head(2)
    first, second = benchmark.neighbours(2)
    # records 2 and 3 share the template; records 0 and 1 are edits, so never each other's neighbours
    assert first == ["What was Cy Dore's occupation?", "What was Di Eno's occupation?"] == second
    counterfact = counterfact_benchmark(write_json(tmp_path / "cf.json", CF), data_dir=tmp_path)
    assert counterfact.neighbours(1)[0] == ["Shaquille O'Neal plays"]  # the case's own neighbourhood prompt first


def test_suite_sources_exclude_edits_and_read_openings() -> None:
    text = " \n = Title = \n \n " + " ".join(["word"] * 35) + " @-@ x , y . \n = = Part = = \n short line \n"
    assert section_openings(text, words=3) == ["word word word"]
    assert detokenize_wikitext("a @-@ b , c 's ( d )") == "a-b, c's (d)"
    embedded = suite_sources(embedded=True)
    assert embedded.origin == "embedded" and len(embedded.openings) == 64 and len(embedded.chat_questions) == 64
    assert len(embedded.unrelated) == len(set(embedded.unrelated)) >= 490  # 250 NQ + 250 CounterFact, deduplicated
    assert "@-@" not in " ".join(embedded.openings)
    first = embedded.unrelated[0]
    assert first not in suite_sources(embedded=True, exclude=[first]).unrelated


def test_generation_memory_never_reads_wikitext_test(tmp_path: Path) -> None:
    """WikiText-2 test is the suite's perplexity and generation text: the memory and validation read valid only."""
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "valid.txt").write_text(" ".join(f"v{i}" for i in range(24 * 50)))
    (tmp_path / "wikitext2" / "test.txt").write_text(" ".join(f"t{i}" for i in range(24 * 50)))
    (tmp_path / "counterfact").mkdir()
    write_json(tmp_path / "counterfact" / "counterfact-train.json", CF)
    memory, validation = generation_memory(tmp_path)
    words = " ".join(f"{a} {b}" for a, b in memory + validation).split()
    assert not any(word.startswith("t") and word[1:].isdigit() for word in words)
    assert len(validation) == 10 and not set(validation) & set(memory)  # a fifth of 50 chunks held out
