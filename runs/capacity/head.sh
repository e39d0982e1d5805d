#!/bin/bash
# Session 16: retrain the residual head on the sub400 transformer's conditions (subset data), from the shipped head,
# with the shipped head's fine-tune recipe (runs/head-ft/run.sh), 15 min.
cd "$(dirname "$0")/../.."
python -m train.train_head --model runs/capacity/sub400/model-shipped-head --data data/emoji-sub400 \
    --out runs/capacity/head-sub400 --lr 1e-4 --warmup 50 --steps 4500 --max-minutes ${MINUTES:-15} --checkpoint-minutes 8 \
    --log-every 250 --low-t-share 0.9 --low-t-max 300 --sample-loss-weight 10 --balance-resolutions true \
    > runs/capacity/head-sub400-stdout.txt 2>&1
