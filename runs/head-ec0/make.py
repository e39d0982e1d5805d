"""The shipped model with its head widened to read the expected-code offset, untrained (zero new columns):
residual = offset + the shipped head's sample.  PYTHONPATH=. python runs/head-ec0/make.py"""
from hart.pipeline import HARTPipeline
from train.train_head import read_expected_code

pipe = HARTPipeline.from_pretrained("assets/hart-emoji")
pipe.transformer.float()
pipe.tokenizer.float()
pipe.transformer.diffloss = read_expected_code(pipe.transformer.diffloss)
pipe.transformer.config.head_expected_code = True
pipe.save_pretrained("runs/head-ec0/model")
