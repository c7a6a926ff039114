"""Make ASG folders first-class transformers checkpoints: after `import asg`,
`AutoModel*.from_pretrained(folder)` returns the compressed model.

This is a thin adapter over transformers' quantization registry (`register_quantization_config`,
`register_quantizer`), which is semi-internal and changes between versions: it is tested against the
pinned transformers. A folder's config.json carries `quantization_config = {"quant_method": "asg"}`;
the quantizer puts empty ASG tables where the config's `asg` section says, before transformers
loads the weights into them.

Without `import asg`, transformers does not know the "asg" method. It would then skip it and load a
dense model with random embeddings, so every folder also names, through `transformers_weights`, an
index whose only shard is called `ASG_NOTICE`: plain transformers stops on that missing file, and its
name says what to do. The quantizer points transformers back at the real weights.
"""

from __future__ import annotations

from pathlib import Path

from transformers.quantizers import HfQuantizer, register_quantizer

from transformers.core_model_loading import ConversionOps

from . import bitpack
from .checkpoint import check_loaded_from, validate_tables
from .format import (INDEX_NAME, METHOD, PACKED_SUFFIX, ASGQuantizationConfig, adapt_plan,  # noqa: F401 (re-exported)
                     in_memory, validate_plan)
from .modules import CompressedEmbedding
from .loading import architecture_class
from .surgery import rebuild

@register_quantizer(METHOD)
class ASGQuantizer(HfQuantizer):
    """Builds the ASG tables recorded in the config before transformers loads an ASG folder's weights."""

    requires_calibration = False

    def update_attn_implementation(self, config):
        # The only hook that sees the config before transformers builds the model and picks the weights
        # file: point it at the real weights instead of the notice index that stops plain transformers,
        # and restore the tying the folder was saved with (transformers 5 reads T5 configs back tied).
        if getattr(config, "transformers_weights", None) == INDEX_NAME:
            config.transformers_weights = None
        plan = getattr(config, "asg", None)
        if isinstance(plan, dict) and plan.get("tie_word_embeddings") is not None:
            config.tie_word_embeddings = plan["tie_word_embeddings"]
        return super().update_attn_implementation(config)

    def _process_model_before_weight_loading(self, model, **kwargs):
        plan = getattr(model.config, "asg", None)
        if not isinstance(plan, dict):
            raise ValueError("this checkpoint's config names the asg quantization method but has no 'asg' section; "
                             "write it with asg.save_pretrained")
        validate_plan(plan, "this checkpoint's config")
        saved = architecture_class(model.config)
        if saved is not None and type(model) is not saved:
            locations = [loc for entry in plan["tables"].values() for loc in entry["locations"]]
            plan = adapt_plan(plan, model, saved, dict.fromkeys(locations), "this checkpoint")
        rebuild(model, in_memory(plan))
        return model

    # Index tables are stored packed (format 2) under their name + PACKED_SUFFIX: the loader unpacks them
    # with `_Unpack` into the tables `rebuild` made.
    serialized_names = {name: [name + PACKED_SUFFIX] for name in ("codes", "groups")}

    def get_load_operations(self) -> dict:
        return {"deserialize": _Unpack}

    def _process_model_after_weight_loading(self, model, **kwargs):
        folder = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
        where = folder or "this checkpoint"
        if folder and Path(folder).is_dir():
            check_loaded_from(model, folder)
        validate_tables(model, where)  # codes in range, finite values: before anything reads them
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False  # already compressed: the stored tensors load as they are

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


class _Unpack(ConversionOps):
    """Unpack an index table stored at ⌈log2 n⌉ bits into the table `rebuild` put in the model."""

    def __init__(self, quantizer) -> None:
        self.quantizer = quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
        owner, _, name = full_layer_name.rpartition(".")
        module = model.get_submodule(owner)
        if not isinstance(module, CompressedEmbedding) or name not in module.index_bits():
            raise ValueError(f"this checkpoint stores a packed {full_layer_name!r}, which is not an index table of "
                             "the model; the checkpoint is damaged, save it again")
        packed = next(iter(input_dict.values()))
        packed = packed[0] if isinstance(packed, list) else packed
        table = getattr(module, name)
        try:
            values = bitpack.unpack(packed.cpu(), tuple(table.shape), module.index_bits()[name], table.dtype)
        except ValueError as err:
            raise ValueError(f"this checkpoint's tensor {full_layer_name!r}: {err}; save it again") from None
        return {full_layer_name: values}

    @property
    def reverse_op(self) -> ConversionOps:
        return _Pack()


class _Pack(ConversionOps):
    """What transformers' own `save_pretrained` writes of an index table: packed under the same name as ours
    (a file without checksums or layout metadata; both loaders derive the layout from the config)."""

    def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
        owner, _, name = full_layer_name.rpartition(".")
        bits = model.get_submodule(owner).index_bits()[name.removesuffix(PACKED_SUFFIX)]
        return {key: bitpack.pack(value[0] if isinstance(value, list) else value, bits) for key, value in input_dict.items()}
