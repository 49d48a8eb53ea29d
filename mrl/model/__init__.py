"""The model: a Hugging Face backbone, pooled into one embedding per text.

    encoder.py    Encoder: tokenise, embed, pool, normalise; encode() for inference; save() and from_pretrained()
    pooling.py    mean, CLS and last-token pooling under left or right padding
    folder.py     the sentence-transformers folder layout, read and written (modules.json, pooling, Dense)
    lora.py       LoRA adapters (peft), and what a saved model holds of them
    load.py       a config's model (hub id or local copy) as an Encoder
    sharding.py   the whole model back from an FSDP-sharded one
"""

from mrl.model.encoder import Encoder, mean_pool

__all__ = ["Encoder", "mean_pool"]
