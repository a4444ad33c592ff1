#!/bin/sh
# Start times from a cached model, the tree of commit BEFORE (unpacked in $1) against this checkout,
# interleaved, 5 runs each (wall seconds, /usr/bin/time):
#   generate: `cecollm generate --mode cloud --threads 1 --max-new-tokens 1` (to the first token, printed)
#   edge:     `cecollm-edge --standalone --threads 1 --max-new-tokens 1` (its own first token)
#   worker:   what `cecollm-worker` does before it serves: imports, load_mapped, identity, DecoderRunner
#   git archive BEFORE cecollm | tar -x -C /tmp/before && sh results/bench-engine/start_time.sh /tmp/before
PY=${PYTHON:-/work/main/.venv/bin/python}
HERE=$(pwd)
cd /tmp  # not the checkout: `python -m` puts the current directory first on the path
PROMPT="Give three tips for staying healthy."
WORKER='import sys
from cecollm.cloud.cli import main
from cecollm.layers import DecoderRunner
from cecollm.loading import LoadedModel, resolve_model_dir
from cecollm.weights import load_mapped
d = resolve_model_dir("SmolLM2-135M-Instruct"); m = load_mapped(d)
LoadedModel(m, None, d, str(d)).identity; DecoderRunner(m)'
EDGE='import sys; from cecollm.edge.cli import main; sys.argv[0] = "cecollm-edge"; main()'
for i in 1 2 3 4 5; do
  for side in before after; do
    if [ $side = before ]; then path=$1; else path=$HERE; fi
    /usr/bin/time -f "generate $side %e" env PYTHONPATH=$path $PY -m cecollm generate --mode cloud --threads 1 \
      --prompt "$PROMPT" --max-new-tokens 1 2>&1 >/dev/null | grep -E "^generate "
    /usr/bin/time -f "edge $side %e" env PYTHONPATH=$path $PY -c "$EDGE" --standalone --threads 1 \
      --prompt "$PROMPT" --max-new-tokens 1 2>&1 >/dev/null | grep -E "^edge "
    /usr/bin/time -f "worker $side %e" env PYTHONPATH=$path $PY -c "$WORKER" 2>&1 >/dev/null | grep -E "^worker "
  done
done | awk '{print; t[$1" "$2] = t[$1" "$2] " " $3} END {for (k in t) print "all", k, t[k]}'
