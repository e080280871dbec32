"""The subject gate's frame (``tuners.patcher.gate.measure_frame``, ``methods.patcher.gate_frame``): cosines taken
after the block's mean output is subtracted and each feature divided by its spread."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.functional import normalize

from tiny_models import build
from tiny_tokenizer import EDIT_WORDS, random_pairs, sentence, sharp_gpt2, tiny_tokenizer
from transformer_patcher import PatcherConfig, PatcherModel, get_patcher_model
from transformer_patcher.cli.patch_folder import describe_patch_folder
from transformer_patcher.core.errors import InvalidPatchError
from transformer_patcher.core.examples import EditExample
from transformer_patcher.core.tasks import task_for_model
from transformer_patcher.experiments.registry import build_trainer
from transformer_patcher.methods.patcher import EditConfig
from transformer_patcher.tuners.patcher.gate import GateReads, in_frame, measure_frame
from transformer_patcher.tuners.patcher.patch_set import remove_edit_from_files


class _Owner(nn.Module):
    """Runs one identity 'block' on given outputs, as a causal LM's model runs its blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Identity()

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.block(hidden)


def test_the_frame_is_the_mean_and_inverse_spread_with_a_floor_for_constant_features() -> None:
    outputs = torch.randn(500, 6) * torch.tensor([1.0, 2.0, 4.0, 1.0, 1.0, 0.0]) + 3
    frame = measure_frame(outputs)
    assert torch.allclose(frame[0], outputs.mean(0), atol=1e-5)
    assert torch.allclose(frame[1, :5], 1 / outputs[:, :5].std(0), rtol=1e-4)
    assert torch.isfinite(frame).all() and frame[1, 5] > 0  # a constant feature: floored, not infinite
    x = torch.randn(3, 6)
    assert torch.equal(in_frame(x, None), normalize(x, dim=-1))
    assert torch.equal(in_frame(x, torch.zeros(2, 6)), normalize(x, dim=-1))  # a zero frame: the plain cosine
    with pytest.raises(ValueError, match="at least 2 positions"):
        measure_frame(torch.randn(1, 6))


def test_in_the_frame_unrelated_positions_sharing_a_common_part_no_longer_open_the_gate() -> None:
    torch.manual_seed(0)
    common = torch.randn(16) * 10  # what every position shares (Gemma-3's block 3: cosines 0.89-0.97)
    texts = common + torch.randn(40, 5, 16)
    owner = _Owner()
    gate = GateReads(owner, owner.block)
    mask = torch.ones(1, 5)
    owner(texts[0:1], attention_mask=mask)
    subject = gate.reads()[0, 2:3]  # the plain read of position 2 of text 0
    owner(texts[1:2], attention_mask=mask)
    assert gate.running(subject, "plain")[0, -1, 0] > 0.8  # another text opens a plain 0.8 gate
    frame = measure_frame(texts[2:].reshape(-1, 16))
    owner(texts[0:1], attention_mask=mask)
    framed = gate.reads(frame)[0, 2:3]
    assert gate.opened(framed, 0.8, "own", frame)[0, 2:, 0].all()  # its own text opens it from the subject on
    owner(texts[1:2], attention_mask=mask)
    assert gate.running(framed, "framed", frame)[0, -1, 0] < 0.8  # in the frame the other text does not


def gated_model() -> tuple[nn.Module, torch.Tensor]:
    model = get_patcher_model(build("llama").eval(), PatcherConfig(gate_layer=0)).eval()
    layer = model.base_model.patch_layer()
    frame = torch.stack([torch.randn(32), torch.rand(32) + 0.5])
    layer.set_gate_frame(frame)
    return model, frame


