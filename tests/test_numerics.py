"""Numerics of patch training: NaN/inf fails an edit cleanly, bf16/fp16 base models, bit-exact determinism on CPU."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import pytest
import torch
import transformers as tf

from tiny_tokenizer import EDIT_WORDS, random_pairs, random_sentence, sharp_gpt2, sharp_gpt2_config, tiny_tokenizer
from transformer_patcher import PatcherConfig, get_patcher_model
from transformer_patcher.core.errors import NonFiniteError, PatcherError
from transformer_patcher.methods.patcher import (
    EditConfig,
    EditExample,
    MemoryBank,
    PatchTrainer,
    Task,
    collect_queries,
    task_for_model,
)

MEMORY_PAIRS = random_pairs(30, seed=1)
HELD_OUT = random_pairs(20, seed=2)


def sharp_classifier(seed: int = 0) -> tf.GPT2ForSequenceClassification:
    """A two-class tiny GPT-2 classifier (reads the last token) with large initial weights, like ``sharp_gpt2``: a
    default tiny classifier has near-identical queries for every input, so the memory loss and the edit conflict."""
    torch.manual_seed(seed)
    return tf.GPT2ForSequenceClassification(sharp_gpt2_config(pad_token_id=0, num_labels=2)).eval()


MODELS = {"gpt2": sharp_gpt2, "classifier": sharp_classifier}


def _pairs(task: Task, pairs: list[tuple[str, str]]) -> list[tuple[str, int | str]]:
    """Memory/held-out text with a target of the task's kind."""
    return [(text, 0) if task.kind == "classification" else (text, target) for text, target in pairs]


def make_trainer(
    name: str = "gpt2",
    dtype: torch.dtype | None = None,
    config: EditConfig | None = None,
    patcher: PatcherConfig | None = None,
    seed: int = 0,
) -> PatchTrainer:
    """A tiny model (the sharp GPT-2 or a classifier), optionally cast to ``dtype``, with a memory of 30 queries."""
    base = MODELS[name](seed)
    if dtype is not None:
        base = base.to(dtype)
    model = get_patcher_model(base, patcher or PatcherConfig()).eval()
    task = task_for_model(model, tiny_tokenizer())
    layer = model.base_model.patch_layer()
    rows = collect_queries(model, layer, task, _pairs(task, MEMORY_PAIRS), 10_000, progress=False)
    return PatchTrainer(model, task, config or EditConfig.quick(), MemoryBank(rows))


