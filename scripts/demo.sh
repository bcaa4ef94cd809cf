#!/usr/bin/env bash
# The main job on an embedded default: install herd, train a BPE tokenizer and tokenize a corpus every machine has
# offline (the Python standard library's own sources), pretrain the tiny Llama 3 for a few minutes on the CPU, plot
# its curves and generate from it. Extra arguments go to `herd pretrain` (e.g. --train.steps=200).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh plot
RUN=runs/demo
STDLIB=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
CORPUS=()
for pkg in asyncio collections concurrent email http importlib json logging unittest urllib xml; do
  [ -d "$STDLIB/$pkg" ] && CORPUS+=("$STDLIB/$pkg")
done
mkdir -p "$RUN"
if [ ! -f "$RUN/tokenizer/tokenizer.model" ]; then
  "$PY" -m herd tokenizer train --input "${CORPUS[@]}" --vocab-size 4096 --out "$RUN/tokenizer"
fi
if [ ! -f "$RUN/shards/manifest.json" ]; then
  "$PY" -m herd data tokenize --input "${CORPUS[@]}" --tokenizer "$RUN/tokenizer" --out "$RUN/shards"
fi
"$PY" -m herd pretrain --config configs/tiny-cpu.toml --run-dir "$RUN/run" --data.path="$RUN/shards" "$@"
"$PY" -m herd plot "$RUN/run"
"$PY" -m herd generate --model "$RUN/run/model" --prompt "def __init__(self" --max-new-tokens 80 --temperature 0.7 \
  --seed 0
