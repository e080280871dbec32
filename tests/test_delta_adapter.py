"""The DELTA adapter: a closed-form low-rank ΔW = up @ down per edited layer, as a PEFT tuner.

What it adds, how it merges/unloads/saves/loads, and that every bad input is refused with the model unchanged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from tiny_models import build, inputs_for, logits
from transformer_patcher import (
    AdapterFileError,
    DeltaConfig,
    DeltaLayer,
    DeltaModel,
    FingerprintMismatchError,
    InvalidPatchError,
    PatcherModel,
    UnsupportedArchitectureError,
    get_delta_model,
)
from transformer_patcher.tuners.fingerprint import _SKETCH_SEED, SKETCH_SIZE, _sketch

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
LLAMA_DOWN = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
# One edited layer per wrapped kind: nn.Linear (LLaMA, GPT-NeoX) and transformers Conv1D (GPT-2).
LAYERS = [
    ("llama", "model.layers.1.mlp.down_proj"),
    ("gpt_neox", "gpt_neox.layers.1.mlp.dense_4h_to_h"),
    ("gpt2", "transformer.h.1.mlp.c_proj"),
]


def factors(layer: DeltaLayer, rank: int, seed: int = 0, scale: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(layer.out_features, rank, generator=g) * scale
    down = torch.randn(rank, layer.in_features, generator=g) * scale
    return up, down


def edited(arch: str = "llama", names: list[str] | None = None, ranks: tuple[int, ...] = (2, 3), seed: int = 0):
    """A tiny model with a DELTA adapter whose i-th layer holds a random delta of rank ``ranks[i]``."""
    model = get_delta_model(build(arch), DeltaConfig(target_modules=names or LLAMA_DOWN))
    for i, layer in enumerate(model.base_model.delta_layers().values()):
        layer.add_delta("default", *factors(layer, ranks[i], seed=seed + i))
    return model


def dense_copy(arch: str, model: PeftModel) -> nn.Module:
    """A fresh copy of the base model with every edited weight replaced by W + up @ down, computed by hand."""
    copy = build(arch)
    for name, layer in model.base_model.delta_layers().items():
        up, down = layer.delta_up["default"].detach(), layer.delta_down["default"].detach()
        target = copy.get_submodule(name)
        delta = up @ down  # (d_out, d_in)
        target.weight.data += delta.T if isinstance(target, Conv1D) else delta
    return copy


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(before[k].shape == after[k].shape and torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rank_zero_adapter_leaves_logits_bit_identical(arch: str) -> None:
    base = build(arch)
    batch = inputs_for(base)
    reference = logits(base, batch)
    name = dict(LAYERS)[arch]
    model = get_delta_model(base, DeltaConfig(target_modules=[name]))
    assert isinstance(model.base_model.model.get_submodule(name), DeltaLayer)
    assert model.base_model.delta_rank() == 0 and model.peft_config["default"].rank == 0
    assert not model.training  # eval mode kept
    assert torch.equal(logits(model, batch), reference)


@pytest.mark.parametrize(("arch", "name"), LAYERS)
def test_delta_output_equals_the_dense_update(arch: str, name: str) -> None:
    model = get_delta_model(build(arch), DeltaConfig(target_modules=[name]))
    layer = model.base_model.delta_layers()[name]
    base = layer.get_base_layer()
    assert isinstance(base, Conv1D if arch == "gpt2" else nn.Linear)
    up, down = factors(layer, 3)
    assert layer.add_delta("default", up, down) == 3

    x = torch.randn(2, 5, layer.in_features)
    dense = (up @ down).T if arch == "gpt2" else up @ down  # by hand, in the base weight's orientation
    weight = base.weight.detach().clone() + dense
    expected = x @ weight + base.bias if arch == "gpt2" else F.linear(x, weight, base.bias)
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=1e-5, rtol=0)
        assert torch.allclose(layer(x) - base(x), x @ (up @ down).T, atol=1e-5, rtol=0)
    assert torch.equal(layer.get_delta_weight("default"), dense)

    batch = inputs_for(model)
    edited_logits = logits(model, batch)
    assert not torch.allclose(edited_logits, logits(build(arch), batch), atol=1e-3)
    assert torch.allclose(edited_logits, logits(dense_copy(arch, model), batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("arch", "name"), LAYERS)
def test_a_high_rank_delta_acts_through_its_dense_weight_and_follows_every_change(arch: str, name: str) -> None:
    model = get_delta_model(build(arch), DeltaConfig(target_modules=[name]))
    layer = model.base_model.delta_layers()[name]
    base = layer.get_base_layer()
    rank = layer.in_features + layer.out_features  # above d_in·d_out / (d_in + d_out): dense is cheaper per token
    x = torch.randn(2, 5, layer.in_features)

    def check(up: torch.Tensor, down: torch.Tensor) -> None:
        with torch.no_grad():
            torch.testing.assert_close(layer(x) - base(x), x @ (up @ down).T, atol=1e-4, rtol=1e-4)

    up, down = factors(layer, rank, seed=1, scale=0.05)
    layer.add_delta("default", up, down)
    check(up, down)
    assert layer._dense("default", layer.delta_up["default"], layer.delta_down["default"]) is not None
    up2, down2 = factors(layer, rank, seed=2, scale=0.05)
    layer.replace_delta("default", up2, down2)  # new factors
    check(up2, down2)
    with torch.no_grad():
        layer.delta_up["default"].mul_(-1.0)  # changed in place, as a state-dict load does
    check(-up2, down2)
    layer.add_delta("default", *factors(layer, 1, seed=3, scale=0.0))  # one more (zero) fact
    check(-up2, down2)
    small = get_delta_model(build(arch), DeltaConfig(target_modules=[name])).base_model.delta_layers()[name]
    small.add_delta("default", *factors(small, 2))
    assert small._dense("default", small.delta_up["default"], small.delta_down["default"]) is None  # two factors


def test_appending_twice_equals_one_delta_with_concatenated_factors() -> None:
    name = "model.layers.1.mlp.down_proj"
    twice = get_delta_model(build("llama"), DeltaConfig(target_modules=[name]))
    layer = twice.base_model.delta_layers()[name]
    (up1, down1), (up2, down2) = factors(layer, 2, seed=1), factors(layer, 3, seed=2)
    layer.add_delta("default", up1, down1)
    assert layer.rank() == 2 and twice.peft_config["default"].rank == 2
    layer.add_delta("default", up2, down2)
    assert layer.rank() == 5 and twice.peft_config["default"].rank == 5

    once = get_delta_model(build("llama"), DeltaConfig(target_modules=[name]))
    once.base_model.add_delta(name, torch.cat([up1, up2], dim=1), torch.cat([down1, down2], dim=0))
    batch = inputs_for(once)
    assert torch.equal(logits(twice, batch), logits(once, batch))
    assert torch.allclose(layer.get_delta_weight("default"), up1 @ down1 + up2 @ down2, atol=1e-6)


def test_config_rank_is_the_total_over_layers() -> None:
    model = edited(ranks=(2, 3))
    assert [layer.rank() for layer in model.base_model.delta_layers().values()] == [2, 3]
    assert model.peft_config["default"].rank == model.base_model.delta_rank() == 5
    model.base_model.add_delta(LLAMA_DOWN[0], *factors(model.base_model.delta_layers()[LLAMA_DOWN[0]], 4))
    assert model.peft_config["default"].rank == 9


def test_clear_delta_returns_the_layer_to_rank_zero() -> None:
    model = edited(ranks=(2, 3))
    batch = inputs_for(model)
    first, second = model.base_model.delta_layers().values()
    assert second.clear_delta("default") == 3
    assert second.rank() == 0 and model.peft_config["default"].rank == 2
    assert torch.equal(logits(model, batch), logits(edited(ranks=(2, 0)), batch))
    first.clear_delta()
    assert model.peft_config["default"].rank == 0
    assert torch.equal(logits(model, batch), logits(build("llama"), batch))


def test_replace_delta_sets_the_factors_in_one_step_and_refuses_bad_ones_unchanged() -> None:
    model = edited(ranks=(2, 3))
    batch = inputs_for(model)
    second = list(model.base_model.delta_layers().values())[1]
    up, down = factors(second, 4, seed=5)
    assert second.replace_delta("default", up, down) == 4
    assert second.rank() == 4 and model.peft_config["default"].rank == 6
    assert torch.allclose(second.get_delta_weight("default"), up @ down, atol=1e-6)
    before = logits(model, batch)
    with pytest.raises(InvalidPatchError, match="must share the rank"):
        second.replace_delta("default", up, down[:3])
    with pytest.raises(InvalidPatchError, match="NaN or inf"):
        second.replace_delta("default", up * float("nan"), down)
    assert second.rank() == 4 and model.peft_config["default"].rank == 6
    assert torch.equal(logits(model, batch), before)


def test_factors_are_never_trainable() -> None:
    model = edited()
    model.set_adapter("default")
    model.base_model.set_requires_grad("default", True)
    model.train()
    assert not any(p.requires_grad for p in model.parameters())
    layer = model.base_model.delta_layers()[LLAMA_DOWN[0]]
    assert layer.delta_up["default"].dtype == torch.float32


def test_float64_deltas_on_a_bfloat16_model() -> None:
    name = "model.layers.1.mlp.down_proj"
    model = get_delta_model(
        build("llama").to(torch.bfloat16), DeltaConfig(target_modules=[name], delta_dtype="float64")
    )
    layer = model.base_model.delta_layers()[name]
    layer.add_delta("default", *factors(layer, 2))
    assert layer.delta_up["default"].dtype == torch.float64
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
        up, down = layer.delta_up["default"], layer.delta_down["default"]
        expected = layer.get_base_layer()(x) + ((x.double() @ down.T) @ up.T).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


# ------------------------------------------------------------------------------------------- lifecycle
def test_merge_and_unload_matches_the_unmerged_adapter() -> None:
    model = edited()
    batch = inputs_for(model)
    before = logits(model, batch)
    merged = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, DeltaLayer) for m in merged.modules())
    assert not hasattr(merged, "peft_config")
    assert isinstance(merged.get_submodule(LLAMA_DOWN[0]), nn.Linear)
    assert torch.allclose(logits(merged, batch), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("arch", "name"), LAYERS)
def test_merge_adapter_and_unmerge_round_trip(arch: str, name: str) -> None:
    model = edited(arch, [name], ranks=(3,))
    batch = inputs_for(model)
    weight = model.base_model.model.get_submodule(name).get_base_layer().weight
    original, before = weight.detach().clone(), logits(model, batch)
    model.merge_adapter()
    layer = model.base_model.delta_layers()[name]
    assert layer.merged_adapters == ["default"]
    assert torch.allclose(weight, original + layer.get_delta_weight("default"), atol=1e-6)
    assert torch.allclose(logits(model, batch), before, atol=1e-5, rtol=0)
    with pytest.raises(InvalidPatchError, match="merged"):
        layer.add_delta("default", *factors(layer, 1))
    model.unmerge_adapter()
    assert not layer.merged and torch.allclose(weight, original, atol=1e-6)
    assert torch.allclose(logits(model, batch), before, atol=1e-5, rtol=0)


def test_unload_restores_the_exact_base_model() -> None:
    reference = logits(build("llama"), inputs_for(build("llama")))
    model = edited()
    base = model.unload()
    assert not any(isinstance(m, DeltaLayer) for m in base.modules())
    assert torch.equal(logits(base, inputs_for(base)), reference)


def test_disable_adapter_gives_the_base_logits() -> None:
    base = build("llama")
    batch = inputs_for(base)
    reference = logits(base, batch)
    model = edited()
    after = logits(model, batch)
    with model.disable_adapter():
        assert torch.equal(logits(model, batch), reference)
    assert torch.equal(logits(model, batch), after)
    model.merge_adapter()  # disabling a merged adapter unmerges it, as in peft's LoRA
    with model.disable_adapter():
        assert torch.allclose(logits(model, batch), reference, atol=1e-5, rtol=0)


def test_several_adapters_set_and_delete() -> None:
    batch = inputs_for(build("llama"))
    reference = logits(build("llama"), batch)
    model = edited(ranks=(2, 2), seed=0)
    first = logits(model, batch)
    model.add_adapter("second", DeltaConfig(target_modules=[LLAMA_DOWN[1]]))
    second_layer = model.base_model.delta_layers("second")[LLAMA_DOWN[1]]
    assert second_layer is model.base_model.delta_layers("default")[LLAMA_DOWN[1]]  # one wrapper, two adapters
    assert torch.equal(logits(model, batch), first)  # the new adapter is inactive
    model.base_model.add_delta(LLAMA_DOWN[1], *factors(second_layer, 4, seed=7), adapter_name="second")
    assert model.peft_config["second"].rank == 4 and model.peft_config["default"].rank == 4

    model.set_adapter("second")
    only_second = logits(model, batch)
    expected = edited(names=[LLAMA_DOWN[1]], ranks=(4,), seed=7)
    assert torch.equal(only_second, logits(expected, batch))
    model.base_model.set_adapter(["default", "second"])
    both = logits(model, batch)
    assert not torch.allclose(both, first) and not torch.allclose(both, only_second)

    model.delete_adapter("second")
    assert "second" not in model.peft_config and "second" not in second_layer.delta_up
    assert torch.equal(logits(model, batch), first)
    assert torch.equal(logits(model.unload(), batch), reference)


def test_many_targets_keep_their_exact_names() -> None:
    """peft condenses >= 20 target names into suffixes; the config must still list the exact names."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    base = tf.LlamaForCausalLM(config).eval()
    names = [n for n, m in base.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    assert len(names) >= 20
    model = get_delta_model(base, DeltaConfig(target_modules=list(reversed(names))))
    assert model.peft_config["default"].target_modules == names  # exact, in model order
    assert sorted(model.base_model.delta_layers()) == sorted(names)


def test_both_peft_types_are_registered() -> None:
    assert PEFT_TYPE_TO_CONFIG_MAPPING["DELTA"] is DeltaConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["DELTA"] is DeltaModel
    assert PEFT_TYPE_TO_TUNER_MAPPING["PATCHER"] is PatcherModel
    assert DeltaConfig(target_modules=["x"]).peft_type == "DELTA"


# --------------------------------------------------------------------------------------- save and load
@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model = edited(ranks=(2, 3))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_save_and_load_reproduce_the_logits_exactly(tmp_path: Path, low_cpu_mem_usage: bool) -> None:
    source = edited(ranks=(2, 3))
    source.save_pretrained(tmp_path)
    batch = inputs_for(source)
    expected = logits(source, batch)

    assert {p.name for p in tmp_path.iterdir()} - {"README.md"} == {CONFIG, WEIGHTS}
    config = json.loads((tmp_path / CONFIG).read_text())
    assert config["peft_type"] == "DELTA" and config["rank"] == 5 and config["method"] == "pmet"
    assert config["target_modules"] == LLAMA_DOWN
    assert config["fingerprint"]["modules"] == {name: [64, 32] for name in LLAMA_DOWN}
    tensors = load_file(tmp_path / WEIGHTS)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "base_model.model.model.layers.0.mlp.down_proj.delta_up": (32, 2),
        "base_model.model.model.layers.0.mlp.down_proj.delta_down": (2, 64),
        "base_model.model.model.layers.1.mlp.down_proj.delta_up": (32, 3),
        "base_model.model.model.layers.1.mlp.down_proj.delta_down": (3, 64),
    }

    for loaded in (
        DeltaModel.from_pretrained(build("llama"), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage),
        PeftModel.from_pretrained(build("llama"), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage),
    ):
        assert loaded.peft_config["default"].rank == 5 and loaded.base_model.delta_rank() == 5
        assert torch.equal(logits(loaded, batch), expected)
        assert not any(p.requires_grad for p in loaded.parameters())
        assert all(
            p.device.type == "cpu" and p.dtype == torch.float32
            for p in loaded.base_model.delta_layers()[LLAMA_DOWN[0]].delta_up.values()
        )


