"""Training: the LightningModule and fit (loop), the optimizer (optim), the fine-tuning
schedule (finetune: freeze/unfreeze, WiSE-FT), the time budget, checkpoints, distributed
training, the allocator, a run's life (lifecycle: train / resume), the scores written after
training (finish), cross-validation (crossval) and the ablation sweep (sweep).

May import: site, reporting, evaluation, deploy, run, data, config, models, errors. Nothing
here may be imported by those (tests/test_layers.py). Keep this file free of imports:
`import cxrlab` loads training.allocator, so it loads this file too.
"""
