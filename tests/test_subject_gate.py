"""The subject gate (``tuners.patcher.gate``): a patch adds nothing until its edit's subject has been read."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny_models import build
from tiny_tokenizer import EDIT_WORDS, random_pairs, sentence, sharp_gpt2, tiny_tokenizer
from transformer_patcher import PatcherConfig, PatcherModel, get_patcher_model
from transformer_patcher.core.errors import UnsupportedArchitectureError
from transformer_patcher.core.examples import EditExample
from transformer_patcher.core.tasks import task_for_model
from transformer_patcher.methods.patcher import EditConfig, MemoryBank, PatchTrainer, collect_queries
from transformer_patcher.methods.patcher import trainer as trainer_module
from transformer_patcher.methods.patcher.config import GATE_DEPTH
from transformer_patcher.methods.patcher.memory import answer_start_queries
from transformer_patcher.methods.patcher.replay import ForwardReplay
from transformer_patcher.methods.patcher.views import EditViews
from transformer_patcher.tuners.patcher.gate import subject_position
from transformer_patcher.tuners.patcher.keys import discriminant

SUBJECT_AT = 3  # the position of the subject in the tiny LLaMA tests' text


def gated_llama(threshold: float = 0.999) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny LLaMA with one committed patch gated on block 0's output at ``SUBJECT_AT`` of ``text``, firing at
    position 6 of it; returns the model, the text's ids and the base logits."""
    model = get_patcher_model(build("llama").eval(), PatcherConfig(gate_layer=0, gate_threshold=threshold)).eval()
    layer = model.base_model.patch_layer()
    ids = torch.arange(10, 18)[None]
    with torch.no_grad(), layer.capture() as capture:
        base = model(input_ids=ids).logits
    query, subject = capture.query[0, 6], layer.gate_reads().reads()[0, SUBJECT_AT]
    layer.add_patches(query / query.norm() ** 2 * 10, torch.zeros(1), torch.randn(1, 32) * 5, 1, subjects=subject)
    layer.commit()
    return model, ids, base


def changed(model: torch.nn.Module, ids: torch.Tensor, base: torch.Tensor) -> list[bool]:
    with torch.no_grad():
        return ((model(input_ids=ids).logits - base).abs().amax(-1) > 0)[0].tolist()


def test_a_gated_patch_adds_nothing_before_its_subject_nor_on_other_text() -> None:
    model, ids, base = gated_llama()
    assert changed(model, ids, base) == [False] * SUBJECT_AT + [True] * (ids.shape[1] - SUBJECT_AT)
    other = torch.arange(40, 48)[None]  # the same wording after another "subject" reads at 0.999 nowhere
    with torch.no_grad(), model.disable_adapter():
        other_base = model(input_ids=other).logits
    assert changed(model, other, other_base) == [False] * other.shape[1]
    layer = model.base_model.patch_layer()
    layer.patch_frozen_subjects["default"].zero_()  # a patch without a subject read: ungated, fires from the start
    assert changed(model, other, other_base)[0]


def test_the_gate_holds_through_a_cached_decode_and_left_padding() -> None:
    model, ids, _ = gated_llama(threshold=0.9)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        out = model(input_ids=ids[:, :4], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(4, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.past_key_values
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)  # the running maximum carried over the steps
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    alone = model.generate(input_ids=ids, **kwargs)[0, ids.shape[1] :]
    beside = model.generate(
        input_ids=torch.cat([padded, torch.arange(30, 41)[None]]),
        **kwargs,
        attention_mask=torch.cat([mask, torch.ones(1, 11, dtype=torch.long)]),
    )
    assert beside[0, padded.shape[1] :].tolist() == alone.tolist()


def reloaded_without(model: torch.nn.Module, ids: torch.Tensor, folder: Path, part: str) -> PatcherModel:
    """``model`` saved under ``folder``, checked to load back bit-identical on ``ids``, then loaded from a copy of its
    file without the tensors whose names hold ``part`` (a file written before they existed)."""
    with torch.no_grad():
        patched = model(input_ids=ids).logits
    model.save_pretrained(folder / "saved")
    loaded = PatcherModel.from_pretrained(build("llama").eval(), folder / "saved").eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, patched)
    weights = load_file(folder / "saved" / "adapter_model.safetensors")
    old = folder / "old"
    old.mkdir()
    (old / "adapter_config.json").write_text((folder / "saved" / "adapter_config.json").read_text())
    save_file({k: v for k, v in weights.items() if part not in k}, old / "adapter_model.safetensors")
    return PatcherModel.from_pretrained(build("llama").eval(), old).eval()


