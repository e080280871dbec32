"""CounterFact on SmolLM2-135M: counterfactual edits measured as efficacy, paraphrase and neighbourhood.

Each case asks the model to state a false "new" object (``prompt`` → ``target_new``). SR (efficacy): the new object is
the greedy answer; GR (paraphrase): it is also the answer to ``rephrase_prompt``; locality (neighbourhood): a prompt
about another subject with the same relation keeps its pre-edit answer. Memory comes from ``counterfact-train.json``
(true facts) and WikiText-2, never from the cases scored.

This script is ``transformer-patcher sme run`` with this protocol's defaults; append any option to override:

    python examples/counterfact/run.py                                  # 10 folds over the 1k edit file
    python examples/counterfact/run.py --folds 2 --max-examples 10 --out runs/counterfact-smoke
"""

import sys

from transformer_patcher.cli import main
from transformer_patcher.data import find_data_file

PROTOCOL = [
    *("sme", "run", "--model", "smollm2-135m", "--data-kind", "counterfact", "--folds", "10"),
    *("--editor", "patcher", "ft-last", "ft-all-kl", "--out", "runs/counterfact"),
]

if __name__ == "__main__":
    data = str(find_data_file("counterfact/counterfact-edit-1k.json"))
    sys.exit(main([*PROTOCOL, "--data", data, *sys.argv[1:]]))
