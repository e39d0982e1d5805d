#!/bin/bash
# Session 15: the shipped head widened to read the expected-code offset (--expected-code), the residual
# starting from that offset; half of each batch from the model's own generations. See NOTES.md.
cd /work/main
python -m train.train_head --model assets/hart-emoji --out runs/head-ec --expected-code true --lr 1e-4 --warmup 50 \
    --steps 5000 --max-minutes 50 --checkpoint-minutes 8 --log-every 250 --low-t-share 0.9 --low-t-max 300 \
    --sample-loss-weight 10 --balance-resolutions true --generated-share 0.5 >> runs/head-ec/stdout.txt 2>&1
