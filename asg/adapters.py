"""peft adapters on compressed models: keep a tied ASG head on the codebooks that train.

peft trains a module listed in `modules_to_save` as a copy wrapped beside the original. A compressed
table tied to the LM head is one module used twice (`ASGHead.embedding` is the input table), so after
peft copies the input table the head would still read the frozen original: `retie` points it at the
copy, and input and output stay one table through training, saving, reloading and merging.
"""

from __future__ import annotations

from torch import nn

from .modules import ASGHead


def retie(model: nn.Module) -> int:
    """Point every tied compressed head at the trained copy of its table where peft has wrapped the table
    (call after `peft.get_peft_model` or `PeftModel.from_pretrained`); returns how many heads were moved."""
    copies = {}
    for module in model.modules():
        original = getattr(module, "original_module", None)
        saved = getattr(module, "modules_to_save", None)
        if original is not None and isinstance(saved, nn.ModuleDict):
            active = getattr(module, "active_adapter", None)
            active = active[0] if isinstance(active, (list, tuple)) and active else active
            if active in saved:
                copies[id(original)] = saved[active]
    moved = 0
    for module in model.modules():
        if isinstance(module, ASGHead) and id(module.embedding) in copies:
            module.embedding = copies[id(module.embedding)]
            moved += 1
    return moved
