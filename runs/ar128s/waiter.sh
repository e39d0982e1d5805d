#!/bin/bash
# Wait for the training process, then package and evaluate (the session-10 pattern).
cd /work/main
while pgrep -f "train.train_ar --preset emoji-128" > /dev/null; do sleep 20; done
echo "package $(date)" >> runs/ar128s/waiter.log
python -m train.package --model runs/ar128s/model --name hart-emoji --out runs/ar128s/package > runs/ar128s/package.log 2>&1
echo "evaluate $(date)" >> runs/ar128s/waiter.log
python -m train.evaluate --model runs/ar128s/package --out runs/ar128s/package/eval.json --choose-defaults > runs/ar128s/eval.log 2>&1
echo "done $(date)" >> runs/ar128s/waiter.log