def test_conv1d_adapter_round_trips(tmp_path: Path) -> None:
    source = edited("gpt2", ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"], ranks=(1, 2))
    source.save_pretrained(tmp_path)
    batch = inputs_for(source)
    loaded = PeftModel.from_pretrained(build("gpt2"), tmp_path)
    assert torch.equal(logits(loaded, batch), logits(source, batch))


def test_load_adapter_resizes_an_existing_adapter(saved: Path) -> None:
    target = edited(ranks=(1, 1), seed=5)
    target.load_adapter(saved, adapter_name="default")
    assert [layer.rank() for layer in target.base_model.delta_layers().values()] == [2, 3]
    assert target.peft_config["default"].rank == 5
    batch = inputs_for(target)
    assert torch.equal(logits(target, batch), logits(edited(ranks=(2, 3)), batch))


def test_same_model_at_lower_precision_is_accepted(saved: Path) -> None:
    model = DeltaModel.from_pretrained(build("llama").to(torch.bfloat16), saved)
    assert model.base_model.delta_rank() == 5


def test_fingerprint_check_can_be_bypassed_explicitly(saved: Path) -> None:
    with pytest.warns(UserWarning, match="check_fingerprint=False: .* may not belong to this model"):
        model = DeltaModel.from_pretrained(build("llama", seed=1), saved, check_fingerprint=False)
    assert model.base_model.delta_rank() == 5


# -------------------------------------------------------------------------------------------- refusals
def assert_untouched(model: nn.Module, reference: torch.Tensor) -> None:
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())
    assert not hasattr(model, "peft_config")
    assert torch.equal(logits(model, inputs_for(model)), reference)


