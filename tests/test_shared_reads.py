"""What the subject gate saves a forward pass: it compares each run of neighbouring patches that share their reads once
(``tuners.patcher.gate.SharedReads``) and answers exactly as it would patch by patch, through cached decodes and after
the rows change; and the layer computes only the frozen patches whose gate is open somewhere in the batch."""

from __future__ import annotations

import torch
from torch.nn.functional import normalize

from test_gate_frame import _Owner
from test_subject_gate import SUBJECT_AT, gated_llama
from transformer_patcher.tuners.patcher.gate import GateReads, SharedReads

THRESHOLD = 0.3


def patch_rows() -> tuple[torch.Tensor, torch.Tensor]:
    """Subject and bare reads of 9 patches from 5 edits (runs of 3, 1, 2, 1, 2), one edit ungated, one without a bare
    read, and the last edit holding the first one's reads again (not neighbours: not folded together)."""
    generator = torch.Generator().manual_seed(0)
    edits = normalize(torch.randn(4, 2, 8, generator=generator), dim=-1)
    edits[1, 0] = 0  # an edit without a subject: always open
    edits[2, 1] = 0  # an edit without a bare read
    runs = [(0, 3), (1, 1), (2, 2), (3, 1), (0, 2)]
    rows = torch.cat([edits[e].expand(n, 2, 8) for e, n in runs])
    return rows[:, 0].contiguous(), rows[:, 1].contiguous()


def per_patch(gate: GateReads, subjects: torch.Tensor, bare: torch.Tensor, key: str) -> torch.Tensor:
    """The gate's answer computed patch by patch, as it was before runs were folded."""
    opened = (gate.running(subjects, key) >= THRESHOLD) | (subjects.norm(dim=1) == 0)
    return opened | (gate.running(bare, (key, "bare")) >= THRESHOLD) & (bare.norm(dim=1) > 0)


def test_neighbouring_patches_with_the_same_reads_fold_into_one_row_each() -> None:
    subjects, bare = patch_rows()
    shared = SharedReads(subjects, bare)
    assert shared.subjects.shape == (5, 8)
    assert shared.inverse.tolist() == [0, 0, 0, 1, 2, 2, 3, 4, 4]
    assert shared.ungated.tolist() == [False, True, False, False, False]
    assert shared.held.tolist() == [True, True, False, True, True]
    assert SharedReads(subjects[:1], None).inverse is None  # nothing to fold


def test_folded_runs_open_exactly_where_each_patch_would_through_a_cached_decode() -> None:
    subjects, bare = patch_rows()
    owner = _Owner()
    gate, alone = GateReads(owner, owner.block), GateReads(owner, owner.block)
    generator = torch.Generator().manual_seed(1)
    text = torch.randn(3, 7, 8, generator=generator)
    text[0, 3] = subjects[0] * 5  # the first edit's subject, met at position 3
    text[1, 2] = bare[4] * 5  # the third edit's bare read
    owner(text[:, :4], attention_mask=torch.ones(3, 4))
    first = gate.opened(subjects, THRESHOLD, "set", bare=bare)
    assert torch.equal(first, per_patch(alone, subjects, bare, "set"))
    assert first[0, 3, :3].all() and not first[0, 2, :3].any()  # the first edit's three neurons open at its subject
    assert first[:, :, 3].all()  # the ungated edit
    for step in range(4, 7):  # one-token steps of a cached decode carry the running maxima on
        owner(text[:, step : step + 1], attention_mask=torch.ones(3, step + 1))
        assert torch.equal(gate.opened(subjects, THRESHOLD, "set", bare=bare), per_patch(alone, subjects, bare, "set"))
        assert gate.opened(subjects, THRESHOLD, "set", bare=bare)[0, 0, :3].all()  # still open after the subject


def test_rows_changed_in_place_or_replaced_are_folded_again() -> None:
    subjects, _ = patch_rows()
    owner = _Owner()
    gate = GateReads(owner, owner.block)
    text = torch.zeros(1, 3, 8)
    text[0, 1] = subjects[6]
    owner(text, attention_mask=torch.ones(1, 3))
    assert gate.opened(subjects, THRESHOLD, "set")[0, 2, 6]
    subjects[6] = -subjects[6]  # in place: the version counter moves
    assert not gate.opened(subjects, THRESHOLD, "set")[0, 2, 6]
    replaced = subjects.clone()
    replaced[6] = text[0, 1]
    assert gate.opened(replaced, THRESHOLD, "set")[0, 2, 6]  # another tensor of the same shape
    with torch.inference_mode():
        made = replaced.clone()  # keeps no version counter: folded anew each time
        assert gate.opened(made, THRESHOLD, "set")[0, 2, 6]
        made[6] = -text[0, 1]
        assert not gate.opened(made, THRESHOLD, "set")[0, 2, 6]


def test_only_frozen_patches_open_somewhere_are_computed_and_the_output_is_the_same() -> None:
    model, ids, base = gated_llama()
    layer = model.base_model.patch_layer()
    generator = torch.Generator().manual_seed(2)
    keys, values, shut = (torch.randn(2, 32, generator=generator) for _ in range(3))
    layer.add_patches(keys, torch.ones(2), values, 2, subjects=shut)  # a subject this text never reads
    layer.commit()
    computed: list[int] = []
    gated = layer._gated

    def recording(activations: torch.Tensor, opened: torch.Tensor | None) -> torch.Tensor:
        computed.append(activations.shape[-1])
        return gated(activations, opened)

    layer._gated = recording
    with torch.no_grad():
        sparse = model(input_ids=ids).logits
        with layer.capture() as capture:  # a capture computes every neuron
            dense = model(input_ids=ids).logits
        other = torch.arange(40, 48)[None]  # no patch opens here: none is computed, the output is the base's
        patched_other = model(input_ids=other).logits
        with model.disable_adapter():
            base_other = model(input_ids=other).logits
    assert computed == [1, 3]
    assert capture.frozen_preactivations.shape[-1] == 3
    assert torch.allclose(sparse, dense, atol=1e-6)
    assert not torch.equal(sparse[0, SUBJECT_AT:], base[0, SUBJECT_AT:])  # the open patch still fires
    assert torch.equal(patched_other, base_other)
