#!/usr/bin/env bash
# The README's standalone install, exactly as written, into a fresh virtualenv, from the runtime requirement files
# alone (requirements.txt, then requirements-ui.txt; never the test pins): then the tab must start and answer HTTP.
# Called by `make test` (so CI runs it); pip's wheel cache makes repeated runs take about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_PIN="${TORCH_PIN:-torch==2.13.0}"
VENV=.venv-standalone
WORK="$(mktemp -d)"
trap 'if [ -n "${UI_PID:-}" ]; then kill "$UI_PID" 2>/dev/null || true; wait "$UI_PID" 2>/dev/null || true; fi; rm -rf "$WORK"' EXIT

rm -rf "$VENV"
# README: python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install -r requirements.txt
"$PYTHON" -m venv "$VENV" && "$VENV/bin/pip" install -q "$TORCH_PIN" && "$VENV/bin/pip" install -q -r requirements.txt
"$VENV/bin/python" -m lib_fluxq --help >/dev/null
# README: .venv/bin/pip install -r requirements-ui.txt          # only for the tab: python -m lib_fluxq ui
"$VENV/bin/pip" install -q -r requirements-ui.txt
"$VENV/bin/pip" check

# python -m lib_fluxq ui --models DIR --host 127.0.0.1 --port 0: wait for its URL, then fetch the page
mkdir -p "$WORK/models"
PYTHONUNBUFFERED=1 "$VENV/bin/python" -m lib_fluxq ui --models "$WORK/models" --host 127.0.0.1 --port 0 \
    >"$WORK/ui.log" 2>&1 &
UI_PID=$!
URL=""
WAIT_S=600  # importing gradio and building the page takes seconds, minutes on a loaded CI machine
for _ in $(seq 1 $((WAIT_S * 2))); do
    URL="$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$WORK/ui.log" | head -n 1 || true)"
    [ -n "$URL" ] && break
    if ! kill -0 "$UI_PID" 2>/dev/null; then
        echo "standalone install: the tab exited before serving:" >&2
        cat "$WORK/ui.log" >&2
        exit 1
    fi
    sleep 0.5
done
if [ -z "$URL" ]; then
    echo "standalone install: the tab printed no URL within $WAIT_S s:" >&2
    cat "$WORK/ui.log" >&2
    exit 1
fi
"$VENV/bin/python" - "$URL" <<'PY'
import sys
import urllib.request

with urllib.request.urlopen(sys.argv[1] + "/", timeout=60) as response:
    page = response.read().decode("utf-8", "replace")
    assert response.status == 200, response.status
# gradio serves its page config inline: the app's title and the tab's own components are in it
assert "gradio_config" in page and "Flux Quant" in page, page[:500]
print(f"standalone install: the tab answers on {sys.argv[1]} (HTTP 200, page config of 'Flux Quant')")
PY
