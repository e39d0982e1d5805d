#!/bin/bash
# Session 14: as runs/head-gen, with a quarter (not half) of each batch from the model's own generations and
# 22 minutes, then package and evaluate at the shipped defaults with a one-row sweep (cfg 2).
cd /work/main
python -m train.train_head --model assets/hart-emoji --out runs/head-gen25 --lr 1e-4 --warmup 50 --steps 1700 \
    --max-minutes 22 --checkpoint-minutes 8 --log-every 250 --low-t-share 0.9 --low-t-max 300 \
    --sample-loss-weight 10 --balance-resolutions true --generated-share 0.25 > runs/head-gen25/stdout.txt 2>&1
test -f runs/head-gen25/model/model_index.json || { echo "no exported model" > runs/head-gen25/waiter.txt; exit 1; }
python -m train.package --model runs/head-gen25/model --name hart-emoji --out runs/head-gen25/package > runs/head-gen25/waiter.txt 2>&1
python -m train.evaluate --model runs/head-gen25/package --out runs/head-gen25/package/eval.json \
    --sweep 2 --sweep-top-k 50 --sweep-temperature 0.5 --sweep-residual-temperature 0 \
    --sweep-residual-cfg 0 >> runs/head-gen25/waiter.txt 2>&1
echo "done $(date)" >> runs/head-gen25/waiter.txt
