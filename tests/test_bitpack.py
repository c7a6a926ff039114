"""Index tables packed at ⌈log2 n⌉ bits: the documented layout, round trips, and damaged packed tables."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import asg
from asg import bitpack
from tiny_models import VOCAB, build, outputs, sample_inputs


def test_the_layout_is_little_endian_bits_in_row_major_order():
    # 3-bit entries 1, 2, 3, 4, 5: bits 100 010 110 001 101 (least significant first), read 8 to a byte from bit 0
    packed = bitpack.pack(torch.tensor([[1, 2, 3], [4, 5, 0]], dtype=torch.uint8), 3)
    stream = "100" "010" "110" "001" "101" "000" + "000000"  # padded to whole bytes
    want = [int(stream[i:i + 8][::-1], 2) for i in range(0, 24, 8)]
    assert packed.tolist() == want
    # at 8 and 16 bits the layout is the little-endian bytes of uint8 / uint16 arrays
    codes = torch.tensor([[513, 7], [65535, 0]], dtype=torch.uint16)
    assert bitpack.pack(codes, 16).numpy().tobytes() == codes.numpy().astype("<u2").tobytes()


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 70_000), st.integers(0, 3000), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_pack_then_unpack_gives_back_every_entry(count, rows, columns, seed):
    dtype = asg.modules.index_dtype(min(count, 2**31 - 1))
    values = torch.from_numpy(np.random.default_rng(seed).integers(0, count, (rows, columns))).to(dtype)
    bits = bitpack.bits_for(count)
    packed = bitpack.pack(values, bits)
    assert packed.numel() == math.ceil(rows * columns * bits / 8)
    assert torch.equal(bitpack.unpack(packed, (rows, columns), bits, dtype), values)


def test_bits_for_is_the_ceiling_of_log2():
    assert [bitpack.bits_for(n) for n in (1, 2, 3, 4, 5, 256, 257, 1024, 1025, 32768, 100_000)] == \
        [1, 1, 2, 2, 3, 8, 9, 10, 11, 15, 17]
    with pytest.raises(ValueError, match="values must lie in 0..15"):
        bitpack.pack(torch.tensor([16]), 4)


def test_appendix_c_code_overhead_is_what_a_folder_stores():
    # V=250,002, D=768, m=48, k=1024: 10-bit codes are 1.95% of the float32 table (16-bit storage was 3.12%)
    table = asg.ASGEmbedding(250_002, 768, 1024, 48, device="meta")
    assert round(100 * table.index_bytes_on_disk() / (250_002 * 768 * 4), 2) == 1.95
    assert round(100 * table.index_bytes() / (250_002 * 768 * 4), 2) == 3.12


def test_packed_bytes_are_counted_on_disk_and_in_memory(tmp_path):
    model = build("mt5")  # untied: two tables
    report = asg.compress(model, asg.ASGConfig(k=1024, m=8, codebook="shared", niter=2), progress=False)
    codebooks = 2 * 1024 * 4 * 4  # k rows of D/m=4 float32 values, two tables
    assert report.code_bytes == 2 * VOCAB * 8 * 2  # int16 in memory
    assert report.code_bytes_on_disk == 2 * math.ceil(VOCAB * 8 * 10 / 8)  # 10 bits on disk
    assert report.embedding_bytes_after == codebooks + report.code_bytes
    assert report.embedding_bytes_on_disk == codebooks + report.code_bytes_on_disk
    assert report.dense_float32_bytes == 2 * VOCAB * 32 * 4 and report.dense_bf16_bytes == 2 * VOCAB * 32 * 2
    asg.save_pretrained(model, tmp_path / "ckpt")
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as handle:
        stored = sum(math.prod(handle.get_slice(n).get_shape()) * (4 if "codebooks" in n else 1)
                     for n in handle.keys() if n.startswith(("shared.", "lm_head.")))
    assert stored == report.embedding_bytes_on_disk


def saved_weights(tmp_path, arch):
    """The weights file of a compressed tiny model's folder, and its metadata."""
    model = build(arch)
    asg.compress(model, asg.ASGConfig(k=16, m=8), progress=False)
    asg.save_pretrained(model, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    with safe_open(str(weights), "pt") as handle:
        return weights, handle.metadata()


def test_a_packed_table_of_the_wrong_size_is_refused(tmp_path):
    weights, metadata = saved_weights(tmp_path, "bert")
    tensors = load_file(str(weights))
    name = "bert.embeddings.word_embeddings.codes_packed"
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, str(weights), metadata=metadata)
    with pytest.raises(ValueError, match="packed data must be 844 bytes"):
        asg.from_pretrained(tmp_path / "ckpt")


