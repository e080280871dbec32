"""PEFT lifecycle: save/load with changed patch counts, low_cpu_mem_usage, several adapters, unload, merge, push."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers.utils.hub as transformers_hub
from huggingface_hub import ModelCard, ModelCardData
from peft import PeftModel
from safetensors.torch import load_file

from tiny_models import build, inputs_for, logits
from transformer_patcher import PatcherConfig, PatcherLayer, PatcherModel, PatchMergeError, get_patcher_model, init_key


def patched(arch: str = "llama", n: int = 3, seed: int = 0, adapter_name: str = "default"):
    torch.manual_seed(seed)
    model = get_patcher_model(build(arch), PatcherConfig(), adapter_name=adapter_name)
    layer = model.patch_layer()
    for edit in range(n):
        layer.add_patches(torch.randn(layer.query_dim), 0.1, torch.randn(layer.output_dim), edit_id=edit)
        layer.commit()
    return model


def test_save_writes_peft_files_and_keeps_num_patches_in_sync(tmp_path: Path) -> None:
    model = patched(n=4)
    layer = model.patch_layer()
    assert model.peft_config["default"].num_patches == 4
    layer.add_patches(torch.randn(2, layer.query_dim), torch.zeros(2), torch.randn(2, layer.output_dim), edit_id=9)
    assert model.peft_config["default"].num_patches == 6
    layer.remove_edit(9)
    assert model.peft_config["default"].num_patches == 4
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PATCHER"
    assert saved["num_patches"] == 4
    assert saved["target_modules"] == ["model.layers.1.mlp.down_proj"]
    assert saved["fingerprint"]["model_type"] == "llama"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.patch_frozen_keys"].shape == (4, 32)
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.patch_frozen_edit_ids"].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_model_with_zero_patches_loads_a_file_with_500(tmp_path: Path, low_cpu_mem_usage: bool) -> None:
    source = get_patcher_model(build("bert"), PatcherConfig())
    layer = source.patch_layer()
    layer.add_patches(torch.randn(500, 32) * 0.1, torch.randn(500) - 2, torch.randn(500, 32), edit_id=range(500))
    layer.commit()
    source.save_pretrained(tmp_path)
    batch = inputs_for(source)

    loaded = PeftModel.from_pretrained(
        build("bert"), tmp_path, config=PatcherConfig(), low_cpu_mem_usage=low_cpu_mem_usage
    )
    assert loaded.peft_config["default"].num_patches == 500
    assert loaded.patch_layer().num_patches() == 500
    assert torch.equal(logits(loaded, batch), logits(source, batch))
    assert all(t.device.type == "cpu" for t in loaded.patch_layer().buffers())


def test_load_adapter_resizes_an_existing_adapter(tmp_path: Path) -> None:
    source = patched(n=5)
    source.save_pretrained(tmp_path)
    target = patched(n=1, seed=3)
    target.load_adapter(tmp_path, adapter_name="default")
    assert target.patch_layer().num_patches() == 5
    assert target.peft_config["default"].num_patches == 5
    batch = inputs_for(source)
    assert torch.equal(logits(target, batch), logits(source, batch))


def test_several_adapters_set_disable_delete(tmp_path: Path) -> None:
    base_out = logits(build("llama"), inputs_for(build("llama")))
    batch = inputs_for(build("llama"))
    first = patched(n=2, seed=1)
    only_first = logits(first, batch)
    other = patched(n=3, seed=2)
    other.save_pretrained(tmp_path)
    only_third = logits(other, batch)

    first.add_adapter("second", PatcherConfig())
    first.load_adapter(tmp_path, adapter_name="third")
    layer = first.patch_layer("third")
    assert layer is first.patch_layer("default")  # one wrapped FFN holds every adapter
    assert layer.num_patches("third") == 3 and layer.num_patches("second") == 0

    first.base_model.set_adapter(["default", "third"])
    combined = logits(first, batch)
    # Two active adapters act like one adapter holding both patch sets.
    union = get_patcher_model(build("llama"), PatcherConfig())
    for name in ("default", "third"):
        union.patch_layer().add_patches(
            layer.patch_frozen_keys[name], layer.patch_frozen_bias[name], layer.patch_frozen_values[name], edit_id=0
        )
    assert torch.allclose(combined, logits(union, batch), atol=1e-5)
    assert not torch.allclose(combined, only_first, atol=1e-4)

    first.set_adapter("third")
    assert torch.equal(logits(first, batch), only_third)
    with first.disable_adapter():
        assert torch.equal(logits(first, batch), base_out)
    first.delete_adapter("third")
    assert "third" not in layer.patch_frozen_keys and "third" not in first.peft_config
    first.set_adapter("default")
    assert torch.equal(logits(first, batch), only_first)


def test_unload_leaves_no_hooks_and_the_base_model() -> None:
    model = patched(n=3)
    batch = inputs_for(model)
    with model.disable_adapter():
        base_out = logits(model, batch)
    base = model.unload()
    assert not any(isinstance(m, PatcherLayer) for m in base.modules())
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in base.modules()) == 0
    assert torch.equal(logits(base, batch), base_out)


def test_merge_and_unload_refuses_and_changes_nothing() -> None:
    model = patched(n=2)
    batch = inputs_for(model)
    before = logits(model, batch)
    with pytest.raises(PatchMergeError, match="non-linear"):
        model.merge_and_unload()
    with pytest.raises(PatchMergeError):
        model.merge_adapter()
    assert isinstance(model.patch_layer(), PatcherLayer)
    assert torch.equal(logits(model, batch), before)


def test_push_to_hub_against_a_fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    remote = tmp_path / "remote"
    pushed: list[str] = []

    class FakeApi:
        def create_repo(self, repo_id: str, **kwargs) -> SimpleNamespace:
            (remote / repo_id).mkdir(parents=True, exist_ok=True)
            return SimpleNamespace(repo_id=repo_id)

        def create_branch(self, **kwargs) -> None:
            return None

        def create_commit(self, repo_id: str, operations, commit_message=None, **kwargs) -> SimpleNamespace:
            for op in operations:
                shutil.copy(op.path_or_fileobj, remote / repo_id / op.path_in_repo)
                pushed.append(op.path_in_repo)
            return SimpleNamespace(commit_message=commit_message, oid="0" * 40)

    monkeypatch.setattr(transformers_hub, "hf_api", lambda: FakeApi())
    monkeypatch.setattr(
        transformers_hub,
        "create_and_tag_model_card",
        lambda repo_id, tags=None, token=None: ModelCard.from_template(ModelCardData(tags=tags or [])),
    )
    model = patched(n=3)
    model.push_to_hub("me/fever-fixes")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(pushed)
    reloaded = PatcherModel.from_pretrained(build("llama"), remote / "me/fever-fixes")
    batch = inputs_for(model)
    assert torch.equal(logits(reloaded, batch), logits(model, batch))


def test_from_pretrained_needs_only_the_package_import(tmp_path: Path) -> None:
    patched(arch="gpt2", n=2).save_pretrained(tmp_path / "adapter")
    script = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from tiny_models import build
import transformer_patcher
model = transformer_patcher.PatcherModel.from_pretrained(build("gpt2"), {str(tmp_path / "adapter")!r})
print(type(model).__name__, model.peft_config["default"].num_patches)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.split()[-2:] == ["PeftModel", "2"]


def test_trainable_and_committed_patches(tmp_path: Path) -> None:
    model = get_patcher_model(build("llama"), PatcherConfig(init_value_scale=5.0))
    layer = model.patch_layer()
    values = torch.randn(2, layer.output_dim)
    layer.add_patches(torch.randn(2, layer.query_dim), torch.zeros(2), values, edit_id=[4, 5])
    assert layer.patch_keys["default"].requires_grad and layer.patch_value_scale["default"].requires_grad
    assert torch.allclose(layer.patch_value_scale["default"], torch.full_like(values, 5.0))
    assert torch.allclose(layer.patch_values["default"] * layer.patch_value_scale["default"], values)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"base_model.model.model.layers.1.mlp.down_proj.{n}.default" for n in layer.adapter_layer_names
    }
    assert layer.commit() == 2
    assert layer.num_trainable_patches() == 0
    assert torch.allclose(layer.patch_frozen_values["default"], values)
    assert not any(b.requires_grad for b in layer.buffers())
    layer._move_adapter_to_device_of_base_layer("default")
    assert not layer.patch_frozen_keys["default"].requires_grad
    assert layer.edit_ids().tolist() == [4, 5]


def test_remove_edit_deletes_exactly_that_edit() -> None:
    model = patched(n=4)
    layer = model.patch_layer()
    batch = inputs_for(model)
    keys, bias = layer.patch_frozen_keys["default"].clone(), layer.patch_frozen_bias["default"].clone()
    values = layer.patch_frozen_values["default"].clone()
    assert layer.remove_edit(2) == 1
    assert layer.edit_ids().tolist() == [0, 1, 3]
    rebuilt = get_patcher_model(build("llama"), PatcherConfig())
    keep = [0, 1, 3]
    rebuilt.patch_layer().add_patches(keys[keep], bias[keep], values[keep], edit_id=keep)
    rebuilt.patch_layer().commit()
    assert torch.allclose(logits(rebuilt, batch), logits(model, batch), atol=1e-5)
    with pytest.raises(ValueError, match=r"no patch .* has edit id 2"):
        layer.remove_edit(2)
    assert layer.num_patches() == 3


def test_capture_exposes_query_and_preactivations() -> None:
    model = get_patcher_model(build("bert"), PatcherConfig())
    layer = model.patch_layer()
    batch = inputs_for(model, batch=1)
    with layer.capture() as record:
        logits(model, batch)
    cls_query = record.query[0, 0]
    # The paper's key init: k = q/|q|², b = 0 gives pre-activation exactly 1 on the edit query.
    layer.add_patches(cls_query / cls_query.norm() ** 2, 0.0, torch.zeros(layer.output_dim), edit_id=0)
    layer.commit()
    layer.add_patches(cls_query / cls_query.norm() ** 2, 2.0, torch.zeros(layer.output_dim), edit_id=1)
    with layer.capture() as record:
        model(**batch)  # with autograd on, as the editor runs it
    assert record.frozen_preactivations.shape == (1, batch["input_ids"].shape[1], 1)
    assert torch.allclose(record.frozen_preactivations[0, 0], torch.tensor([1.0]), atol=1e-5)
    assert torch.allclose(record.preactivations[0, 0], torch.tensor([3.0]), atol=1e-5)
    assert record.preactivations.requires_grad
    assert layer._capture is None and layer._query is None


def test_init_key_gives_the_requested_preactivation() -> None:
    torch.manual_seed(0)
    q, silent = torch.randn(16), torch.randn(5, 16)
    assert torch.allclose(init_key(q) @ q, torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(init_key(q), q / q.norm() ** 2)
    key = init_key(q, 3.0, silent=silent)
    assert torch.allclose(key @ q, torch.tensor(3.0), atol=1e-4)
    assert torch.allclose(silent @ key, torch.zeros(5), atol=1e-5)
    with pytest.raises(ValueError, match="span of the silent queries"):
        init_key(silent[0] + silent[1], silent=silent)
