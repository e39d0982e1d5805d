#!/bin/bash
# Session 13 probe (not shipped): does stage 2 without last-scale token dropping teach the 128 px last scale
# quickly? Measured by runs/head-ft/teacher_forced_tokens.py before (37 %) and after.
cd /work/main
python -m train.train_ar --preset emoji-128 --tokenizer assets/hart-emoji --init-from assets/hart-emoji \
    --out runs/ar128-last --drop-last-scale false --lr 1e-4 --warmup 20 --steps 900 --max-minutes 20 \
    --checkpoint-minutes 10 --eval-every 100000 --resolution-embed true --first-token-weight 10 --log-every 50 \
    > runs/ar128-last/stdout.txt 2>&1
