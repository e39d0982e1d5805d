#!/bin/bash
# Session 12: a 512 x 4 residual head on the shipped model, low-timestep draw (90 % of tokens at t < 300).
cd /work/main
python -m train.train_head --model assets/hart-emoji --out runs/head512t --diff-width 512 --diff-depth 4 \
    --lr 1e-3 --warmup 200 --steps 36000 --max-minutes 65 --checkpoint-minutes 8 --log-every 1000 \
    --low-t-share 0.9 --low-t-max 300 > runs/head512t/stdout.txt 2>&1
