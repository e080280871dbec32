# The issue-18 write study on counterfact-train records 0-99 (never scored): PMET track x fold x refine and the MEMIT
# ablation, one batch of 100, appended to bench/results/pmet_fold.jsonl (docs/results.md, "Issue 18, third round").
# The targets are kept in runs/pmet-targets, so the later invocations of a variant reuse them.
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
run() { .venv/bin/python bench/pmet_tune.py --data counterfact/counterfact-train.json --start 0 --n 100 \
  --targets runs/pmet-targets --out bench/results/pmet_fold.jsonl "$@"; }
pmet() {
  run --set v_lr=2.0 clamp_norm_factor=1.5 --lams 2000 6000 --trials \
    '{"track": "ffn"}' '{"track": "residual"}' '{"track": "ffn", "fold_attention": true}' \
    '{"track": "residual", "fold_attention": true}' '{"track": "ffn", "refine_rounds": 1}' \
    '{"track": "residual", "fold_attention": true, "refine_rounds": 1}'
}
memit() {
  run --set v_lr=2.0 clamp_norm_factor=1.5 variant='"memit"' --lams 1000 2000 6000 15000
  run --set v_lr=2.0 clamp_norm_factor=1.5 variant='"memit"' --lams 2000 6000 --trials '{"refine_rounds": 1}'
}
pmet > /tmp/dev-pmet.log 2>&1 &
memit > /tmp/dev-memit.log 2>&1 &
wait
