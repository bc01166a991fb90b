#!/usr/bin/env bash
# The main job behind `make up`: on a fresh machine, build the Debian family manifest, train a small
# default executable model on this machine's own binaries, gate it (repairing it with `recalibrate` if its
# BatchNorm statistics are unconverged), index the binaries and serve on 127.0.0.1:8000.
# Running it again reuses what exists: the manifest, the model, the index (already-indexed files are
# skipped by sha256) and the API key.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
VAR=${LOOKALIKE_VAR:-var}
PORT=${LOOKALIKE_PORT:-8000}
MODEL="$VAR/models/exec"
mkdir -p "$VAR/models"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

if [ ! -f "$VAR/manifest.csv" ]; then
  step "labelling this machine's executables by Debian source package"
  "$BIN/lookalike" dataset debian --out "$VAR/manifest.csv"
fi

if [ ! -d "$MODEL" ]; then
  step "training the default executable model (about 6 minutes on 2 cores)"
  "$BIN/lookalike" train --data "$VAR/manifest.csv" --modality executable --norm moving --split none \
    --out "$MODEL"
fi

step "checking the model's BatchNorm statistics"
set +e
"$BIN/lookalike" check "$MODEL"
verdict=$?
set -e
if [ "$verdict" -eq 1 ]; then
  step "unconverged statistics: recalibrating into $MODEL-recalibrated"
  [ -d "$MODEL-recalibrated" ] || "$BIN/lookalike" recalibrate "$MODEL" --out "$MODEL-recalibrated"
  MODEL="$MODEL-recalibrated"
  "$BIN/lookalike" check "$MODEL"
elif [ "$verdict" -ne 0 ]; then
  echo "the model could not be checked (exit $verdict)" >&2
  exit "$verdict"
fi

step "indexing the executables"
"$BIN/lookalike" index --store "$VAR/store" --collection executables --model "$MODEL" --data "$VAR/manifest.csv"

if [ ! -f "$VAR/api_key" ]; then
  (umask 077 && "$BIN/python" -c 'import secrets; print(secrets.token_urlsafe(24))' > "$VAR/api_key")
fi
cat > "$VAR/lookalike.toml" <<TOML
# Written by scripts/up.sh; paths are relative to this file.
store = "store"
api_keys = ["$(cat "$VAR/api_key")"]

[collections.executables]
model = "$(realpath --relative-to="$VAR" "$MODEL")"
TOML

step "serving on http://127.0.0.1:$PORT (docs at /docs; Ctrl-C stops)"
cat <<HELP
Search for look-alikes of /usr/bin/ls:
  curl -s -F file=@/usr/bin/ls -F k=5 http://127.0.0.1:$PORT/search
Add a file (writes need the API key in $VAR/api_key):
  curl -s -H "X-API-Key: \$(cat $VAR/api_key)" -F file=@/usr/bin/cp -F label=coreutils \\
       http://127.0.0.1:$PORT/collections/executables/items
HELP
exec "$BIN/lookalike" serve --config "$VAR/lookalike.toml" --host 127.0.0.1 --port "$PORT"