def test_a_changed_layout_record_is_refused(tmp_path):
    weights, metadata = saved_weights(tmp_path, "gpt2")
    layout = json.loads(metadata["asg_packed"])
    layout["transformer.wte.codes"]["bits"] = 2  # the bytes would also fit 2-bit entries of another shape
    layout["transformer.wte.codes"]["shape"] = [211, 16]
    save_file(load_file(str(weights)), str(weights), metadata={**metadata, "asg_packed": json.dumps(layout)})
    with pytest.raises(ValueError, match="is not what the config describes"):
        asg.from_pretrained(tmp_path / "ckpt")


def test_an_older_model_saved_again_is_written_packed_and_loads_bit_exactly(tmp_path):
    from pathlib import Path

    old = asg.from_pretrained(Path(__file__).parent / "data" / "bert-mlm-asg-v1")
    assert old.config.asg["format_version"] == 1
    asg.save_pretrained(old, tmp_path / "again")
    again = asg.from_pretrained(tmp_path / "again")
    assert again.config.asg["format_version"] == asg.format.FORMAT_VERSION
    want, got = old.state_dict(), again.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    inputs = sample_inputs("bert")
    assert torch.equal(outputs(again, inputs), outputs(old, inputs))


# --- stored precision -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, stored", [("bfloat16", "BF16"), ("float16", "F16")])
@pytest.mark.parametrize("arch", ["bert", "mt5"])
def test_codebooks_stored_in_a_lower_precision_round_trip_bit_exactly(arch, dtype, stored, tmp_path):
    import transformers as tf

    full = build(arch)
    exact = asg.compress(full, asg.ASGConfig(k=16, m=8), progress=False)
    model = build(arch)
    report = asg.compress(model, asg.ASGConfig(k=16, m=8, dtype=dtype), progress=False)
    assert report.settings["dtype"] == dtype
    for name in report.reconstruction_error:  # rounding to 8 or 11 significant bits costs little
        assert report.reconstruction_error[name] == pytest.approx(exact.reconstruction_error[name], rel=0.01)
    values = 16 * 32 * (2 if arch == "mt5" else 1)
    assert report.embedding_bytes_on_disk == exact.embedding_bytes_on_disk - 2 * values
    asg.save_pretrained(model, tmp_path / "ckpt")
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as handle:
        types = {handle.get_slice(n).get_dtype() for n in handle.keys() if n.endswith("codebooks")}
        rest = {handle.get_slice(n).get_dtype() for n in handle.keys() if "codes" not in n and "codebooks" not in n}
    assert types == {stored} and rest == {"F32"}  # only the compressed tables change precision
    auto = {"bert": tf.AutoModelForMaskedLM, "mt5": tf.AutoModelForSeq2SeqLM}[arch]
    for loaded in (asg.from_pretrained(tmp_path / "ckpt"), auto.from_pretrained(tmp_path / "ckpt")):
        want, got = model.state_dict(), loaded.state_dict()
        assert all(torch.equal(want[k], got[k]) and want[k].dtype == got[k].dtype for k in want)
        inputs = sample_inputs(arch)
        assert torch.equal(outputs(loaded, inputs), outputs(model, inputs))


def test_values_beyond_float16_are_refused_and_bad_dtypes_named():
    model = build("bert")
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1e8)
    with pytest.raises(ValueError, match="exceed the range of torch.float16; store them as bfloat16"):
        asg.compress(model, asg.ASGConfig(k=16, m=8, dtype="float16"), progress=False)
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        asg.ASGConfig(k=16, m=8, dtype="int8")


def test_a_byte_budget_counts_codebooks_in_their_stored_precision():
    V, D = 30522, 384
    full = asg.baselines.config_for_budget("asg", V, D, 0.05, by="bytes", m=24)
    half = asg.baselines.config_for_budget("asg", V, D, 0.05, by="bytes", m=24, dtype="bfloat16")
    def cost(k, value):  # codebooks of k·D values, codes at log2(k) bits
        return k * D * value + V * 24 * bitpack.bits_for(k) / 8

    allowed = 0.05 * V * D * 4
    assert cost(full.k, 4) <= allowed < cost(full.k + 1, 4)
    assert half.dtype == "bfloat16" and cost(half.k, 2) <= allowed < cost(half.k + 1, 2)
    assert half.k == 1740  # nearly twice full.k = 929: an 11th code bit takes part of the saving
    shared = asg.baselines.config_for_budget("asg", V, D, 0.01, m=24, codebook="shared")  # k·D/m values, not k·D
    assert shared.k * D // 24 <= 0.01 * V * D < (shared.k + 1) * D // 24
