"""The layer loop's next read starts at the block written last, fed what entered it before (``BlockInputs``)."""

from __future__ import annotations

import pytest
import torch

from test_pmet_editor import HPARAMS, _model, _requests, _texts
from tiny_tokenizer import tiny_tokenizer
from transformer_patcher.methods.pmet import PMETEditor, algorithm
from transformer_patcher.methods.pmet.architecture import block_modules, unwrap
from transformer_patcher.methods.pmet.block_inputs import BlockInputs

LAYERS = (1, 2, 3)  # of the tiny model's 4 blocks: block 0 is below every edited one


class _RunsEveryBlock(BlockInputs):
    """Records, but never lets a read start at its block."""

    @property
    def replayable(self) -> bool:
        return False

    @replayable.setter
    def replayable(self, _value: bool) -> None:
        pass


def _deltas(monkeypatch: pytest.MonkeyPatch, replay: bool, **options: object) -> tuple[dict, list[int]]:
    """One batch's deltas over ``LAYERS`` (every read in one pass: keys in the bare prompt, its own prompts kept), and
    how often each block's MLP ran."""
    hparams = HPARAMS.with_options(layers=LAYERS, keep_prompts=0.25, key_reads="prompt", **options)
    editor = PMETEditor(_model("llama"), tiny_tokenizer(), hparams, _texts())
    requests = _requests(3)
    targets = editor.compute_targets(requests)
    wanted = algorithm.written_values(editor.model, editor.tokenizer, requests, hparams, targets)
    if not replay:
        monkeypatch.setattr(algorithm, "BlockInputs", _RunsEveryBlock)
    base = unwrap(editor.model)
    runs = [0] * base.config.num_hidden_layers
    for index in range(len(runs)):
        mlp = base.get_submodule(block_modules(base, index).block).mlp
        mlp.register_forward_hook(lambda *_, index=index: runs.__setitem__(index, runs[index] + 1))
    deltas = algorithm.compute_deltas(
        editor.model,
        editor.tokenizer,
        requests,
        hparams,
        editor.moments,
        editor.context_templates(),
        targets,
        wanted=wanted,
    )
    return deltas, runs


@pytest.mark.parametrize("options", [{"spread": "joint"}, {"keep_answers": True}])
def test_each_read_starts_at_the_block_written_last_and_writes_the_same(
    monkeypatch: pytest.MonkeyPatch, options: dict
) -> None:
    resumed, runs = _deltas(monkeypatch, True, **options)
    assert runs[:2] == [1, 2]  # block 0 runs in the first read only, block 1 in the first two; then they are fed
    with monkeypatch.context() as patch:
        every, every_runs = _deltas(patch, False, **options)
    assert every_runs[:2] == [3, 3]
    for name, delta in every.items():
        torch.testing.assert_close(resumed[name].dense(), delta.dense(), rtol=1e-6, atol=1e-9)


def test_a_first_block_replays_its_input_and_a_recording_feeds_back_in_order() -> None:
    base = unwrap(_model("llama"))
    first, second = BlockInputs(base, 0), BlockInputs(base, 2)
    assert first.replayable and not first.lower and len(second.lower) == 2
    ids = [torch.tensor([[5, 6, 7]]), torch.tensor([[8, 9, 10, 11]])]
    with torch.no_grad():
        with second.recorded():
            plain = [base(input_ids=row).logits for row in ids]
        assert second.replayable and [x.shape[1] for x in second.inputs] == [3, 4]
        with second.replayed():
            fed = [base(input_ids=torch.zeros_like(row)).logits for row in ids]  # other tokens: the record decides
    for a, b in zip(plain, fed, strict=True):
        torch.testing.assert_close(a, b)
    assert all("forward" not in block.__dict__ for block in second.lower)  # every block runs again after
