"""``Patcher``, the one-call front door, end to end on a tiny GPT-2 saved to disk; and loading its patch sets anywhere:
plain peft, transformers' ``load_adapter`` and ``AutoPeftModelForCausalLM``, in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from tiny_tokenizer import sharp_gpt2, tiny_tokenizer
from transformer_patcher import FixReport, InvalidExampleError, Patcher, UnknownModelError
from transformer_patcher.core.pretrained import SMOLLM2, cache_dir, portable_name
from transformer_patcher.core.tasks import task_for_model
from transformer_patcher.methods.patcher.trainer import PatchTrainer
from transformer_patcher.tuners.patcher.config import PATCHER, PatcherConfig
from workspace import build_workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_workspace(tmp_path_factory.mktemp("patcher"))


@pytest.fixture(scope="module")
def records(workspace: dict[str, Path]) -> list[dict]:
    return json.loads(workspace["zsre"].read_text())


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRANSFORMER_PATCHER_CACHE", str(tmp_path / "cache"))


def _open(workspace: dict[str, Path], patches: Path | None, **kwargs) -> Patcher:
    options = {"memory_rows": 300, "question_rows": 0, "progress": False, "data_dir": workspace["data"]} | kwargs
    return Patcher.from_pretrained(str(workspace["model"]), patches, **options)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


def test_fix_generate_undo_save_and_reload_in_a_fresh_process(workspace, records, tmp_path: Path) -> None:
    folder = tmp_path / "fixes"
    first, second = records[0], records[1]
    with _open(workspace, folder) as fixer:
        assert fixer.memory.name == "zsre" and fixer.memory.rows == 300
        assert fixer.task.prompt_format.name == "raw"  # the tiny tokenizer has no chat template
        wrong = fixer.generate(first["src"])
        assert not wrong.startswith(first["answers"][0])
        report = fixer.fix(
            first["src"], first["answers"][0], rephrases=[first["rephrase"]], locality=[second["src"], "w5 w6 w7"]
        )
        assert isinstance(report, FixReport) and report.needed and report.success
        assert report.edit_id == 1 and report.neurons >= 1 and report.seconds > 0
        assert report.answer.startswith(first["answers"][0])
        assert fixer.generate(first["src"]).startswith(report.answer)
        assert set(report.rephrases) == {first["rephrase"]}
        assert report.locality == {second["src"]: True, "w5 w6 w7": True}
        other = fixer.fix(second["src"], second["answers"][0])
        assert other.edit_id == 2
        assert fixer.undo(other.edit_id) == other.neurons
        assert fixer.generate(second["src"]) != other.answer or not other.answer.startswith(second["answers"][0])
        assert [e["edit_id"] for e in fixer.edits] == [1]
        with pytest.raises(KeyError, match="no edit with id 7"):
            fixer.undo(7)
        assert fixer.save() == folder
        prompts = [first["src"], second["src"], "w5 w6 w7"]
        expected = fixer.generate(prompts)
    log = [json.loads(line) for line in (folder / "edits.jsonl").read_text().splitlines()]
    assert log[0]["checks"]["locality"] == report.locality and log[0]["rephrases"] == [first["rephrase"]]
    card = (folder / "README.md").read_text()
    assert first["src"] in card and "[More Information Needed]" not in card
    assert f"`{workspace['model']}`" in card and "library_name: peft" in card
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(workspace["model"])
    script = f"""
import json, sys, torch
import transformer_patcher
from transformer_patcher import Patcher
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, folder, prompts = {str(workspace["model"])!r}, {str(folder)!r}, {prompts!r}
tokenizer = AutoTokenizer.from_pretrained(model_dir)
ids = tokenizer(prompts[0], return_tensors="pt")["input_ids"]
logits = []
peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), folder).eval()
logits.append(peft(ids).logits)
native = AutoModelForCausalLM.from_pretrained(model_dir).eval()
native.load_adapter(folder)
logits.append(native(ids).logits)
logits.append(AutoPeftModelForCausalLM.from_pretrained(folder).eval()(ids).logits)
base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
with Patcher.from_pretrained(model_dir, folder, memory="none", progress=False) as again:
    answers = again.generate(prompts)