def load_both_ways(model: nn.Module, path: Path, error: type[Exception], match: str) -> None:
    reference = logits(model, inputs_for(model))
    before = state(model)
    with pytest.raises(error, match=match):
        DeltaModel.from_pretrained(model, path)
    assert_untouched(model, reference)
    with pytest.raises(error, match=match):
        PeftModel.from_pretrained(model, path)
    assert_untouched(model, reference)
    assert_same_state(before, model)


def _rewrite(saved: Path, edit) -> None:
    tensors = load_file(saved / WEIGHTS)
    edit(tensors)
    save_file(tensors, saved / WEIGHTS, metadata={"format": "pt"})


def _key(saved: Path, module: str, name: str) -> str:
    return f"base_model.model.{module}.{name}"


def _edit_config(saved: Path, **changes) -> None:
    config = json.loads((saved / CONFIG).read_text())
    config.update(changes)
    (saved / CONFIG).write_text(json.dumps(config))


def test_truncated_safetensors_is_refused(saved: Path) -> None:
    data = (saved / WEIGHTS).read_bytes()
    (saved / WEIGHTS).write_bytes(data[: len(data) // 2])
    load_both_ways(build("llama"), saved, AdapterFileError, "not a readable safetensors file")


def test_garbage_safetensors_is_refused(saved: Path) -> None:
    (saved / WEIGHTS).write_bytes(b"\xff" * 64)
    load_both_ways(build("llama"), saved, AdapterFileError, "not a readable safetensors file")


def test_missing_tensor_is_refused(saved: Path) -> None:
    _rewrite(saved, lambda t: t.pop(_key(saved, LLAMA_DOWN[1], "delta_down")))
    load_both_ways(build("llama"), saved, AdapterFileError, r"lacks tensors \['delta_down'\]")


def test_missing_module_is_refused(saved: Path) -> None:
    def drop(t: dict) -> None:
        for name in ("delta_up", "delta_down"):
            t.pop(_key(saved, LLAMA_DOWN[0], name))

    _rewrite(saved, drop)
    load_both_ways(build("llama"), saved, AdapterFileError, "do not belong together")


@pytest.mark.parametrize(
    ("name", "tensor", "match"),
    [
        ("delta_up", torch.randn(31, 3), "fingerprint says that layer is 64→32"),
        ("delta_down", torch.randn(3, 63), "fingerprint says that layer is 64→32"),
        ("delta_down", torch.randn(4, 64), "disagree on the rank"),
        ("delta_up", torch.randn(32 * 3), "must be 2-D"),
        ("delta_up", torch.ones(32, 3, dtype=torch.int64), "must be floating point"),
    ],
)
def test_wrong_shape_or_dtype_is_refused(saved: Path, name: str, tensor: torch.Tensor, match: str) -> None:
    _rewrite(saved, lambda t: t.__setitem__(_key(saved, LLAMA_DOWN[1], name), tensor))
    load_both_ways(build("llama"), saved, AdapterFileError, match)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_factor_is_refused(saved: Path, value: float) -> None:
    key = _key(saved, LLAMA_DOWN[0], "delta_up")
    _rewrite(saved, lambda t: t[key].__setitem__((0, 0), value))
    load_both_ways(build("llama"), saved, AdapterFileError, "delta_up contains NaN or inf")


def test_rank_disagreeing_with_config_is_refused(saved: Path) -> None:
    _edit_config(saved, rank=7)
    load_both_ways(build("llama"), saved, AdapterFileError, "total rank 5 but its config says rank=7")


def test_extra_tensor_is_refused(saved: Path) -> None:
    _rewrite(saved, lambda t: t.__setitem__("base_model.model.lm_head.weight", torch.zeros(2, 2)))
    load_both_ways(build("llama"), saved, AdapterFileError, "unexpected tensor 'base_model.model.lm_head.weight'")


def test_unknown_config_field_is_refused(saved: Path) -> None:
    _edit_config(saved, num_patches=3)
    load_both_ways(build("llama"), saved, AdapterFileError, "Additional properties are not allowed")


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"delta_dtype": "int8"}, "delta_dtype"),
        ({"rank": -1}, "rank"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": "model.layers.1.mlp.down_proj"}, "target_modules"),
        ({"peft_type": "LORA"}, "peft_type"),
    ],
)
def test_invalid_config_values_in_file_are_refused(saved: Path, changes: dict, match: str) -> None:
    _edit_config(saved, **changes)
    with pytest.raises(AdapterFileError, match=match):
        DeltaConfig.from_pretrained(saved)


