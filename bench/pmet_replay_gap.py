"""Where a replayed sequential run's earlier facts are lost: at the written position, or elsewhere in the prompt.

With ``replay_written`` every later batch drives each earlier fact's z-layer read (the block output at the subject's
last token) back to where its own batch's write left it. If such a fact is still lost, either the solve could not
hold its z (λC trades the fit against typical keys) or the later writes changed the rest of the prompt, which the
replay never reads. This reads a ``batch run --mode sequential --pmet-set replay_written=true`` folder's last
checkpoint and, for each batch's facts, checks the target by teacher-forced greedy decoding:

- ``after_own_batch``: with the update as it stood right after that batch (the first factor columns: without refine
  rounds batch ``k`` adds one column per fact written so far, ``size · k`` of them);
- ``now``: with the whole update;
- ``now_z_restored``: with the whole update and the z read at the subject's last token set to what the checkpoint
  holds for the fact (where its batch left it), every other position as the edited model makes it;

and ``z_drift``, ``‖z_now − z_held‖ / ‖z_held − z_unedited‖`` (medians and 90th percentiles).

    python bench/pmet_replay_gap.py runs/pmet-seq5-replay --out bench/results/pmet_replay_gap.json
"""

from __future__ import annotations

import json

import torch

from pmet_key_drift import checkpoint_deltas, keep_record, last_checkpoint, quantiles, run_parser
from transformer_patcher.core.pretrained import load_model
from transformer_patcher.methods.pmet import EditRequest, pmet_hparams
from transformer_patcher.methods.pmet.algorithm import applied, read_z, z_read_module
from transformer_patcher.methods.pmet.requests import encode_request
from transformer_patcher.methods.pmet.targets import output_hook
from transformer_patcher.methods.pmet.update import LowRankDelta


def greedy_correct(model: torch.nn.Module, tokenizer, requests, z: torch.Tensor | None, module: str) -> list[bool]:
    """Whether each request's target is the greedy continuation, token by token (teacher forced); with ``z`` (d × n)
    ``module``'s output at the subject's last token is replaced by the request's column."""
    correct = []
    for index, request in enumerate(requests):
        encoded = encode_request(tokenizer, request, answer=True)
        handle = None
        if z is not None:
            row = z[:, index].float()

            def put(out: torch.Tensor, at: int = encoded.lookup, value: torch.Tensor = row) -> torch.Tensor:
                out = out.clone()
                out[0, at] = value.to(out.dtype)
                return out

            handle = model.get_submodule(module).register_forward_hook(output_hook(put))
        try:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([encoded.ids])).logits[0]
        finally:
            if handle is not None:
                handle.remove()
        predicted = logits[encoded.target_positions].argmax(-1).tolist()
        correct.append(predicted == encoded.target_ids)
    return correct


def main() -> None:
    args = run_parser(__doc__, "written with replay_written=true and no refine rounds").parse_args()
    config, tensors, state = last_checkpoint(args.run, args.editor)
    size = config.batch_sizes[0]
    hparams = pmet_hparams(variant=args.editor, **config.pmet_options)
    if hparams.refine_rounds or not hparams.replay_written:
        raise SystemExit("needs a run with replay_written=true and refine_rounds=0")
    model, tokenizer = load_model(config.model, "generation")
    model.eval()
    rows = json.loads(bytes(tensors["written_facts.requests"].tolist()).decode("utf-8"))
    requests = [EditRequest(*row) for row in rows]
    held = tensors["written_facts.values"].double()
    total = checkpoint_deltas(tensors)
    module = z_read_module(model, hparams)
    unedited = read_z(model, tokenizer, requests, module)
    with applied(model, total):
        now = read_z(model, tokenizer, requests, module)
    batches = []
    for number in range(1, state["position"] + 1):
        facts = slice(size * (number - 1), size * number)
        columns = size * number * (number + 1) // 2
        own = {m: LowRankDelta(d.up[:, :columns], d.down[:columns]) for m, d in total.items()}
        mine = requests[facts]
        with applied(model, own):
            after = greedy_correct(model, tokenizer, mine, None, module)
        with applied(model, total):
            current = greedy_correct(model, tokenizer, mine, None, module)
            restored = greedy_correct(model, tokenizer, mine, held[:, facts], module)
        drift = (now[:, facts] - held[:, facts]).norm(dim=0) / (held[:, facts] - unedited[:, facts]).norm(dim=0)
        lost = [i for i in range(len(mine)) if after[i] and not current[i]]
        batches.append(
            {
                "batch_index": number,
                "after_own_batch": sum(after) / len(mine),
                "now": sum(current) / len(mine),
                "now_z_restored": sum(restored) / len(mine),
                "lost": len(lost),
                "lost_back_with_z_restored": sum(restored[i] for i in lost),
                "z_drift": quantiles(drift),
                "z_drift_lost": quantiles(drift[lost]) if lost else None,
            }
        )
        print(json.dumps(batches[-1]))
    keep_record(args, size, state, batches=batches)


if __name__ == "__main__":
    main()
