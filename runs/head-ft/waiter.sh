#!/bin/bash
# After the fine-tune: package (fp16), then evaluate with a reduced sweep (token temperature added; the head's
# residual temperature 0 and guidance 0 were chosen in session 12 by wide margins and are kept).
cd /work/main
while pgrep -f "out runs/head-ft" > /dev/null; do sleep 20; done
test -f runs/head-ft/model/model_index.json || { echo "no exported model" > runs/head-ft/waiter.txt; exit 1; }
python -m train.package --model runs/head-ft/model --name hart-emoji --out runs/head-ft/package > runs/head-ft/waiter.txt 2>&1
python -m train.evaluate --model runs/head-ft/package --out runs/head-ft/package/eval.json --choose-defaults \
    --sweep 1,2 --sweep-top-k 50 --sweep-temperature 1,0.7,0.5 --sweep-residual-temperature 0 \
    --sweep-residual-cfg 0 >> runs/head-ft/waiter.txt 2>&1
echo "done $(date)" >> runs/head-ft/waiter.txt
