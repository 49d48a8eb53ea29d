"""A training run, as train.py drives it: its config, batches, optimiser groups, step helpers and folder.

    config.py       the config tree: dataclass defaults, YAML recipes, --set overrides, checks per field
    batches.py      the config's training tables as one sampler and collator (with teacher embeddings)
    optimizer.py    AdamW's parameter groups, and the learned dim weights' gradients across processes
    gradcache.py    GradCache: the same gradients, embedded in chunks of memory
    speed.py        length-grouped forwards and torch.compile: the same embeddings, faster
    monitor.py      each step's losses and gradient norm, checked finite
    throughput.py   samples and tokens per second
    folder.py       the run folder: checkpoints, resume, the saved model, results and card
    quantisation.py quantisation-aware training: the int8 / int4 ranges calibrated before it, the saved record
"""
