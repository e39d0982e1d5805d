#!/bin/bash
# Session 13: fine-tune the shipped 512 x 4 head with the unrolled-sampler loss added to the official one.
cd /work/main
python -m train.train_head --model assets/hart-emoji --out runs/head-ft --lr 1e-4 --warmup 50 --steps 4500 \
    --max-minutes 45 --checkpoint-minutes 8 --log-every 500 --low-t-share 0.9 --low-t-max 300 \
    --sample-loss-weight 10 --balance-resolutions true > runs/head-ft/stdout.txt 2>&1