def test_non_finite_config_value_is_refused(saved: Path) -> None:
    config = json.loads((saved / CONFIG).read_text())
    config["fingerprint"]["weights_sketch"][3] = math.nan
    (saved / CONFIG).write_text(json.dumps(config))
    load_both_ways(build("llama"), saved, AdapterFileError, r"non-finite value in fingerprint\.weights_sketch\.3")


def test_pickled_weights_are_never_read(saved: Path) -> None:
    (saved / WEIGHTS).rename(saved / "adapter_model.bin")
    load_both_ways(build("llama"), saved, AdapterFileError, "unpickling can run arbitrary code")


def test_adapter_for_another_base_model_is_refused(saved: Path) -> None:
    load_both_ways(build("llama", seed=1), saved, FingerprintMismatchError, "weights of the edited layers differ")


def test_adapter_for_another_architecture_is_refused(saved: Path) -> None:
    # Qwen2 has the very same module names as LLaMA; only the fingerprint tells them apart.
    load_both_ways(build("qwen2"), saved, FingerprintMismatchError, "model_type: adapter 'llama', model 'qwen2'")


def test_adapter_whose_layers_do_not_exist_is_refused(saved: Path) -> None:
    load_both_ways(build("gpt2"), saved, UnsupportedArchitectureError, "'model.layers.0.mlp.down_proj' does not exist")


