#!/usr/bin/env bash
# The eight recipes between today's and B-TAP on SmolLM2-135M-Instruct (docs/results/btap-ablation-smollm2.md).
# Run from the project root; RUNS (default runs/ablation) holds one run directory per recipe. They share one
# stages/ directory, so what two recipes have in common (the model's own answers, a score file, the unpruned
# evaluations) is computed once. Each run's config.toml records its --set overrides.
set -euo pipefail
RUNS=${RUNS:-runs/ablation}
CONFIG=${CONFIG:-configs/ablation-smollm2.toml}
mkdir -p "$RUNS/stages"
declare -A RECIPES=(
  [own-abs-pre]=""
  [lat-abs-pre]="--set scoring.harm=harmful_lat"
  [own-sig-pre]="--set scoring.utility_method=signed-snip"
  [own-abs-chat]="--set scoring.harm_format=model --set scoring.utility_format=model"
  [lat-sig-pre]="--set scoring.harm=harmful_lat --set scoring.utility_method=signed-snip"
  [lat-abs-chat]="--set scoring.harm=harmful_lat --set scoring.harm_format=model --set scoring.utility_format=model"
  [own-sig-chat]="--set scoring.utility_method=signed-snip --set scoring.harm_format=model --set scoring.utility_format=model"
  [lat-sig-chat]="--set scoring.harm=harmful_lat --set scoring.utility_method=signed-snip --set scoring.harm_format=model --set scoring.utility_format=model"
)
for name in own-abs-pre lat-sig-chat lat-abs-pre own-sig-pre own-abs-chat lat-sig-pre lat-abs-chat own-sig-chat; do
  [ -f "$RUNS/$name/summary.json" ] && continue
  mkdir -p "$RUNS/$name"
  [ -e "$RUNS/$name/stages" ] || ln -s ../stages "$RUNS/$name/stages"
  # shellcheck disable=SC2086
  /usr/bin/time -f "$name: %e s wall, %M KiB peak" harmprune run "$CONFIG" --out "$RUNS/$name" ${RECIPES[$name]}
done