def test_a_frame_is_validated_and_fixed_once_a_gated_patch_exists() -> None:
    model, frame = gated_model()
    layer = model.base_model.patch_layer()
    assert torch.equal(layer.gate_frame(), frame)
    for bad in (torch.zeros(3, 32), torch.stack([torch.zeros(32), -torch.ones(32)]), torch.full((2, 32), torch.nan)):
        with pytest.raises(InvalidPatchError):
            layer.set_gate_frame(bad)
    assert torch.equal(layer.gate_frame(), frame)  # refused: unchanged
    layer.add_patches(torch.randn(1, 32), torch.zeros(1), torch.randn(1, 32), 0)  # ungated: the frame may move
    layer.set_gate_frame(frame * 2)
    layer.add_patches(torch.randn(1, 32), torch.zeros(1), torch.randn(1, 32), 1, subjects=torch.randn(1, 32))
    with pytest.raises(InvalidPatchError, match="already holds gated patches"):
        layer.set_gate_frame(frame)
    layer.set_gate_frame(frame * 2)  # the same frame again is no change


def test_the_frame_round_trips_survives_removing_an_edit_and_an_older_file_loads_plain(tmp_path: Path) -> None:
    model, frame = gated_model()
    layer = model.base_model.patch_layer()
    for edit_id in (0, 1):
        layer.add_patches(torch.randn(1, 32), torch.zeros(1), torch.randn(1, 32), edit_id, subjects=torch.randn(1, 32))
    layer.commit()
    ids = torch.arange(10, 18)[None]
    with torch.no_grad():
        out = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "framed")
    loaded = PatcherModel.from_pretrained(build("llama").eval(), tmp_path / "framed").eval()
    assert torch.equal(loaded.base_model.patch_layer().gate_frame(), frame)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, out)
    assert describe_patch_folder(tmp_path / "framed")["num_patches"] == 2  # the torch-free reader knows the frame
    assert remove_edit_from_files(tmp_path / "framed", 0) == 1
    kept = PatcherModel.from_pretrained(build("llama").eval(), tmp_path / "framed").base_model.patch_layer()
    assert torch.equal(kept.gate_frame(), frame) and kept.num_patches() == 1
    old = tmp_path / "old"  # a file written before the frame existed: plain cosines
    old.mkdir()
    (old / "adapter_config.json").write_text((tmp_path / "framed" / "adapter_config.json").read_text())
    weights = load_file(tmp_path / "framed" / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if "gate_frame" not in k}, old / "adapter_model.safetensors")
    assert PatcherModel.from_pretrained(build("llama").eval(), old).base_model.patch_layer().gate_frame() is None
    assert describe_patch_folder(old)["num_patches"] == 1


@pytest.mark.parametrize("gate_frame", [True, False])
def test_build_trainer_reads_a_new_gates_frame_from_the_memory_texts_unless_told_not_to(gate_frame: bool) -> None:
    config = EditConfig(gate_layer=0, gate_frame=gate_frame)
    model = get_patcher_model(sharp_gpt2(), config.adapter_config("causal_lm")).eval()
    task = task_for_model(model, tiny_tokenizer())
    pairs = random_pairs(40, seed=1)
    trainer = build_trainer(model, task, pairs, edit_config=config, memory_rows=2000, progress=False)
    frame = trainer.layer.gate_frame()
    assert (frame is not None) == gate_frame
    if not gate_frame:
        return
    gate = trainer.layer.gate_reads()
    with torch.no_grad():
        model(**task.batch_for(model, pairs[:8]).model_kwargs())
    outputs = gate.outputs[gate.outputs.ne(0).any(-1)]
    assert torch.allclose(frame[0], outputs.mean(0), atol=0.5 * float(outputs.std(0).mean()))  # the texts' mean
    words = list(range(*EDIT_WORDS))
    record = trainer.edit(EditExample(sentence(*words[:4]), sentence(*words[10:12]), subject=f"w{words[1]}"), edit_id=0)
    assert record.success and trainer.layer.has_gated_patches()
    trainer.reset()
    assert torch.equal(trainer.layer.gate_frame(), frame)  # the frame describes the model, not an edit
    again = build_trainer(model, task, pairs, edit_config=config, memory_rows=2000, progress=False)
    assert torch.equal(again.layer.gate_frame(), frame)  # a set frame is kept
