"""PMET target optimisation in parts: the prompt batch, the delta hooks, the early exits, passing the lower blocks
by, and batching that changes nothing (each request leaves the batch at its own exit)."""

from __future__ import annotations

import pytest
import torch

from test_pmet_editor import HPARAMS, _model, _requests
from tiny_models import build
from tiny_tokenizer import EDIT_WORDS, sentence, tiny_tokenizer
from transformer_patcher.methods.pmet import EditRequest, compute_targets, covariance
from transformer_patcher.methods.pmet import targets as targets_module
from transformer_patcher.methods.pmet.architecture import block_modules, unwrap
from transformer_patcher.methods.pmet.hparams import PRECISIONS
from transformer_patcher.methods.pmet.lower_blocks import LowerBlocks
from transformer_patcher.methods.pmet.requests import target_ids
from transformer_patcher.methods.pmet.targets import (
    KL_EXIT,
    LOSS_EXIT,
    SubjectShift,
    balanced_groups,
    build_batch,
    delta_sites,
    forward_reads,
    is_done,
    prefix_keys,
    step_reads,
    steps_precision,
)

TEMPLATES = [["{}"], ["w5 w6. {}", "w7. {}"]]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_the_batch_holds_each_requests_template_prompts_then_its_kl_prompt(tokenizer) -> None:
    requests = _requests(2)
    batch = build_batch(tokenizer, requests, TEMPLATES, torch.device("cpu"))
    assert batch.first_row == [0, 4] and batch.kl_rows == [3, 7]
    assert batch.owner == [0, 0, 0, 0, 1, 1, 1, 1] and batch.owners.tolist() == batch.owner
    answers = [target_ids(tokenizer, r.target) for r in requests]
    assert all(len(a) == 1 for a in answers)  # one read per template prompt, none on the KL prompts
    assert batch.read_row.tolist() == [0, 1, 2, 4, 5, 6]
    assert batch.read_label.tolist() == [answers[0][0]] * 3 + [answers[1][0]] * 3
    for row in range(batch.n_rows):  # the lookup is the subject's (last) token, the reads are the prompt's end
        subject = requests[batch.owner[row]].subject
        assert tokenizer.convert_ids_to_tokens(int(batch.input_ids[row, batch.lookups[row]])) == subject
    length = batch.attention.sum(1)
    assert (batch.read_pos == length[batch.read_row] - 1).all()


@pytest.mark.parametrize("per_sequence", [1, 2])
def test_a_step_packs_only_the_active_requests_a_few_to_a_sequence(per_sequence: int, tokenizer) -> None:
    batch = build_batch(tokenizer, _requests(3), TEMPLATES, torch.device("cpu"))
    reads = step_reads(batch, [0, 2], per_sequence)
    assert sorted(reads.rows) == [0, 1, 2, 3, 8, 9, 10, 11]
    assert (reads.start[4:8] == -1).all() and (reads.group[4:8] == -1).all()
    assert reads.token_row.shape[0] == 3 - per_sequence  # two sequences of one request, or one of both
    lengths = batch.attention.sum(1)
    for row in reads.rows:  # each row's suffix, whole, at its place in its request's sequence
        g, s, n = int(reads.group[row]), int(reads.start[row]), int(lengths[row])
        assert reads.input_ids[g, s : s + n].tolist() == batch.input_ids[row, :n].tolist()
        assert (reads.token_row[g, s : s + n] == row).all() and reads.token_col[g, s : s + n].tolist() == list(range(n))
        assert g == int(reads.group[batch.first_row[batch.owner[row]]])
    assert int((reads.token_row >= 0).sum()) == int(lengths[reads.rows].sum())  # the other tokens are padding
    assert set(batch.owners[reads.t_row].tolist()) == {0, 2}
    assert reads.k_row.tolist() == [3, 11]


def test_a_steps_requests_go_into_sequences_of_about_equal_length() -> None:
    assert balanced_groups([5, 1, 4, 2], 2) == [[0, 1], [2, 3]]  # 5 and 1 beside 4 and 2
    assert balanced_groups([1] * 5, 2) == [[0, 3], [1, 4], [2]]
    assert balanced_groups([7], 4) == [[0]]


