#!/bin/bash
# After the fine-tune: package (fp16), then evaluate with the same reduced sweep as runs/head-ft.
cd /work/main
while pgrep -f "out runs/head-ec" > /dev/null; do sleep 20; done
test -f runs/head-ec/model/model_index.json || { echo "no exported model" > runs/head-ec/waiter.txt; exit 1; }
python -m train.package --model runs/head-ec/model --name hart-emoji --out runs/head-ec/package > runs/head-ec/waiter.txt 2>&1
python -m train.evaluate --model runs/head-ec/package --out runs/head-ec/package/eval.json --choose-defaults \
    --sweep 1,2 --sweep-top-k 50 --sweep-temperature 1,0.7,0.5 --sweep-residual-temperature 0 \
    --sweep-residual-cfg 0 >> runs/head-ec/waiter.txt 2>&1
echo "done $(date)" >> runs/head-ec/waiter.txt
