"""A workspace on disk for end-to-end runs: a saved tiny GPT-2 + tokenizer, a zsRE-format edit file and a data folder
with memory sources (CounterFact prompts, WikiText text), shared by the CLI tests and the crash-safety campaign."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tiny_tokenizer import EDIT_WORDS, MEMORY_WORDS, random_pairs, random_sentence, sharp_gpt2, tiny_tokenizer


def build_workspace(root: Path, n_edits: int = 8) -> dict[str, Path]:
    """Write the workspace under ``root``; ``n_edits`` zsRE records of random words the tiny model gets wrong."""
    model_dir = root / "model"
    sharp_gpt2().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data = root / "data"
    edits = random_pairs(n_edits, seed=1, words=EDIT_WORDS, length=5, target_length=1)
    rephrases = random_pairs(n_edits, seed=2, words=EDIT_WORDS, length=5, target_length=1)
    loc = random_pairs(n_edits, seed=3, words=MEMORY_WORDS, length=5, target_length=1)
    records = [
        {
            "subject": src.split()[0],
            "src": src,
            "answers": [answer],
            "rephrase": rephrase,
            "alt": answer,
            "pred": "",
            "loc": f"nq question: {loc_q}",
            "loc_ans": loc_a,
            "cond": "",
        }
        for (src, answer), (rephrase, _), (loc_q, loc_a) in zip(edits, rephrases, loc, strict=True)
    ]
    (root / "zsre.json").write_text(json.dumps(records))
    facts = random_pairs(60, seed=4, words=MEMORY_WORDS, length=5, target_length=1)
    counterfact = [
        {
            "case_id": i,
            "prompt": prompt,
            "subject": prompt.split()[0],
            "target_new": answer,
            "ground_truth": answer,
            "rephrase_prompt": prompt,
            "locality_prompt": prompt,
            "locality_ground_truth": answer,
        }
        for i, (prompt, answer) in enumerate(facts)
    ]
    (data / "counterfact").mkdir(parents=True)
    (data / "counterfact" / "counterfact-train.json").write_text(json.dumps(counterfact))
    generator = torch.Generator().manual_seed(5)
    (data / "wikitext2").mkdir()
    for split in ("valid", "test"):
        (data / "wikitext2" / f"{split}.txt").write_text(random_sentence(generator, 2000))
    return {"root": root, "model": model_dir, "data": data, "zsre": root / "zsre.json"}


def add_counterfact_edits(ws: dict[str, Path]) -> dict[str, Path]:
    """Add ``ws["counterfact"]``: a CounterFact-format edit file of the workspace's zsRE records. Each question's last
    word is its subject (a 2-block GPT-2 must be written where the answer is read) and the previous record's answer
    its true answer, so probability scores exist too."""
    records = json.loads(ws["zsre"].read_text())
    cases = [
        {
            "prompt": r["src"],
            "subject": r["src"].split()[-1],
            "target_new": r["answers"][0],
            "ground_truth": records[i - 1]["answers"][0],
            "rephrase_prompt": r["rephrase"],
            "locality_prompt": r["loc"],
            "locality_ground_truth": r["loc_ans"],
        }
        for i, r in enumerate(records)
    ]
    ws["counterfact"] = ws["root"] / "counterfact-edits.json"
    ws["counterfact"].write_text(json.dumps(cases))
    return ws
