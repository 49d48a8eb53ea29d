"""What changes when Accelerate shards the model across processes (FSDP2: `accelerate launch --use_fsdp
--fsdp_version 2 ...`): each process holds a slice of every weight, so anything that runs the model takes all
processes (evaluation runs on every process; the main process alone reports it), and saving first gathers
the full weights onto the main process. Nothing else differs: the loss, cross-device negatives and GradCache
work on embeddings, and tests/test_fsdp.py pins the loss and every gradient shard of 2 fully sharded CPU
processes to 1 process's. Under DDP or one process these functions do what the unsharded loop did.
"""

from torch import nn


def is_sharded(accelerator) -> bool:
    return accelerator.distributed_type.name == "FSDP"


def full_model(accelerator, model: nn.Module, rebuild) -> nn.Module | None:
    """The trained model with its full weights on the main process (None elsewhere); every process must call it.
    rebuild() makes a fresh, unsharded copy of the model (with its LoRA adapters, if any) to load them into."""
    if not is_sharded(accelerator):
        return accelerator.unwrap_model(model) if accelerator.is_main_process else None
    state = accelerator.get_state_dict(model)  # gathered onto the main process
    if not accelerator.is_main_process:
        return None
    copy = rebuild()
    copy.load_state_dict(state)
    return copy