def test_subject_reads_round_trip_and_a_file_without_them_loads_ungated(tmp_path: Path) -> None:
    model, ids, base = gated_llama()
    # a file written before the gate: no subject tensors, so every patch is ungated
    ungated = reloaded_without(model, ids, tmp_path, "subjects")
    assert not ungated.base_model.patch_layer().patch_frozen_subjects["default"].any()
    assert changed(ungated, ids, base)[0]  # fires before the subject too


@pytest.mark.parametrize(
    ("name", "config", "match"),
    [
        ("bert", PatcherConfig(gate_layer=0), "decoder-only"),
        ("bart", PatcherConfig(gate_layer=0), "decoder-only"),
        ("llama", PatcherConfig(gate_layer=2), "out of range"),
        ("llama", PatcherConfig(gate_layer=0, gate_module="model.layers.1"), "disagrees"),
        ("llama", PatcherConfig(gate_module="model.layers.1"), "without gate_layer"),
        ("bert", PatcherConfig(gate_depth=0.5), "decoder-only"),
        ("llama", PatcherConfig(gate_layer=0, gate_depth=1.0), "disagrees"),
    ],
)
def test_a_gate_the_model_cannot_have_is_refused(name: str, config: PatcherConfig, match: str) -> None:
    base = build(name)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(UnsupportedArchitectureError, match=match):
        get_patcher_model(base, config)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


@pytest.mark.parametrize("threshold", [0.0, 1.5, True, float("nan")])
def test_a_gate_threshold_outside_0_1_is_refused(threshold: object) -> None:
    with pytest.raises(ValueError, match="gate_threshold"):
        PatcherConfig(gate_layer=0, gate_threshold=threshold)
    with pytest.raises(ValueError, match="gate_threshold"):
        EditConfig(gate_threshold=threshold)


@pytest.mark.parametrize("depth", [-0.1, 1.5, True, float("nan"), "0.5"])
def test_a_gate_depth_outside_0_1_is_refused(depth: object) -> None:
    with pytest.raises(ValueError, match="gate_depth"):
        PatcherConfig(gate_depth=depth)
    with pytest.raises(ValueError, match="gate_depth"):
        EditConfig(gate_depth=depth)


@pytest.mark.parametrize(("depth", "block"), [(0.0, 0), (0.4, 0), (0.6, 1), (1.0, 1)])
def test_gate_depth_picks_the_block_that_far_down_and_the_file_says_which(
    tmp_path: Path, depth: float, block: int
) -> None:
    model = get_patcher_model(build("llama").eval(), PatcherConfig(gate_depth=depth))
    config = model.peft_config["default"]
    assert (config.gate_layer, config.gate_module) == (block, f"model.layers.{block}")
    model.save_pretrained(tmp_path)
    loaded = PatcherModel.from_pretrained(build("llama").eval(), tmp_path)
    assert loaded.peft_config["default"].gate_module == f"model.layers.{block}"
    assert f"model.layers.{block}" in loaded.base_model.patch_layer().gates


def test_the_default_gates_causal_lms_only_and_the_faithful_mode_never() -> None:
    default = EditConfig()
    assert default.adapter_config("causal_lm").gate_depth == default.gate_depth == GATE_DEPTH
    assert default.gate_frame and default.key_views > 0
    assert EditConfig(gate_layer=3).adapter_config("causal_lm").gate_depth is None  # the explicit block wins
    for kind in ("classification", "seq2seq"):
        config = default.adapter_config(kind)
        assert config.gate_layer is None and config.gate_depth is None
    faithful = EditConfig.faithful()
    assert faithful.key_views == 0
    assert faithful.adapter_config("causal_lm").gate_layer is None
    assert faithful.adapter_config("causal_lm").gate_depth is None


