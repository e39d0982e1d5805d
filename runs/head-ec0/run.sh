#!/bin/bash
cd /work/main
PYTHONPATH=. python runs/head-ec0/make.py > runs/head-ec0/stdout.txt 2>&1
python -m train.package --model runs/head-ec0/model --name hart-emoji --out runs/head-ec0/package >> runs/head-ec0/stdout.txt 2>&1
python -m train.evaluate --model runs/head-ec0/package --out runs/head-ec0/package/eval.json --choose-defaults \
    --sweep 1,2 --sweep-top-k 50 --sweep-temperature 1,0.7,0.5 --sweep-residual-temperature 0 \
    --sweep-residual-cfg 0 >> runs/head-ec0/stdout.txt 2>&1
echo "done $(date)" >> runs/head-ec0/stdout.txt