def test_the_hooks_add_each_requests_delta_at_its_subject_and_come_off(tokenizer) -> None:
    model = _model("gpt2")
    base = unwrap(model)
    batch = build_batch(tokenizer, _requests(2), TEMPLATES, torch.device("cpu"))
    sites = delta_sites(base, HPARAMS.with_options(variant="memit"))
    shift = SubjectShift(batch, list(sites), 32, torch.device("cpu"))
    with torch.no_grad():
        shift.deltas["block"][1].fill_(1.0)
    block = base.get_submodule(sites["block"])
    shift.rows = list(range(batch.n_rows))
    shift.where = (torch.arange(batch.n_rows), batch.lookups)

    def block_output() -> torch.Tensor:  # read by a hook registered last, so after the shift's
        seen: list[torch.Tensor] = []
        reader = block.register_forward_hook(lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out))
        try:
            base.base_model(input_ids=batch.input_ids, attention_mask=batch.attention)
        finally:
            reader.remove()
        return seen[0]

    with torch.no_grad():
        plain = block_output()
        with pytest.raises(RuntimeError, match="boom"), shift.attached(base, sites):
            shifted = block_output()
            raise RuntimeError("boom")
        after = block_output()  # the hooks are off again
    assert torch.equal(after, plain)
    difference = shifted - plain
    rows = torch.arange(batch.n_rows)
    expected = (batch.owners == 1).float()[:, None].expand(-1, 32)
    torch.testing.assert_close(difference[rows, batch.lookups], expected, rtol=0, atol=1e-5)
    difference[rows, batch.lookups] = 0
    assert not difference.any()
    for r, row in enumerate(batch.first_row):  # pre-edit values: the first forward, at the bare prompt
        assert torch.equal(shift.init["block"][r], plain[row, batch.lookups[row]])


def _mid_subject_requests() -> list[EditRequest]:
    """Subjects of 1–2 tokens in the middle of prompts of different lengths, answers of 1–2 tokens."""
    low = EDIT_WORDS[0]
    return [
        EditRequest(sentence(low, 10, low + 1, low + 2), sentence(10), sentence(low + 40)),
        EditRequest(sentence(11, 12, low + 3), sentence(11, 12), sentence(low + 41, low + 42)),
        EditRequest(sentence(low + 4, low + 5, low + 6, 13, low + 7), sentence(13), sentence(low + 43)),
    ]