def test_subject_position_finds_the_last_token_of_the_last_mention() -> None:
    tokenizer = tiny_tokenizer()
    ids = tokenizer(sentence(10, 11, 12, 11, 13))["input_ids"]  # [BOS] first
    assert subject_position(tokenizer, ids, "w11") == 4
    assert subject_position(tokenizer, ids, "w11 w12") == 3
    assert subject_position(tokenizer, ids, "w99") is None


def gated_trainer() -> PatchTrainer:
    model = get_patcher_model(sharp_gpt2(), EditConfig(gate_layer=0).adapter_config("causal_lm")).eval()
    task = task_for_model(model, tiny_tokenizer())
    return PatchTrainer(model, task, EditConfig(gate_layer=0), MemoryBank(memory_rows(model)))


def memory_rows(model: torch.nn.Module) -> torch.Tensor:
    task, layer = task_for_model(model, tiny_tokenizer()), model.base_model.patch_layer()
    return collect_queries(model, layer, task, random_pairs(40, seed=1), 10_000, progress=False)


def test_an_edit_gates_its_patches_on_its_subject_and_leaves_other_subjects_alone() -> None:
    trainer = gated_trainer()
    words = list(range(*EDIT_WORDS))
    text, target = sentence(*words[:4]), sentence(*words[10:12])
    neighbour = (sentence(words[0], words[20], *words[2:4]), target)  # the same wording about another subject
    before = trainer.task.read_logits(
        trainer.model(**trainer.task.batch_for(trainer.model, [neighbour]).model_kwargs()),
        trainer.task.batch_for(trainer.model, [neighbour]),
    )
    record = trainer.edit(EditExample(text, target, subject=f"w{words[1]}"), edit_id=0)
    assert record.needed and record.success
    subjects = trainer.layer.patch_frozen_subjects["default"]
    assert torch.allclose(subjects.norm(dim=1), torch.ones(len(subjects)))  # every patch holds the unit read
    assert trainer.check(EditExample(text, target))[0]
    batch = trainer.task.batch_for(trainer.model, [neighbour])
    with torch.no_grad():
        after = trainer.task.read_logits(trainer.model(**batch.model_kwargs()), batch)
    assert torch.equal(after, before)  # closed: not a bit changed


def test_an_edit_without_a_subject_in_its_text_is_ungated() -> None:
    trainer = gated_trainer()
    words = list(range(*EDIT_WORDS))
    record = trainer.edit(EditExample(sentence(*words[:4]), sentence(*words[10:12])), edit_id=0)
    assert record.needed and record.success
    assert not trainer.layer.patch_frozen_subjects["default"].any()


def test_replay_keeps_the_gate_block_although_no_patch_reads_it_yet() -> None:
    trainer = gated_trainer()
    batch = trainer.task.batch_for(trainer.model, random_pairs(2, seed=5))
    replay = ForwardReplay(trainer.model, trainer.layer)
    replay.record(lambda: trainer.model(**batch.model_kwargs()))
    unread = replay.find_unread(lambda: trainer.model(**batch.model_kwargs()))
    assert replay.gate_names and not replay.gate_names & unread
    assert any(name.endswith("transformer.h.0") for name in replay.gate_names)


@pytest.mark.parametrize("gated_contrasts", [True, False])
def test_a_gated_patch_asks_other_subjects_only_when_told_to(gated_contrasts: bool) -> None:
    trainer = gated_trainer()
    trainer.config = EditConfig(gate_layer=0, gated_contrasts=gated_contrasts)
    asked: list[str] = []

    def contrasts(example: EditExample, nearest: object = ()) -> list[str]:
        asked.append(example.text)
        return [sentence(EDIT_WORDS[0] + 50, *range(EDIT_WORDS[0] + 1, EDIT_WORDS[0] + 4))]  # another subject

    trainer.contrasts = contrasts
    words = list(range(*EDIT_WORDS))
    subject = f"w{words[1]}"
    trainer.edit(EditExample(sentence(*words[:4]), sentence(*words[10:12]), subject=subject), edit_id=0)
    assert bool(asked) == gated_contrasts
    asked.clear()
    trainer.edit(EditExample(sentence(*words[30:34]), sentence(*words[40:42])), edit_id=1)  # no subject: ungated
    assert asked  # an ungated patch still rises above other subjects