def test_checkpoint_for_other_layers_is_refused_when_loaded_into_an_existing_adapter(saved: Path) -> None:
    target = edited(names=[LLAMA_DOWN[1]], ranks=(1,))
    before = state(target)
    with pytest.raises(AdapterFileError, match="does not edit"):
        target.load_adapter(saved, adapter_name="default")
    assert_same_state(before, target)
    assert target.peft_config["default"].rank == 1


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("model.layers.1.mlp.nope", "'model.layers.1.mlp.nope' does not exist"),
        ("down_proj", "'down_proj' does not exist"),  # exact names only, no suffix matching
        ("model.layers.1.post_attention_layernorm", "'model.layers.1.post_attention_layernorm' is a LlamaRMSNorm"),
        ("model.layers.1.mlp", "'model.layers.1.mlp' is a LlamaMLP"),
    ],
)
def test_target_that_is_missing_or_not_linear_is_refused(name: str, match: str) -> None:
    model = build("llama")
    reference = logits(model, inputs_for(model))
    with pytest.raises(UnsupportedArchitectureError, match=match):
        get_delta_model(model, DeltaConfig(target_modules=[LLAMA_DOWN[0], name]))
    assert_untouched(model, reference)


@pytest.mark.parametrize(
    ("up", "down", "match"),
    [
        (torch.randn(31, 2), torch.randn(2, 64), r"up must have shape \(32 × r\)"),
        (torch.randn(32, 2), torch.randn(2, 32), r"down must have shape \(r × 64\)"),
        (torch.randn(32, 2), torch.randn(3, 64), "must share the rank"),
        (torch.randn(32), torch.randn(1, 64), r"up must have shape"),
        (torch.full((32, 2), float("nan")), torch.randn(2, 64), "up contains NaN or inf"),
        (torch.randn(32, 2), torch.full((2, 64), float("inf")), "down contains NaN or inf"),
        (torch.ones(32, 2, dtype=torch.int64), torch.randn(2, 64), "floating point"),
    ],
)
def test_invalid_add_delta_changes_nothing(up: torch.Tensor, down: torch.Tensor, match: str) -> None:
    model = edited(ranks=(1, 1))
    layer = model.base_model.delta_layers()[LLAMA_DOWN[0]]
    batch = inputs_for(model)
    before, out = state(model), logits(model, batch)
    with pytest.raises(InvalidPatchError, match=match):
        layer.add_delta("default", up, down)
    assert_same_state(before, model)
    assert layer.rank() == 1 and model.peft_config["default"].rank == 2
    assert torch.equal(logits(model, batch), out)


