#!/bin/bash
# Session 15, second run: as runs/head-ec but every batch from the model's own generations (--generated-share 1).
# In the teacher-forced pool the drawn token is always the true one, so there the head learns to cancel the
# offset, the opposite of what generation needs (runs/head-ec: generated explained flat while teacher-forced rose).
cd /work/main
python -m train.train_head --model assets/hart-emoji --out runs/head-ec1 --expected-code true --lr 1e-4 --warmup 50 \
    --steps 3300 --max-minutes 45 --checkpoint-minutes 8 --log-every 250 --low-t-share 0.9 --low-t-max 300 \
    --sample-loss-weight 10 --balance-resolutions true --generated-share 1 >> runs/head-ec1/stdout.txt 2>&1
