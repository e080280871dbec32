"""What the lifelong rules cost per edit: SmolLM2-135M, the lifelong runs' memory, the same zsRE records edited
from the unedited model under each variant.

Variants (``EditConfig`` overrides of mode ``default``): ``default`` (the subject gate and 16 key views);
``views-8`` (``key_views=8``); ``no-views`` (``key_views=0``, the gate alone); ``ungated`` (neither: the default
before issue 15's gate, with rule 7's contrasts and rule 9's token contexts). Beside the seconds, the quality each
variant pays for them: the share of edits whose rephrase gets the answer right after the edit (each variant edits
its own stream). The memory is the one ``bench/lifelong.py``'s
zsRE runs build (10,000 text rows and 20,000 question rows, read from the user cache when built before). Variants
take turns edit by edit (ABAB…), each on its own copy of the model, so the machine's noise falls on all alike; each
record gives the median and mean seconds of a needed edit, with SR, the rephrases right and the neurons added.

    python bench/edit_cost.py --edits 30 --out bench/results/edit_cost.json
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import replace

import torch

from transformer_patcher.core.examples import EditExample
from transformer_patcher.core.pretrained import load_model
from transformer_patcher.core.tasks import task_for_model
from transformer_patcher.experiments.sme.experiment import config_editor, load_benchmark
from zsre_stream import stream_arguments, zsre_stream

# name: (EditConfig overrides, whether the edit's question is asked of other subjects)
VARIANTS = {
    "default": ({}, True),
    "views-8": ({"key_views": 8}, True),
    "no-views": ({"key_views": 0}, True),
    "ungated": ({"gate_depth": None, "key_views": 0}, True),
}


def main() -> None:
    args = stream_arguments(__doc__, "edits", 30, "bench/results/edit_cost.json").parse_args()
    config = zsre_stream(args.edits, args.data_dir)
    benchmark = load_benchmark(config)
    trainers = {}
    for name, (overrides, contrasted) in VARIANTS.items():
        model, tokenizer = load_model(config.model, config.model_kind)
        task = task_for_model(model, tokenizer, prompt_format=benchmark.prompt_format)
        edit_config = replace(config.edit_config(), **overrides)
        trainers[name] = config_editor(config, benchmark, model, task, edit_config=edit_config, contrasted=contrasted)
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    success = {name: 0 for name in VARIANTS}
    neurons = {name: 0 for name in VARIANTS}
    rephrased = {name: [] for name in VARIANTS}
    for i, example in enumerate(benchmark.examples[: args.edits]):
        for name, trainer in trainers.items():
            started = time.perf_counter()
            record = trainer.edit(example, edit_id=i)
            if record.needed:
                seconds[name].append(time.perf_counter() - started)
            success[name] += record.success
            neurons[name] += record.neurons
            if record.needed:
                rephrased[name] += [trainer.check(EditExample(t, example.target))[0] for t in example.rephrases]
    records = [
        {
            "variant": name,
            "overrides": VARIANTS[name][0],
            "contrasts": VARIANTS[name][1],
            "edits": len(seconds[name]),
            "median_s": statistics.median(seconds[name]),
            "mean_s": statistics.fmean(seconds[name]),
            "SR": success[name] / args.edits,
            "rephrases_right": statistics.fmean(rephrased[name]),
            "neurons": neurons[name],
        }
        for name in VARIANTS
    ]
    machine = {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}
    command = f"python bench/edit_cost.py --edits {args.edits} --out {args.out}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command, "machine": machine, "records": records}, indent=1) + "\n")
    for row in records:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