print(json.dumps({{"agree": [float((l - logits[0]).abs().max()) for l in logits],
                  "moved": float((base(ids).logits - logits[0]).abs().max()), "answers": answers}}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["agree"] == [0.0, 0.0, 0.0]  # peft, transformers' load_adapter and AutoPeft load the same patches
    assert result["moved"] > 0  # and those patches change the model
    assert result["answers"] == expected


def test_easyedit_shaped_edit_returns_its_metric_layout(workspace, records, tmp_path: Path) -> None:
    cases = records[2:4]
    neighbours = ["w5 w6 w7", "w8 w9 w10"]
    with _open(workspace, None) as fixer:
        metrics = fixer.edit(
            prompts=[c["src"] for c in cases],
            target_new=[c["answers"][0] for c in cases],
            rephrase_prompts=[c["rephrase"] for c in cases],
            locality_inputs={"neighborhood": {"prompt": neighbours, "ground_truth": ["w11", "w12"]}},
        )
        assert fixer.session.num_patches > 0  # sequential edits are kept
        assert len(metrics) == 2
        for i, case in enumerate(metrics):
            assert case["case_id"] == i and case["edit_id"] == i + 1 and case["time"] > 0
            assert set(case["requested_rewrite"]) >= {"prompt", "target_new", "rephrase_prompt", "locality"}
            assert set(case["pre"]) == {"rewrite_acc", "rephrase_acc", "locality", "portability"}
            assert case["pre"]["rewrite_acc"][0] < 1.0 and case["post"]["rewrite_acc"] == [1.0]
            assert case["pre"]["locality"] == {}
            assert list(case["post"]["locality"]) == ["neighborhood_acc"]
            assert 0.0 <= case["post"]["locality"]["neighborhood_acc"][0] <= 1.0
        kept = fixer.session.num_patches
        single = fixer.edit(cases[0]["src"], "w120", sequential_edit=False)
        assert single[0]["post"]["rewrite_acc"] == [1.0] and single[0]["edit_id"] == 3
        assert fixer.session.num_patches == kept and 3 not in fixer.session.edit_ids()  # measured alone, undone
        with pytest.raises(InvalidExampleError, match="target_new has 1 entries for 2 prompts"):
            fixer.edit(["w90 w91", "w92 w93"], ["w100"])


def test_bad_input_is_one_clear_error_and_writes_nothing(workspace, tmp_path: Path) -> None:
    folder = tmp_path / "fixes"
    with pytest.raises(UnknownModelError, match="not a short name"):
        Patcher.from_pretrained("no-such-model-anywhere", folder, progress=False)
    assert list(tmp_path.iterdir()) == []  # no folder, no lock file
    not_a_folder = tmp_path / "patches.txt"
    not_a_folder.write_text("mine")
    with pytest.raises(FileExistsError, match="is a file"):
        _open(workspace, not_a_folder)
    assert not_a_folder.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["patches.txt"]
    with _open(workspace, folder) as fixer:
        fixer.fix("w90 w91 w92", "w100")
        fixer.save()
        saved = _files(folder)
        patches = fixer.session.num_patches
        for prompt, target, message in [
            ("   ", "w100", "empty"),
            ("w93 w94", "zzz-not-a-word", "cannot encode"),
            ("w93 w94", "", "empty"),
        ]:
            with pytest.raises(InvalidExampleError, match=message):
                fixer.fix(prompt, target)
        with pytest.raises(InvalidExampleError, match="empty"):
            fixer.fix("w93 w94", "w101", rephrases=[""])
        with pytest.raises(InvalidExampleError, match="list of strings"):
            fixer.fix("w93 w94", "w101", locality="w5 w6")
        assert fixer.session.num_patches == patches and len(fixer.edits) == 1
        with pytest.raises(FileExistsError, match="already exists"):
            fixer.save(not_a_folder)
    assert _files(folder) == saved


def test_auto_format_asks_a_chat_model_through_its_template(workspace, tmp_path: Path) -> None:
    model = tmp_path / "chat-model"
    model.mkdir()
    for item in workspace["model"].iterdir():
        (model / item.name).write_bytes(item.read_bytes())
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = "{% for m in messages %}w3 {{ m['content'] }} w2{% endfor %} w3"
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    options = {"memory_rows": 100, "question_rows": 0, "progress": False, "data_dir": workspace["data"]}
    with Patcher.from_pretrained(str(model), None, **options) as fixer:
        assert fixer.task.prompt_format.name == "chat" and fixer.memory.prompt_format == "chat"
    with Patcher.from_pretrained(str(model), None, prompt_format="raw", **options) as fixer:
        assert fixer.task.prompt_format.name == "raw"


def test_peft_type_has_a_value_and_serialises_as_its_name(tmp_path: Path) -> None:
    config = PatcherConfig()
    assert config.peft_type == "PATCHER" and config.peft_type.value == "PATCHER" and f"{PATCHER}" == "PATCHER"
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "PATCHER"


def test_a_converted_model_records_its_short_name_not_the_cache_path() -> None:
    assert portable_name(SMOLLM2) == SMOLLM2
    assert portable_name(str(cache_dir() / "smollm2-135m-instruct-fp32")) == SMOLLM2
    assert portable_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_load_adapter_sizes_committed_and_in_progress_patches(tmp_path: Path) -> None:
    """transformers fills existing tensors, so the layer must be sized from the config before it loads."""
    base = sharp_gpt2()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, PatcherConfig())
    layer = model.base_model.patch_layer()
    layer.add_patches(torch.randn(3, layer.query_dim), torch.zeros(3), torch.randn(3, layer.output_dim), 1)
    layer.commit()
    layer.add_patches(torch.randn(2, layer.query_dim), torch.zeros(2), torch.randn(2, layer.output_dim), 2)
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["num_patches"], saved["num_trainable_patches"]) == (5, 2)
    ids = torch.tensor([[5, 6, 7, 8]])
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    native.load_adapter(str(tmp_path / "adapter"))
    assert torch.equal(native(ids).logits, model(ids).logits)


def test_patch_trainer_without_memory_warns(tmp_path: Path) -> None:
    model = get_peft_model(sharp_gpt2(), PatcherConfig())
    with pytest.warns(UserWarning, match="no memory"):
        PatchTrainer(model, task_for_model(model, tiny_tokenizer()))
