#!/usr/bin/env bash
# Train each loss on the shared Grocery photos (In-Shop format) and print the README table.
# Usage: scripts/grocery_losses.sh [ROOT] [LOSS ...]   (default ROOT: ../shared/data/grocery)
set -euo pipefail
root=${1:-../shared/data/grocery}
shift || true
losses=${*:-triplet contrastive eet eir}
for loss in $losses; do
  .venv/bin/vitrine train --dataset inshop --root "$root" --loss "$loss" --epochs 8 \
    --train-image-size 192 --out "runs/grocery-$loss" --json "runs/grocery-$loss.json" --quiet \
    2>&1 | tee "runs/grocery-$loss.log" | grep -v '^20..-' || true
done
.venv/bin/python scripts/loss_table.py runs/grocery-*.json
