#!/usr/bin/env bash
# The exact commands behind docs/experiments.md, in the order they were run (2 shared CPU cores).
# Run from an empty scratch directory with the repository's venv active.
set -euo pipefail
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1

# --- Experiment 1: entropy per token position (AG News, document mode, 32 tokens, layer 15) ---
bae harvest -o agnews32.zarr --corpus staicc:agnews --mode document --context-length 32 \
  --layers 15 --max-tokens 128000 --no-progress
# one BAE for all positions, at a target FVU
bae train --store agnews32.zarr --layer 15 --out runs/bae-all --steps 1000 --target-fvu 0.3 \
  --val-every 250 --checkpoint-every 250 --no-progress
# one BAE per position (as in the paper), same target, fewer steps
for p in 1 2 4 8 16 31; do
  bae train --store agnews32.zarr --layer 15 --out runs/bae-pos$p --positions $p --steps 150 \
    --target-fvu 0.3 --val-every 150 --checkpoint-every 150 --no-progress
done
bae entropy --store agnews32.zarr --checkpoint runs/bae-all --group-by position --equal-n 3800 \
  --null-groups 8 --bootstrap 20 --out ent-pos-all --no-progress
bae entropy --store agnews32.zarr \
  --checkpoint runs/bae-pos1 --checkpoint runs/bae-pos2 --checkpoint runs/bae-pos4 \
  --checkpoint runs/bae-pos8 --checkpoint runs/bae-pos16 --checkpoint runs/bae-pos31 \
  --group-by position --positions 1,2,4,8,16,31 --equal-n 3800 --null-groups 8 --bootstrap 20 \
  --out ent-pos-per --no-progress

# --- Experiment 2: ICL, entropy of the label-prefix state against k (SST-2) ---
# re-run 2026-12-01 (today's defaults, 2,000 prompts per k, three trainings); the first run's
# commands (600 per k, 300 steps at --target-fvu 0.3) are in docs/experiments.md
bae icl-prompts sst2 -o icl-sst2.jsonl -n 2000 --ks 0,1,2,4,8 --label-prefix "Sentiment:"
bae harvest -o icl-sst2.zarr --corpus icl-sst2.jsonl --text-field prompt --mode document \
  --context-length 512 --positions last --layers 15 --unit-rows 500 --no-progress
for s in 0 1 2; do
  bae train --store icl-sst2.zarr --layer 15 --out runs/bae-icl-s$s --seed $s --steps 1000 \
    --batch-size 512 --no-progress
done
bae entropy --store icl-sst2.zarr --checkpoint runs/bae-icl-s0 --checkpoint runs/bae-icl-s1 \
  --checkpoint runs/bae-icl-s2 --group-by k --equal-n 2000 --null-groups 4 --bootstrap 32 \
  --out ent-icl --no-progress

# --- Experiment 3: dense and dead features, BAE vs ReLU SAE vs TopK SAE (experiment-1 store) ---
for a in relu_sae topk_sae; do
  bae train --store agnews32.zarr --layer 15 --out runs/$a --architecture $a --steps 500 \
    --val-every 250 --checkpoint-every 500 --no-progress
done
bae features compare --store agnews32.zarr -a runs/bae-all -a runs/relu_sae -a runs/topk_sae \
  --out feats-cmp --no-progress
