"""LoRA (Hu et al., 2021) through peft: low-rank adapters on the backbone's Linear layers train in place of
its weights, and the Matryoshka loss is unchanged. peft is an optional extra (pip install -e .[lora]).

The trained model is saved merged by default: the adapters folded into the weights, a plain model in the
sentence-transformers layout that needs no peft to load. With model.lora.save=adapter, the folder holds the
adapter alone (adapter_config.json names the base model), which transformers, and so mrl and
sentence-transformers, load on top of that base model when peft is installed.
"""

import copy

from torch import nn


def add_lora(backbone: nn.Module, config) -> nn.Module:
    """`backbone` wrapped by peft with adapters as mrl.run.config.LoraConfig says; only the adapters train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError("model.lora: needs peft: pip install peft (or pip install -e .[lora])") from None
    frozen = [name for name, module in backbone.named_modules()  # BERT's pooler: not part of the embedding
              if name.startswith("pooler") and isinstance(module, nn.Linear)]
    return get_peft_model(backbone, LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                               target_modules=config.target_modules, exclude_modules=frozen or None,
                                               bias="none"))


def is_lora(backbone: nn.Module) -> bool:
    return hasattr(backbone, "merge_and_unload")


def backbone_to_save(backbone: nn.Module, save: str = "merged") -> nn.Module:
    """What Encoder.save writes: a plain backbone, a LoRA one merged (a copy: the model in training is left as
    it is), or with save="adapter" the peft model itself, whose save_pretrained writes the adapter alone."""
    if not is_lora(backbone) or save == "adapter":
        return backbone
    return copy.deepcopy(backbone).merge_and_unload()
