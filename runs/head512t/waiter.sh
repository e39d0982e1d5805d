#!/bin/bash
# After the head run: package in fp16, then evaluate with a reduced sweep (the transformer is unchanged,
# so cfg and top-k are only re-checked; the head's own settings, residual temperature and guidance, are swept).
cd /work/main
while pgrep -f "train.train_head" > /dev/null; do sleep 10; done
test -f runs/head512t/model/model_index.json || { echo "no exported model" > runs/head512t/waiter.txt; exit 1; }
python -m train.package --model runs/head512t/model --name hart-emoji --out runs/head512t/package > runs/head512t/waiter.txt 2>&1
python -m train.evaluate --model runs/head512t/package --out runs/head512t/package/eval.json --choose-defaults \
    --sweep 1,2 --sweep-top-k 50 --sweep-residual-temperature 0,1 --sweep-residual-cfg last,0 >> runs/head512t/waiter.txt 2>&1
echo "done $(date)" >> runs/head512t/waiter.txt
