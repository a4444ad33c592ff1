#!/bin/sh
# Wall time of `cecollm generate --mode cloud --threads 1 --max-new-tokens 1` from a cached model, the
# tree of commit BEFORE (unpacked in $1) against this checkout, interleaved, 5 runs each.
#   sh results/bench-engine/start_time.sh /tmp/before
PY=${PYTHON:-/work/main/.venv/bin/python}
for i in 1 2 3 4 5; do
  for side in before after; do
    if [ $side = before ]; then path=$1; else path=$(pwd); fi
    /usr/bin/time -f "$side %e s" env PYTHONPATH=$path $PY -m cecollm generate --mode cloud --threads 1 \
      --prompt "Give three tips for staying healthy." --max-new-tokens 1 2>&1 >/dev/null | grep -E "^(before|after) "
  done
done
