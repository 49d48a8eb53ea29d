"""A config's model (mrl.run.config.ModelConfig) as an Encoder: from its local copy or the hub (mrl.sources)."""

import os

import torch

from mrl.model.encoder import Encoder
from mrl.sources import resolve_model, unreachable


def load_encoder(model_config, mirror: dict, gradient_checkpointing: bool = False):
    """The config's model (mrl.run.config.ModelConfig) as an Encoder, from its local copy or the hub, with LoRA
    adapters if model.lora asks; a hub id that neither provides is an error naming the id, the mirror and the fix."""
    path = resolve_model(model_config.name, mirror)
    try:
        return Encoder.from_pretrained(path, max_seq_length=model_config.max_seq_length,
                                       normalize=model_config.normalize, dense_dim=model_config.dense_dim,
                                       dense_activation=model_config.dense_activation,
                                       dtype=getattr(torch, model_config.dtype), pooling=model_config.pooling,
                                       include_prompt=model_config.include_prompt, prompts=model_config.prompts,
                                       append_eos=model_config.append_eos,
                                       gradient_checkpointing=gradient_checkpointing,
                                       lora=model_config.lora if model_config.lora.enabled else None)
    except OSError as error:  # what transformers raises for a hub id it cannot reach
        if os.path.isdir(path):  # a local folder that is broken: transformers' own error says how
            raise
        raise unreachable("model", model_config.name, mirror, error) from error