def wrong_examples(trainer: PatchTrainer, n: int, seed: int = 3) -> list[EditExample]:
    """``n`` examples the model gets wrong: random edit-word prompts, with the label flipped for a classifier."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    while len(examples) < n:
        text = random_sentence(generator, 4, EDIT_WORDS)
        if trainer.task.kind == "classification":
            example = EditExample(text, 1 if trainer.check(EditExample(text, 0))[0] else 0)
        else:
            example = EditExample(text, random_sentence(generator, 2, EDIT_WORDS))
        if not trainer.check(example)[0]:
            examples.append(example)
    return examples


def read_logits(trainer: PatchTrainer, pairs: list[tuple[str, int | str]]) -> torch.Tensor:
    batch = trainer.task.batch_for(trainer.model, pairs)
    with torch.no_grad():
        return trainer.task.read_logits(trainer.model(**batch.model_kwargs()), batch)


class Snapshot:
    """Everything an edit could change: committed and in-progress patches, memory rows, logits on many inputs."""

    def __init__(self, trainer: PatchTrainer, example: EditExample) -> None:
        self.trainer = trainer
        self.pairs = [*_pairs(trainer.task, MEMORY_PAIRS + HELD_OUT), (example.text, example.target)]
        self.state = self._state()
        self.logits = read_logits(trainer, self.pairs)

    def _state(self) -> dict[str, torch.Tensor]:
        layer, adapter = self.trainer.layer, self.trainer.adapter
        state = {k: v.detach().clone() for k, v in layer.committed(adapter).items()}
        state |= {name: getattr(layer, name)[adapter].detach().clone() for name in layer.adapter_layer_names}
        state["memory"] = self.trainer.memory.rows().clone()
        return state

    def assert_unchanged(self) -> None:
        state = self._state()
        assert state.keys() == self.state.keys()
        for name, tensor in self.state.items():
            assert torch.equal(state[name], tensor), name
        assert self.trainer.layer.num_patches(self.trainer.adapter) == self.state["patch_frozen_keys"].shape[0]
        assert self.trainer.model.peft_config["default"].num_patches == self.state["patch_frozen_keys"].shape[0]
        assert torch.equal(read_logits(self.trainer, self.pairs), self.logits)


def _with_one_committed_edit(name: str, config: EditConfig | None = None) -> tuple[PatchTrainer, EditExample]:
    """A trainer that already holds one successful edit (so "unchanged" covers existing patches), and a new example."""
    trainer = make_trainer(name, config=config)
    first, second = wrong_examples(trainer, 2)
    assert trainer.edit(first, edit_id=0).success
    return trainer, second


def _assert_fails_cleanly(
    trainer: PatchTrainer, example: EditExample, match: str = "NaN|nan|inf", during: Callable = nullcontext
) -> None:
    """The edit raises NonFiniteError inside ``during()`` and, once that is over, nothing has changed."""
    snapshot = Snapshot(trainer, example)
    with during(), pytest.raises(NonFiniteError, match=match) as info:
        trainer.edit(example, edit_id=1)
    assert isinstance(info.value, PatcherError) and isinstance(info.value, ArithmeticError)
    snapshot.assert_unchanged()


def _assert_still_edits(trainer: PatchTrainer, example: EditExample) -> None:
    """After a failed edit the trainer is consistent: the same example is fixed with normal settings."""
    trainer.config = EditConfig.quick()
    record = trainer.edit(example, edit_id=2)
    assert record.success and trainer.check(example)[0]


# ------------------------------------------------------------------------------------------------ NaN / inf
@pytest.mark.parametrize("name", ["gpt2", "classifier"])
@pytest.mark.parametrize("max_steps", [1, 50])
def test_huge_learning_rate_fails_cleanly(name: str, max_steps: int) -> None:
    """lr=1e30 sends the patches to inf within a step: the loss (or, with one step, the validation loss and the
    parameter check after training) is non-finite, and the edit is rolled back although keep_failed=True."""
    trainer, example = _with_one_committed_edit(name)
    trainer.config = EditConfig.quick(lr=1e30, max_steps=max_steps, keep_failed=True)
    _assert_fails_cleanly(trainer, example)
    _assert_still_edits(trainer, example)


@contextmanager
def nan_after(module: torch.nn.Module, calls: int) -> Iterator[None]:
    """Make ``module`` output NaN from its ``calls + 1``-th forward on."""
    seen = 0

    def hook(_module: torch.nn.Module, _args: object, output: torch.Tensor) -> torch.Tensor:
        nonlocal seen
        seen += 1
        return output * float("nan") if seen > calls else output

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_nan_activations_during_training_fail_cleanly() -> None:
    """The final layer norm (after the patched FFN, so it runs on every cached step) turns NaN mid-training."""
    trainer, example = _with_one_committed_edit("gpt2")
    ln_f = trainer.model.get_base_model().transformer.ln_f
    _assert_fails_cleanly(trainer, example, "training loss became nan", lambda: nan_after(ln_f, calls=3))
    _assert_still_edits(trainer, example)


def test_nan_in_the_base_model_is_refused_before_any_patch() -> None:
    trainer, example = _with_one_committed_edit("gpt2")
    mlp = trainer.model.get_base_model().transformer.h[0].mlp
    _assert_fails_cleanly(trainer, example, "before any patch was added", lambda: nan_after(mlp, calls=0))
    _assert_still_edits(trainer, example)


def test_non_finite_edit_loss_fails_cleanly(monkeypatch: pytest.MonkeyPatch) -> None:
    trainer, example = _with_one_committed_edit("gpt2")
    edit_loss, calls = trainer.task.edit_loss, []

    def flaky(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        loss = edit_loss(logits, labels)
        return loss * float("inf") if len(calls) == 4 else loss

    monkeypatch.setattr(trainer.task, "edit_loss", flaky)
    _assert_fails_cleanly(trainer, example, match="at step 4")
    monkeypatch.undo()
    _assert_still_edits(trainer, example)


def test_non_finite_memory_row_fails_cleanly() -> None:
    """A memory bank holding an inf row (e.g. collected from a broken model) poisons the memory loss."""
    trainer, example = _with_one_committed_edit("gpt2")
    trainer.memory.append(torch.full((1, trainer.memory.dim), float("inf")))
    _assert_fails_cleanly(trainer, example, match="memory (nan|inf)")


# ------------------------------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["gpt2", "classifier"])
def test_low_precision_base_model_edits_with_float32_patches(name: str, dtype: torch.dtype) -> None:
    """bf16/fp16 base, default patch_dtype: every edit succeeds and stays fixed, the memory keeps its predictions,
    held-out inputs mostly do too, and the patches are stored in float32 while the base stays in ``dtype``."""
    trainer = make_trainer(name, dtype)
    examples = wrong_examples(trainer, 3)
    memory, held_out = _pairs(trainer.task, MEMORY_PAIRS), _pairs(trainer.task, HELD_OUT)
    before_memory, before_held_out = read_logits(trainer, memory), read_logits(trainer, held_out)
    assert before_memory.dtype == dtype

    records = [trainer.edit(example, edit_id=i) for i, example in enumerate(examples)]

    assert all(r.needed and r.success for r in records), records
    assert all(trainer.check(example)[0] for example in examples)
    assert torch.equal(trainer.task.predictions(read_logits(trainer, memory)), trainer.task.predictions(before_memory))
    agree = trainer.task.predictions(read_logits(trainer, held_out)) == trainer.task.predictions(before_held_out)
    assert agree.float().mean() >= 0.9
    assert {t.dtype for n, t in trainer.layer.committed().items() if "ids" not in n} == {torch.float32}
    assert trainer.layer.base_layer.weight.dtype == dtype


def test_bfloat16_patches_train_on_a_bfloat16_model() -> None:
    trainer = make_trainer("gpt2", torch.bfloat16, patcher=PatcherConfig(patch_dtype=None))
    examples = wrong_examples(trainer, 2)
    assert all(trainer.edit(example, edit_id=i).success for i, example in enumerate(examples))
    assert all(trainer.check(example)[0] for example in examples)
    assert trainer.layer.committed()["patch_frozen_keys"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("dtype", "patch_dtype"), [(torch.float16, None), (torch.float32, "float16"), (torch.float16, "float16")]
)
def test_float16_patches_are_refused(dtype: torch.dtype, patch_dtype: str | None) -> None:
    """Adam underflows in float16 (the loss was NaN by step 2); the trainer refuses before anything runs."""
    model = get_patcher_model(sharp_gpt2().to(dtype), PatcherConfig(patch_dtype=patch_dtype)).eval()
    with pytest.raises(ValueError, match=r"cannot train float16 patches.*patch_dtype='float32'"):
        PatchTrainer(model, task_for_model(model, tiny_tokenizer()))
    assert model.base_model.patch_layer().num_patches() == 0


# ------------------------------------------------------------------------------------------------ determinism
def _patches_after_edit(name: str, seed: int, global_seed: int) -> dict[str, torch.Tensor]:
    trainer = make_trainer(name, config=EditConfig.quick(seed=seed))
    (example,) = wrong_examples(trainer, 1)
    torch.manual_seed(global_seed)  # the trainer seeds its own generator: the global state must not matter
    record = trainer.edit(example, edit_id=5)
    assert record.needed and record.neurons > 0
    return trainer.layer.committed()


@pytest.mark.parametrize("name", ["gpt2", "classifier"])
def test_same_seed_gives_bit_identical_patches(name: str) -> None:
    first = _patches_after_edit(name, seed=7, global_seed=0)
    second = _patches_after_edit(name, seed=7, global_seed=123)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    other = _patches_after_edit(name, seed=8, global_seed=0)
    assert not torch.equal(first["patch_frozen_values"], other["patch_frozen_values"])