def test_delta_overflowing_its_dtype_is_refused() -> None:
    name = LLAMA_DOWN[0]
    model = get_delta_model(build("llama"), DeltaConfig(target_modules=[name], delta_dtype="float16"))
    layer = model.base_model.delta_layers()[name]
    with pytest.raises(InvalidPatchError, match="overflows"):
        layer.add_delta("default", torch.full((32, 1), 1e6), torch.ones(1, 64))
    assert layer.rank() == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "needs target_modules"),
        ({"target_modules": []}, "needs target_modules"),
        ({"target_modules": "model.layers.1.mlp.down_proj"}, "needs target_modules"),
        ({"target_modules": ["a", "a"]}, "more than once"),
        ({"target_modules": ["a"], "delta_dtype": "int8"}, "delta_dtype"),
        ({"target_modules": ["a"], "rank": -1}, "rank"),
        ({"target_modules": ["a"], "method": ""}, "method"),
    ],
)
def test_invalid_config_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DeltaConfig(**kwargs)


def test_unknown_config_argument() -> None:
    with pytest.raises(TypeError, match="num_patches"):
        DeltaConfig(target_modules=["a"], num_patches=1)  # type: ignore[call-arg]


# ------------------------------------------------------------------------------------------ fingerprint
def test_sketch_streams_the_same_projection() -> None:
    """The sketch is computed one projection row and one module at a time; it is the (16, N) projection."""
    segments = [torch.randn(300), torch.randn(500)]
    flat = torch.cat(segments)
    generator = torch.Generator().manual_seed(_SKETCH_SEED)
    signs = torch.randint(0, 2, (SKETCH_SIZE, flat.numel()), generator=generator, dtype=torch.int8) * 2.0 - 1
    expected = (signs.double() @ flat.double() / math.sqrt(flat.numel())).tolist()
    assert _sketch(segments) == pytest.approx(expected, rel=1e-5, abs=1e-5)
