#!/usr/bin/env bash
# Train each loss on the shared Grocery photos (In-Shop format) and print the README table.
# Usage: scripts/grocery_losses.sh [ROOT] [LOSS ...]   (default ROOT: ../shared/data/grocery)
# TAG=name EXTRA="--flag value ..." scripts/grocery_losses.sh  writes runs/grocery-TAG-LOSS*.
# The defaults are the README's settings: 12 epochs at 192 px, frozen BatchNorm statistics,
# no projection (the backbone's 1280-d pooled features).
set -euo pipefail
root=${1:-../shared/data/grocery}
shift || true
losses=${*:-triplet contrastive eet eir}
prefix=runs/grocery${TAG:+-$TAG}
for loss in $losses; do
  # shellcheck disable=SC2086  # EXTRA is a list of flags
  .venv/bin/vitrine train --dataset inshop --root "$root" --loss "$loss" --epochs 12 \
    --train-image-size 192 --freeze-batchnorm --embed-dim 0 ${EXTRA:-} --out "$prefix-$loss" \
    --json "$prefix-$loss.json" --quiet 2>&1 | tee "$prefix-$loss.log" | grep -v '^20..-' || true
done
.venv/bin/python scripts/loss_table.py $(for loss in $losses; do echo "$prefix-$loss.json"; done)