@pytest.mark.parametrize(
    ("arch", "variant", "per_sequence"), [("gpt2", "pmet", 1), ("llama", "pmet", 2), ("llama", "memit", 1)]
)
def test_running_the_packed_suffixes_on_the_prefix_keys_equals_running_whole_prompts(
    arch: str, variant: str, per_sequence: int, tokenizer
):
    """A step runs each prompt from the subject's last token on, packed a request or two to a sequence (padded to
    the longest), on the prefix keys computed once; the log-probabilities it reads are those of the whole prompt with
    the deltas added at the subject's last token."""
    base = unwrap(_model(arch))
    batch = build_batch(tokenizer, _mid_subject_requests(), TEMPLATES, torch.device("cpu"))
    assert len(set(batch.prefix_attention.sum(1).tolist())) > 2  # prefixes of several lengths, left-padded
    sites = delta_sites(base, HPARAMS.with_options(variant=variant))
    shift = SubjectShift(batch, list(sites), 32, torch.device("cpu"))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for delta in shift.parameters():
            delta.copy_(torch.randn(32, generator=generator))
    reads = step_reads(batch, [0, 2], per_sequence)
    shift.rows, shift.where = reads.rows, reads.writes
    keys = prefix_keys(base, batch)  # before the hooks: the deltas never reach the prefixes
    with torch.no_grad(), shift.attached(base, sites):
        split = forward_reads(base, batch, reads, keys)
    whole: list[torch.Tensor] = []
    for row_reads in (reads.t_row, reads.k_row):
        for read, row in enumerate(row_reads.tolist()):
            prefix = batch.prefix_ids[row][batch.prefix_attention[row] == 1]
            suffix = batch.input_ids[row][batch.attention[row] == 1]
            shift.rows, shift.where = [row], (torch.tensor([0]), torch.tensor([len(prefix)]))  # the subject
            with torch.no_grad(), shift.attached(base, sites):
                hidden = base.base_model(input_ids=torch.cat([prefix, suffix])[None]).last_hidden_state
            position = len(prefix) + (reads.t_pos[read] if row_reads is reads.t_row else 0)
            whole.append(torch.log_softmax(base.get_output_embeddings()(hidden[0, position]).float(), -1))
    torch.testing.assert_close(split, torch.stack(whole), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3_text", "gpt_neox"])
def test_a_step_that_passes_the_lower_blocks_by_reads_what_running_them_reads(arch: str, tokenizer) -> None:
    """The window's forward of whole prompts records what enters block ``layer`` at the suffix tokens; then no step
    runs the blocks below it (none of their modules is called): block ``layer`` gets their recorded output, and the
    step reads what running every block reads, whichever requests it holds. Outside, every block runs again."""
    base = unwrap(build(arch))
    batch = build_batch(tokenizer, _mid_subject_requests(), TEMPLATES, torch.device("cpu"))
    hparams = HPARAMS.with_options(layers=(1,))
    sites = delta_sites(base, hparams)
    shift = SubjectShift(batch, list(sites), base.config.hidden_size, torch.device("cpu"))
    with torch.no_grad():
        for delta in shift.parameters():
            delta.copy_(torch.randn(delta.shape, generator=torch.Generator().manual_seed(3)))
    lower = LowerBlocks(base, 1)
    keys = prefix_keys(base, batch, lower, requests_per_forward=2)  # two forwards: each its own widths
    below = base.get_submodule(block_modules(base, 0).ffn_out)
    calls: list[int] = []
    below.register_forward_hook(lambda *_: calls.append(1))

    def read(active: list[int]) -> torch.Tensor:
        reads = step_reads(batch, active)
        shift.rows, shift.where = reads.rows, reads.writes
        lower.tokens = reads.tokens
        with torch.no_grad(), shift.attached(base, sites):
            return forward_reads(base, batch, reads, keys)

    steps = ([0, 1, 2], [0, 2], [1], [2, 1])
    plain = {tuple(active): read(active) for active in steps}
    calls.clear()
    with lower.attached():
        passed = {tuple(active): read(active) for active in steps}
    assert not calls
    for active in plain:
        torch.testing.assert_close(passed[active], plain[active], rtol=1e-4, atol=1e-5)
    assert "forward" not in base.get_submodule(block_modules(base, 0).block).__dict__
    read([0])
    assert calls


@pytest.mark.parametrize(
    ("settled", "step", "loss", "kl", "run", "done"),
    [
        (0, 0, LOSS_EXIT / 2, 1.0, 0, True),  # a small loss
        (0, 59, 1.0, 1.0, 0, True),  # the last step
        (0, 0, 1.0, KL_EXIT, 1, True),  # on target with a small KL
        (0, 0, 1.0, KL_EXIT, 0, False),
        (0, 0, 1.0, 2 * KL_EXIT, 1, False),
        (0, 5, 1.0, 2 * KL_EXIT, 5, False),  # the official exits never count the steps on target
        (3, 5, 1.0, 2 * KL_EXIT, 2, False),
        (3, 5, 1.0, 2 * KL_EXIT, 3, True),  # settled: on target three steps in a row
        (3, 5, 1.0, KL_EXIT, 1, True),  # the official exits still apply
    ],
)
def test_early_exits(settled: int, step: int, loss: float, kl: float, run: int, done: bool) -> None:
    hparams = HPARAMS.with_options(settled_steps=settled)
    assert is_done(hparams, step, torch.tensor(loss), torch.tensor(kl), run) is done


def test_a_settled_exit_stops_a_request_that_stays_on_target(tokenizer) -> None:
    """On a tiny model the official exits run every request to the last step; with ``settled_steps`` a request
    stops once its target has been the argmax for that many steps in a row, and its target is still the argmax."""
    model = _model("gpt2")
    hparams = HPARAMS.with_options(v_num_grad_steps=40, requests_per_step=4)
    requests = _requests(4)
    full = compute_targets(model, tokenizer, requests, hparams, TEMPLATES, False)
    settled = compute_targets(model, tokenizer, requests, hparams.with_options(settled_steps=2), TEMPLATES, False)
    assert full.steps == [40] * 4
    assert all(steps < 40 for steps in settled.steps)
    assert all(p > 0.5 for p in settled.probabilities)


@pytest.mark.parametrize(
    ("arch", "variant", "per_sequence"), [("gpt2", "pmet", 4), ("gpt2", "pmet", 1), ("llama", "memit", 2)]
)
def test_optimising_together_equals_optimising_alone(
    arch: str, variant: str, per_sequence: int, tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four requests in one step, packed into one sequence or several padded ones, reach what each reaches alone."""
    monkeypatch.setattr(targets_module, "GROUP", per_sequence)
    model = _model(arch)
    hparams = HPARAMS.with_options(variant=variant, v_num_grad_steps=20)
    requests = _requests(4)
    alone = compute_targets(model, tokenizer, requests, hparams.with_options(requests_per_step=1), TEMPLATES, False)
    together = compute_targets(model, tokenizer, requests, hparams.with_options(requests_per_step=4), TEMPLATES, False)
    assert alone.steps == together.steps
    # together the prefixes are padded to another width, which changes float rounding (20 Adam steps carry it)
    torch.testing.assert_close(together.init, alone.init, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(together.values, alone.values, rtol=1e-4, atol=1e-4)
    assert together.probabilities == pytest.approx(alone.probabilities, rel=1e-4)
    if variant == "memit":  # one delta, written whole
        assert together.attention_norms is None
    else:  # the attention delta PMET optimises and does not write
        assert together.attention_norms == pytest.approx(alone.attention_norms, rel=1e-3)
        assert min(together.attention_norms) > 0
        assert together.select([2, 0]).attention_norms == [together.attention_norms[2], together.attention_norms[0]]


def test_a_finished_request_makes_room_for_a_waiting_one(tokenizer, monkeypatch) -> None:
    """Requests settle at different steps; a waiting request takes a finished one's place at the next step, so a
    step runs with fewer than ``requests_per_step`` requests only once none waits, and every target is still the
    one optimising its request alone gives."""
    model = _model("gpt2")
    hparams = HPARAMS.with_options(v_num_grad_steps=40, settled_steps=2)
    requests = _requests(6)
    alone = compute_targets(model, tokenizer, requests, hparams.with_options(requests_per_step=1), TEMPLATES, False)
    held: list[list[int]] = []
    step = targets_module.backward_step

    def recorded(*args, **kwargs):
        held.append(list(args[-1]))
        return step(*args, **kwargs)

    monkeypatch.setattr(targets_module, "backward_step", recorded)
    refilled = compute_targets(model, tokenizer, requests, hparams.with_options(requests_per_step=2), TEMPLATES, False)
    assert len(set(alone.steps)) > 1  # the requests settle at different steps
    assert refilled.steps == alone.steps
    torch.testing.assert_close(refilled.values, alone.values, rtol=1e-4, atol=1e-4)
    for i, active in enumerate(held):
        seen = {r for earlier in held[: i + 1] for r in earlier}
        assert len(active) == 2 or seen == set(range(6))
    # fewer forwards than chunks of two that each run until both their requests settle
    assert len(held) < sum(max(alone.steps[i : i + 2]) for i in range(0, 6, 2))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bfloat16_steps_reach_the_float32_targets_and_leave_the_weights_as_they_were(
    arch: str, tokenizer, monkeypatch
) -> None:
    """``target_precision="bfloat16"`` runs every step on bfloat16 copies of the weights: the changes are near the
    float32 ones and the targets still the argmax, the pre-edit values are the float32 ones, and every parameter
    gets its own float32 tensor back, bit for bit."""
    model = _model(arch)
    hparams = HPARAMS.with_options(v_num_grad_steps=30, settled_steps=2)
    requests = _requests(4)
    weights = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    full = compute_targets(model, tokenizer, requests, hparams, TEMPLATES, False)
    precisions: set[torch.dtype] = set()
    step = targets_module.forward_reads

    def recorded(base, *args):
        precisions.add(next(base.parameters()).dtype)
        return step(base, *args)

    monkeypatch.setattr(targets_module, "forward_reads", recorded)
    bfloat16 = hparams.with_options(target_precision="bfloat16")
    half = compute_targets(model, tokenizer, requests, bfloat16, TEMPLATES, False)
    assert precisions == {torch.bfloat16}
    for name, (parameter, before) in weights.items():
        assert model.get_parameter(name) is parameter and parameter.dtype == torch.float32
        assert torch.equal(parameter, before), name
    assert half.values.dtype == torch.float32
    assert all(p > 0.5 for p in half.probabilities)
    change = (half.values - half.init).norm(dim=1) / (full.values - full.init).norm(dim=1)
    assert change.min() > 0.5 and change.max() < 2  # steps of another precision, to the same answers
    torch.testing.assert_close(half.init, full.init, rtol=1e-5, atol=1e-5)  # read by the float32 whole-row forward


def test_mixed_precision_finishes_each_request_in_float32(tokenizer, monkeypatch) -> None:
    """``target_precision="mixed"`` takes the bfloat16 steps, then float32 steps from where each request exited: every
    request that exited before the last step runs at least one float32 forward after its bfloat16 ones, and its
    bfloat16 steps are those ``"bfloat16"`` takes."""
    model = _model("llama")
    hparams = HPARAMS.with_options(v_num_grad_steps=30, settled_steps=2)
    requests = _requests(4)
    bfloat16, mixed_precision = (hparams.with_options(target_precision=p) for p in ("bfloat16", "mixed"))
    half = compute_targets(model, tokenizer, requests, bfloat16, TEMPLATES, False)
    forwards: list[tuple[torch.dtype, set[int]]] = []
    step = targets_module.forward_reads

    def recorded(base, batch, reads, prefix):
        forwards.append((next(base.parameters()).dtype, {batch.owner[row] for row in reads.rows}))
        return step(base, batch, reads, prefix)

    monkeypatch.setattr(targets_module, "forward_reads", recorded)
    mixed = compute_targets(model, tokenizer, requests, mixed_precision, TEMPLATES, False)
    dtypes = [dtype for dtype, _ in forwards]
    assert dtypes == sorted(dtypes, key=lambda d: d == torch.float32)  # the float32 finish comes last
    assert max(half.steps) < hparams.v_num_grad_steps  # every request is finished in float32
    for r in range(len(requests)):
        in_float32 = sum(dtype == torch.float32 and r in active for dtype, active in forwards)
        assert in_float32 >= 1
        assert mixed.steps[r] == half.steps[r] + in_float32
    assert all(p > 0.5 for p in mixed.probabilities)  # read by the float32 forwards


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_mixed_only_where_bfloat16_is_native(native: bool, tokenizer, monkeypatch) -> None:
    """``target_precision="auto"`` runs the mixed steps where bfloat16 products are native and the float32 steps,
    to the same targets, elsewhere."""
    model = _model("llama")
    hparams = HPARAMS.with_options(v_num_grad_steps=30, settled_steps=2)
    requests = _requests(3)
    monkeypatch.setattr(targets_module, "native_bfloat16", lambda device: native)
    cpu = torch.device("cpu")
    chosen = steps_precision("auto", cpu)
    assert chosen == ("mixed" if native else "float32")
    assert [steps_precision(p, cpu) for p in PRECISIONS if p != "auto"] == ["float32", "bfloat16", "mixed"]
    expected = compute_targets(
        model, tokenizer, requests, hparams.with_options(target_precision=chosen), TEMPLATES, False
    )
    auto = compute_targets(model, tokenizer, requests, hparams.with_options(target_precision="auto"), TEMPLATES, False)
    assert auto.steps == expected.steps
    torch.testing.assert_close(auto.values, expected.values, rtol=0, atol=0)


def test_the_statistics_hooks_come_off_when_a_forward_fails(tokenizer) -> None:
    model = _model("gpt2")
    calls = 0

    def fail_second(_module: torch.nn.Module, _args: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("out of memory")

    guard = model.transformer.register_forward_pre_hook(fail_second)
    hooks_before = {name: len(m._forward_pre_hooks) for name, m in model.named_modules()}
    with pytest.raises(RuntimeError, match="out of memory"):
        covariance.collect_second_moments(model, tokenizer, ["w5 w6"] * 4, [0, 1], batch_size=2, progress=False)
    guard.remove()
    assert calls == 2
    assert {name: len(m._forward_pre_hooks) for name, m in model.named_modules()} == {
        name: count - (name == "transformer") for name, count in hooks_before.items()
    }


def test_a_target_margin_settles_further_past_the_argmax(tokenizer) -> None:
    """With ``target_margin`` a request is on target only once its answer leads every other token by that many nats:
    it settles later, with a more likely target, than at the plain argmax."""
    model = _model("gpt2")
    hparams = HPARAMS.with_options(v_num_grad_steps=60, requests_per_step=4, settled_steps=2)
    requests = _requests(4)
    argmax = compute_targets(model, tokenizer, requests, hparams, TEMPLATES, False)
    margin = compute_targets(model, tokenizer, requests, hparams.with_options(target_margin=6.0), TEMPLATES, False)
    assert all(steps < 60 for steps in argmax.steps)  # the tiny model's targets pass the argmax within a few steps
    assert all(m > a for m, a in zip(margin.steps, argmax.steps, strict=True))
    assert all(m >= a for m, a in zip(margin.probabilities, argmax.probabilities, strict=True))
    assert min(margin.probabilities) > min(argmax.probabilities)


def test_a_negative_target_margin_is_refused() -> None:
    with pytest.raises(ValueError, match="target_margin"):
        HPARAMS.with_options(target_margin=-1.0)
