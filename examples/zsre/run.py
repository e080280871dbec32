"""zsRE question answering on SmolLM2-135M with the paper's protocols: folds (Table 1) or one long stream (Table 2).

SmolLM2 answers almost no zsRE question exactly, so every record is an edit (knowledge injection). SR: the edited
question is answered exactly; GR: its ``rephrase`` is; ER: earlier edits still are; locality: an unrelated NQ question
keeps its pre-edit answer (``locality_acc``: it matches ``loc_ans``).

This script is the ``transformer-patcher sme run`` command with this protocol's defaults; any option of that command
can be appended and overrides them:

    python examples/zsre/run.py                                   # 20 folds, T-Patcher + FT(last) + FT(all)+KL
    python examples/zsre/run.py --folds 1 --editor patcher --eval-every 100 --out runs/zsre-stream   # one stream
    python examples/zsre/run.py --folds 2 --max-examples 10 --out runs/zsre-smoke                     # smoke run
    accelerate launch --cpu --num_processes 2 examples/zsre/run.py                                    # parallel folds
"""

import sys

from transformer_patcher.cli import main
from transformer_patcher.data import find_data_file

PROTOCOL = [
    *("sme", "run", "--model", "smollm2-135m", "--data-kind", "zsre", "--folds", "20"),
    *("--editor", "patcher", "ft-last", "ft-all-kl", "--out", "runs/zsre"),
]

if __name__ == "__main__":
    data = str(find_data_file("zsre/zsre_mend_train-1k.json"))
    sys.exit(main([*PROTOCOL, "--data", data, *sys.argv[1:]]))
