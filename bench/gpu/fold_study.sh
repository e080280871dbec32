# The fold_attention dev study (issue 18): PMET track x fold x lambda and MEMIT, on counterfact-train records 0-99 (not run yet).
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
.venv/bin/python bench/pmet_tune.py --data counterfact/counterfact-train.json --start 0 --n 100 \
  --set v_lr=2.0 clamp_norm_factor=1.5 --lams 2000 6000 \
  --trials '{"track": "ffn"}' '{"track": "residual"}' '{"track": "ffn", "fold_attention": true}' '{"track": "residual", "fold_attention": true}' \
  --out bench/results/pmet_fold.jsonl > /tmp/dev-pmet.log 2>&1 &
.venv/bin/python bench/pmet_tune.py --data counterfact/counterfact-train.json --start 0 --n 100 \
  --set v_lr=2.0 clamp_norm_factor=1.5 variant='"memit"' --lams 2000 6000 15000 \
  --out bench/results/pmet_fold.jsonl > /tmp/dev-memit.log 2>&1 &
wait
