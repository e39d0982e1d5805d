#!/bin/bash
# Session 14: fine-tune the shipped head with half of each batch from the model's own generations
# (targets: image latent minus the generated discrete latent), see NOTES.md.
cd /work/main
python -m train.train_head --model assets/hart-emoji --out runs/head-gen --lr 1e-4 --warmup 50 --steps 4000 \
    --max-minutes 40 --checkpoint-minutes 8 --log-every 250 --low-t-share 0.9 --low-t-max 300 \
    --sample-loss-weight 10 --balance-resolutions true --generated-share 0.5 > runs/head-gen/stdout.txt 2>&1
