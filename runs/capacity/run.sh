#!/bin/bash
# Session 16 capacity probe: the runs/ar128-last recipe (stage 2 continued from the shipped model without last-scale
# token dropping, 20 min) on a 400-emoji subset instead of all 3,788. If the 128 px last scale is hard because the
# model must memorise too many tokens, it should be learned far faster here than on the full data (+2.7 points in 20 min).
cd "$(dirname "$0")/../.."
python -m train.train_ar --preset emoji-128 --tokenizer assets/hart-emoji --init-from assets/hart-emoji \
    --data data/emoji-sub400 --out runs/capacity/sub400 --drop-last-scale false --lr 1e-4 --warmup 20 --steps 5000 \
    --max-minutes 20 --checkpoint-minutes 10 --eval-every 100000 --resolution-embed true --first-token-weight 10 \
    --log-every 50 > runs/capacity/sub400-stdout.txt 2>&1
