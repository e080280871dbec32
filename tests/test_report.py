"""Fold summaries and tables, benchmark assembly, and patch-set files (info, undo) against hand-computed values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from transformer_patcher import PatcherConfig, get_patcher_model
from transformer_patcher.core.errors import AdapterFileError
from transformer_patcher.data.benchmarks import embedded_memory, fever_benchmark, interleave, text_pairs, zsre_benchmark
from transformer_patcher.experiments.sme.report import markdown_table, summarize_folds
from transformer_patcher.tuners.patcher.patch_set import describe_patch_set, read_edit_log, remove_edit_from_files


def _record(needed: bool, correct: bool = True, rephrases=(), seconds: float = 1.0, neurons: int = 1) -> dict:
    row = {"needed": needed, "seconds": seconds if needed else 0.0, "steps": 10 if needed else 0}
    row["neurons"] = neurons if needed else 0
    if needed:
        row |= {"edit_correct": correct, "rephrase_correct": list(rephrases)}
    return row


def test_summary_pools_edits_and_averages_fold_metrics() -> None:
    folds = [
        {
            "records": [_record(True, True, [True, False], 2.0), _record(False), _record(True, False, [False], 4.0)],
            "evaluations": [{"edits": 2, "metrics": {"ER": 0.5, "locality": 1.0}}],
        },
        {
            "records": [_record(True, True, [True], 6.0, neurons=3)],
            "evaluations": [{"edits": 1, "metrics": {"ER": 1.0, "locality": 0.9}}],
        },
    ]
    summary = summarize_folds(folds)
    assert summary["edits"] == 3 and summary["examples"] == 4 and summary["neurons"] == 5
    assert summary["SR"] == pytest.approx(2 / 3)  # pooled over the three edits
    assert summary["GR"] == pytest.approx(2 / 4)  # pooled over the four rephrases
    assert summary["ER"] == pytest.approx(0.75) and summary["locality"] == pytest.approx(0.95)
    assert summary["seconds_per_edit"] == 4.0
    assert "TrainR" not in summary
    with pytest.raises(ValueError, match="no folds"):
        summarize_folds([])


def test_markdown_table_shows_missing_metrics_as_na() -> None:
    table = markdown_table([{"editor": "A", "SR": 1.0, "ER": 0.5, "edits": 3}, {"editor": "B", "SR": 0.25, "GR": 0.5}])
    lines = table.splitlines()
    assert lines[0] == "| editor | SR | GR | ER | edits |"
    assert lines[2] == "| A | 1.000 | n/a | 0.500 | 3 |"
    assert lines[3] == "| B | 0.250 | 0.500 | n/a | n/a |"


def test_text_pairs_and_interleave() -> None:
    pairs = text_pairs(" ".join(f"t{i}" for i in range(10)), words=4)
    assert pairs == [("t0", "t1 t2 t3"), ("t4", "t5 t6 t7")]  # the incomplete tail is dropped
    assert interleave([1, 2, 3], ["a"]) == [1, "a", 2, 3]


def test_embedded_zsre_benchmark_is_self_contained() -> None:
    bench = zsre_benchmark()
    memory, validation = embedded_memory()
    assert len(bench.examples) == 40 and bench.memory == memory and bench.validation == validation
    assert len(bench.eval_sets["locality"]) == 40
    assert not set(memory) & set(validation)
    inputs = {text for text, _ in memory}
    assert not inputs & ({e.text for e in bench.examples} | {text for text, _ in bench.eval_sets["locality"]})
    assert len(bench.head(5).examples) == 5 and len(bench.examples) == 40
    with pytest.raises(ValueError, match="positive"):
        bench.head(0)


SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared data folder not present")
def test_fever_splits_are_disjoint() -> None:
    bench = fever_benchmark(SHARED)
    edit = {e.text for e in bench.examples}
    train, test = ({t for t, _ in bench.eval_sets[k]} for k in ("train", "test"))
    memory, validation = {t for t, _ in bench.memory}, {t for t, _ in bench.validation}
    assert len(bench.eval_sets["train"]) == 1000 and len(bench.eval_sets["test"]) == 1000
    assert not memory & train and not memory & validation
    assert not edit & test
    assert not edit & {t for t, _ in bench.extra["finetune"]}  # the classifier never trains on the edit stream
    assert "GR" in bench.notes


# ------------------------------------------------------------------------------------------- patch files
@pytest.fixture
def saved(tmp_path: Path) -> Path:
    from tiny_tokenizer import sharp_gpt2

    model = get_patcher_model(sharp_gpt2(), PatcherConfig())
    layer = model.base_model.patch_layer()
    d = layer.query_dim
    generator = torch.Generator().manual_seed(0)
    for edit_id, n in ((4, 2), (9, 1)):
        keys, values = torch.randn(n, d, generator=generator), torch.randn(n, 32, generator=generator)
        layer.add_patches(keys, torch.zeros(n), values, edit_id)
        layer.commit()
    layer.add_patches(torch.randn(1, d, generator=generator), 0.0, torch.randn(1, 32, generator=generator), 9)
    model.save_pretrained(tmp_path / "p")
    (tmp_path / "p" / "edits.jsonl").write_text(
        json.dumps({"edit_id": 4, "text": "a", "target": "b"})
        + "\n"
        + json.dumps({"edit_id": 9, "text": "c", "target": "d"})
        + "\n"
    )
    return tmp_path / "p"


def test_info_counts_neurons_per_edit(saved: Path) -> None:
    info = describe_patch_set(saved)
    assert info.neurons_per_edit == {4: 2, 9: 2} and info.num_patches == 4
    assert info.edits[4]["text"] == "a"
    assert info.to_dict()["edits"][0] == {"edit_id": 4, "neurons": 2, "text": "a", "target": "b"}


def test_undo_removes_one_edit_and_keeps_the_rest_loadable(saved: Path) -> None:
    from tiny_tokenizer import sharp_gpt2
    from transformer_patcher import PatcherModel

    def loaded() -> dict[str, torch.Tensor]:
        layer = PatcherModel.from_pretrained(sharp_gpt2(), saved).patch_layer()
        names = ("patch_frozen_keys", "patch_keys")
        return {name: getattr(layer, name)["default"].detach().clone() for name in names} | {"ids": layer.edit_ids()}

    before = loaded()
    assert remove_edit_from_files(saved, 4) == 2
    assert describe_patch_set(saved).neurons_per_edit == {9: 2}
    assert [e["edit_id"] for e in read_edit_log(saved)] == [9]
    after = loaded()
    assert before["ids"].tolist() == [4, 4, 9, 9] and after["ids"].tolist() == [9, 9]
    assert torch.equal(after["patch_frozen_keys"], before["patch_frozen_keys"][2:])
    assert torch.equal(after["patch_keys"], before["patch_keys"])  # the uncommitted neuron of edit 9 is kept


def test_undo_and_info_refuse_bad_folders(saved: Path, tmp_path: Path) -> None:
    weights = (saved / "adapter_model.safetensors").read_bytes()
    with pytest.raises(KeyError, match="no patches for edit id 5"):
        remove_edit_from_files(saved, 5)
    assert (saved / "adapter_model.safetensors").read_bytes() == weights
    (saved / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(AdapterFileError):
        describe_patch_set(saved)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterFileError, match="not a patch-set folder"):
        describe_patch_set(tmp_path / "empty")
    (saved / "edits.jsonl").write_text("{not json\n")
    with pytest.raises(AdapterFileError, match=r"edits\.jsonl: line 1"):
        read_edit_log(saved)