def test_only_contrasts_that_open_the_gate_bound_a_gated_patch(monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = gated_trainer()
    words = list(range(*EDIT_WORDS))
    other = sentence(words[0], words[20], *words[2:4])  # the edit's wording about another subject: gate closed
    same = sentence(*words[:2], words[25], words[26])  # its subject asked something else: gate open
    seen: list[torch.Tensor | None] = []
    original = trainer._separating_keys

    def spy(queries, target, first_read=True, contrasts=(), views=(), about=None, gated=False):  # type: ignore[no-untyped-def]
        seen.extend(contrasts)
        return original(queries, target, first_read, contrasts, views, about, gated)

    monkeypatch.setattr(trainer, "_separating_keys", spy)
    example = EditExample(sentence(*words[:4]), sentence(*words[10:12]), subject=f"w{words[1]}", keep=(other, same))
    trainer.edit(example, edit_id=0)
    expected = answer_start_queries(trainer.model, trainer.layer, trainer.task, [same], example.target)
    assert seen[0] is not None and torch.equal(seen[0], expected)
    seen.clear()
    ungated = EditExample(sentence(*words[30:34]), sentence(*words[40:42]), keep=(other, same))  # no subject
    trainer.edit(ungated, edit_id=1)
    assert seen[0] is not None and len(seen[0]) == 2  # an ungated patch stays below both


@pytest.mark.parametrize("gated_contexts", [True, False])
def test_a_gated_patch_stays_above_running_text_only_when_told_to(gated_contexts: bool) -> None:
    trainer = gated_trainer()
    trainer.config = EditConfig(gate_layer=0, gated_contexts=gated_contexts)
    read: list[list[int]] = []

    class Contexts:  # the running-text contexts a later answer token's patch stays above
        def queries(self, model: object, layer: object, ids: list[int], pad_id: object) -> list[None]:
            read.append(ids)
            return [None] * len(ids)

    trainer.contexts = Contexts()
    words = list(range(*EDIT_WORDS))
    record = trainer.edit(EditExample(sentence(*words[:4]), sentence(*words[10:13]), subject=f"w{words[1]}"), 0)
    assert record.neurons > 1  # later answer tokens were patched
    assert bool(read) == gated_contexts
    read.clear()
    trainer.edit(EditExample(sentence(*words[30:34]), sentence(*words[40:43])), edit_id=1)  # no subject: ungated
    assert read


@pytest.mark.parametrize("gated_answer_gate", [0.0, 0.5])
def test_a_gated_patch_fires_its_later_answer_tokens_from_gated_answer_gate(gated_answer_gate: float) -> None:
    """Behind its gate a later answer token's threshold sits `gated_answer_gate` of the way from the top memory row
    to the edit (0: 1 above that row, as the first token's; 0.5: slack 12 for the edit's 12); an ungated patch keeps
    `answer_gate` (0.5)."""
    trainer = gated_trainer()
    trainer.config = EditConfig(gate_layer=0, gated_answer_gate=gated_answer_gate, weak_lead=0)
    words = list(range(*EDIT_WORDS))
    tops = []
    for start, subject in ((0, f"w{words[1]}"), (30, None)):
        text, target = sentence(*words[start : start + 4]), sentence(*words[start + 10 : start + 12])
        example = EditExample(text, target, subject=subject)
        rows = trainer.memory.rows()  # what the patch stays below: the built memory and the earlier edit's rows
        record = trainer.edit(example, edit_id=start)
        assert record.success and record.neurons == 2 and record.steps == 0  # the solved keys, untrained
        keys, bias = trainer.layer.committed()["patch_frozen_keys"], trainer.layer.committed()["patch_frozen_bias"]
        tops.append((rows @ keys[-2:].T + bias[-2:]).max(0).values.tolist())
    gated, ungated = tops
    subjects = trainer.layer.committed()["patch_frozen_subjects"]
    assert bool(subjects[:2].any()) and not bool(subjects[2:].any())  # the first edit gated, the second not
    assert gated == pytest.approx([-1.0, -1.0 if gated_answer_gate == 0 else -12.0], abs=0.1)
    assert ungated == pytest.approx([-1.0, -12.0], abs=0.1)
    with pytest.raises(ValueError, match="gated_answer_gate"):
        EditConfig(gated_answer_gate=1.0)


@pytest.mark.parametrize("gated_views", [True, False])
def test_a_gated_patch_keys_its_later_answer_tokens_over_the_views_when_told_to(
    monkeypatch: pytest.MonkeyPatch, gated_views: bool
) -> None:
    trainer = gated_trainer()
    trainer.config = EditConfig(gate_layer=0, key_views=2, gated_views=gated_views)
    trainer.views = EditViews(["w10 w11 w12", "w20 w21"])
    viewed: list[bool] = []

    def spy(query: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        views = args[3] if len(args) > 3 else kwargs.get("views")
        viewed.append(isinstance(views, torch.Tensor) and views.numel() > 0)
        return discriminant(query, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "discriminant", spy)
    words = list(range(*EDIT_WORDS))
    text, target = sentence(*words[:4]), sentence(*words[10:13])
    record = trainer.edit(EditExample(text, target, subject=f"w{words[1]}"), edit_id=0)
    assert record.success and record.neurons == 3 and trainer.check(EditExample(text, target))[0]
    assert viewed[:3] == [True, gated_views, gated_views]  # the first answer token is keyed over views always
    viewed.clear()
    trainer.edit(EditExample(sentence(*words[30:34]), sentence(*words[40:43])), edit_id=1)  # no subject: ungated
    assert viewed[:3] == [True, False, False]


def about_subject(text: str, subject: str, count: int) -> list[str]:
    """Other questions about ``subject`` in the tiny vocabulary: its word behind other openings and endings."""
    words = list(range(*EDIT_WORDS))
    return [f"w{words[i]} {subject} w{words[i + 1]} w{words[i + 2]}" for i in range(20, 44, 3)][:count]


def test_a_subject_key_is_told_from_its_subject_and_bounded_by_it_not_the_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``subject_key``: the gated first answer token's key is built against other questions about the subject and
    stays silent on them, while the memory rows (other subjects, behind the closed gate) no longer bound it."""
    trainer = gated_trainer()
    trainer.config = EditConfig(gate_layer=0, subject_key=8, key_views=0)
    trainer.asked_about = about_subject
    used: list[object] = []
    original = trainer._subject_key
    monkeypatch.setattr(trainer, "_subject_key", lambda *a: used.append(original(*a)) or used[-1])
    words = list(range(*EDIT_WORDS))
    subject = f"w{words[1]}"
    example = EditExample(sentence(*words[:4]), sentence(*words[10:12]), subject=subject)
    record = trainer.edit(example, edit_id=0)
    assert record.success and used and used[0] is not None and trainer._local is None
    bound = used[0][2]
    asked = about_subject(example.text, subject, 8)
    assert len(bound) >= 2  # the questions that open the gate (every format the key reaches)
    layer = trainer.layer
    k, b = layer.patch_frozen_keys["default"][0], layer.patch_frozen_bias["default"][0]
    read = layer.patch_frozen_subjects["default"][0]
    rows = answer_start_queries(trainer.model, layer, trainer.task, asked, example.target, gated_on=read)
    assert len(rows) >= 2  # these open its gate
    edit_row = answer_start_queries(trainer.model, layer, trainer.task, [example.text], example.target)
    assert bool((rows @ k + b <= 0).all())  # silent on the other questions about its subject that open the gate
    assert float(edit_row[0] @ k + b) > 0  # and fires on the edit
    assert float(trainer.memory.rows()[: trainer.memory._base].matmul(k).add(b).max()) > 0  # the memory: unbound


def test_subject_key_leaves_an_edit_without_a_subject_as_it_was() -> None:
    words = list(range(*EDIT_WORDS))
    example = EditExample(sentence(*words[30:34]), sentence(*words[40:42]))  # names no subject: ungated
    committed = []
    for on in (False, True):
        trainer = gated_trainer()
        trainer.config = EditConfig(gate_layer=0, subject_key=8 * on)
        trainer.asked_about = about_subject
        trainer.edit(example, edit_id=0)
        committed.append(trainer.layer.committed("default"))
    assert committed[0].keys() == committed[1].keys()
    assert all(torch.equal(committed[0][n], committed[1][n]) for n in committed[0])


def edits_naming_another_subject() -> list[EditExample]:
    """Two edits whose texts both name w1: the first as a bystander (its subject is w22), the second as its subject;
    then one about neither."""
    words = list(range(*EDIT_WORDS))
    bystander = sentence(words[20], words[1], words[22], words[23])
    return [
        EditExample(bystander, sentence(*words[24:26]), subject=f"w{words[22]}"),
        EditExample(sentence(*words[:4]), sentence(*words[10:12]), subject=f"w{words[1]}"),
        EditExample(sentence(*words[30:34]), sentence(*words[40:42]), subject=f"w{words[31]}"),
    ]


def test_gate_traces_say_where_each_patch_opens_on_the_edits_rows_as_the_adapter_does() -> None:
    """The traces answer, for every appended row and every gated patch, what the adapter's gate does at that row's
    read, including a later patch opening on an earlier text at a position other than that text's subject. With key
    views and kept prompts the trainer runs the gate block on other texts before the edit's rows are appended: the
    traces must not take those."""
    trainer = gated_trainer()
    trainer.config = EditConfig(gate_layer=0, key_views=2)
    trainer.views = EditViews(["w10 w11 w12", "w20 w21"])
    words = list(range(*EDIT_WORDS))
    kept = (sentence(words[1], *words[50:56]),)  # a longer text that opens the second edit's gate
    examples = [replace(e, keep=kept) for e in edits_naming_another_subject()]
    for i, example in enumerate(examples):
        assert trainer.edit(example, edit_id=i).success
    layer = trainer.layer
    threshold = layer.patch_config["default"].gate_threshold
    subjects = layer.patch_frozen_subjects["default"]
    expected = []
    for example in examples:
        batch = trainer.task.batch_for(trainer.model, [(example.text, example.target)])
        with torch.no_grad(), layer.capture():
            trainer.model(**batch.model_kwargs())
        gate = layer.gate_reads()
        expected.append(gate.opened(subjects, threshold, "test", layer.gate_frame())[0, batch.cols])
    expected = torch.cat(expected)  # (rows, patches)
    assert len(expected) == trainer.memory.n_appended == len(trainer._traces)
    got = torch.stack([trainer._traces.opening(s, threshold) for s in subjects], dim=1)
    assert torch.equal(got, expected)
    ids = layer.edit_ids()
    first_rows = len(trainer.task.batch_for(trainer.model, [(examples[0].text, examples[0].target)]).cols)
    later = ids == 1
    assert bool(got[:first_rows, later].any())  # the second edit's patches open on the first's text (it names w1)
    assert float(subjects[ids == 0][0] @ subjects[later][0]) < threshold  # though their subject reads differ
    assert not bool(got.all())  # and shut somewhere


def test_the_gate_traces_of_the_memory_rows_edits_appended_are_checkpointed() -> None:
    trainer = gated_trainer()
    words = list(range(*EDIT_WORDS))
    trainer.edit(EditExample(sentence(*words[:4]), sentence(*words[10:12]), subject=f"w{words[1]}"), edit_id=0)
    state = trainer.state_tensors()
    spans = state["memory.appended.gate_spans"]
    assert len(spans) == trainer.memory.n_appended > 0 and bool((spans[:, 1] > spans[:, 0]).all())
    trainer.reset()
    assert len(trainer._traces) == 0
    trainer.load_state_tensors(state)
    assert torch.equal(trainer._traces.spans, spans)
    assert torch.equal(trainer._traces.reads, state["memory.appended.gate_reads"])
    with pytest.raises(ValueError, match="gate_spans"):
        trainer.load_state_tensors(state | {"memory.appended.gate_spans": spans[:-1]})
    with pytest.raises(ValueError, match="within"):
        trainer.load_state_tensors(state | {"memory.appended.gate_spans": spans + 100})
    older = {k: v for k, v in state.items() if ".gate_" not in k}  # a checkpoint from before the traces
    trainer.load_state_tensors(older)
    assert bool(trainer._traces.opening(torch.randn(trainer.layer.output_dim), 0.8).all())  # its rows open every gate


@pytest.mark.parametrize("gated_edit_rows", [True, False])
def test_a_gated_patch_stays_below_only_the_earlier_rows_its_gate_opens_on(
    monkeypatch: pytest.MonkeyPatch, gated_edit_rows: bool
) -> None:
    """``gated_edit_rows``: while a gated edit is trained, the memory leaves out the earlier edits' rows its gate is
    shut on (and only those); the new patches still stay below every row they can meet."""
    trainer = gated_trainer()
    trainer.config = EditConfig(gate_layer=0, gated_edit_rows=gated_edit_rows)
    words = list(range(*EDIT_WORDS))
    first = EditExample(sentence(*words[30:34]), sentence(*words[40:42]), subject=f"w{words[31]}")
    assert trainer.edit(first, edit_id=0).success
    skipped: list[torch.Tensor | None] = []
    original = MemoryBank.skipping

    def spy(bank: MemoryBank, appended: torch.Tensor | None) -> object:
        skipped.append(appended)
        return original(bank, appended)

    monkeypatch.setattr(MemoryBank, "skipping", spy)
    second = EditExample(sentence(*words[:4]), sentence(*words[10:12]), subject=f"w{words[1]}")
    rows = trainer.memory.appended()
    assert trainer.edit(second, edit_id=1).success
    layer = trainer.layer
    subject = layer.patch_frozen_subjects["default"][layer.edit_ids() == 1][0]
    if not gated_edit_rows:
        assert skipped == []
        return
    shut = ~trainer._traces.opening(subject, layer.patch_config["default"].gate_threshold)[: len(rows)]
    assert len(skipped) == 1 and torch.equal(skipped[0], shut) and bool(shut.any())
    keys, bias = layer.committed()["patch_frozen_keys"], layer.committed()["patch_frozen_bias"]
    new = layer.edit_ids() == 1
    met = torch.cat([trainer.memory.rows()[: trainer.memory._base], rows[~shut]])
    assert float((met @ keys[new].T + bias[new]).max()) <= 0  # silent (ReLU6) on every row it can meet


@pytest.mark.parametrize("whiten_edit_rows", [True, False])
def test_a_key_is_whitened_by_the_built_memory_unless_told_to_count_the_edits(
    monkeypatch: pytest.MonkeyPatch, whiten_edit_rows: bool
) -> None:
    """``whiten_edit_rows`` (rule 17): the mean and precision a later edit's keys are solved with are those of the
    rows the memory was built with, or with the earlier edits' rows counted too."""
    trainer = gated_trainer()
    trainer.config = EditConfig(gate_layer=0, whiten_edit_rows=whiten_edit_rows)
    words = list(range(*EDIT_WORDS))
    first = EditExample(sentence(*words[30:34]), sentence(*words[40:42]), subject=f"w{words[31]}")
    assert trainer.edit(first, edit_id=0).success and trainer.memory.n_appended > 0
    counted = len(trainer.memory) if whiten_edit_rows else len(trainer.memory) - trainer.memory.n_appended
    used: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = MemoryBank.statistics

    def spy(bank: MemoryBank, ridge: float, edit_rows: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        found = original(bank, ridge, edit_rows)
        if bank is trainer.memory:
            used.append(found)
        return found

    monkeypatch.setattr(MemoryBank, "statistics", spy)
    second = EditExample(sentence(*words[:4]), sentence(*words[10:12]), subject=f"w{words[1]}")
    assert trainer.edit(second, edit_id=1).success
    expected = MemoryBank(trainer.memory.rows()[:counted]).statistics(trainer.config.whiten_ridge)
    assert used and all(torch.allclose(m, expected[0], atol=1e-5) for m, _ in used)
    assert all(torch.allclose(p, expected[1], rtol=1e-3, atol=1e-3) for _, p in used)
