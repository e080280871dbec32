"""PMET against its MEMIT ablation on SmolLM2-135M: CounterFact facts written in batches of 1, 10, 100 and 1,000.

Every batch is edited from the original model and scored at once: efficacy, paraphrase and neighbourhood, as
ROME-style probability comparisons and as greedy-answer accuracy. Targets are computed once per variant and reused
by every batch size; an interrupted run resumes from its folder.

This script is ``transformer-patcher batch run`` with this protocol's defaults; append any option to override:

    python examples/counterfact/pmet.py                                     # the full protocol (hours on a CPU)
    python examples/counterfact/pmet.py --cases 100 --batch-sizes 1 10 100 --out runs/pmet-counterfact
    python examples/counterfact/pmet.py --editor patcher --cases 100 --batch-sizes 10 100 --out runs/patcher-cf
"""

import sys

from transformer_patcher.cli import main

PROTOCOL = [
    *("batch", "run", "--model", "smollm2-135m", "--data", "counterfact", "--cases", "1000"),
    *("--batch-sizes", "1", "10", "100", "1000", "--editor", "pmet", "memit", "--out", "runs/pmet-counterfact-1k"),
]

if __name__ == "__main__":
    sys.exit(main([*PROTOCOL, *sys.argv[1:]]))
