"""ASG folders as ordinary transformers checkpoints: Auto classes, pipelines, resizing, a checkpoint kept
from this version, and a two-process run."""

import json
import socket
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import asg
from tiny_models import VOCAB, build, make_bert_classifier, outputs, sample_inputs, write_bert_folder

DATA = Path(__file__).parent / "data"
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "father", "mother", "paris", "rome", "good", "bad"]

AUTO = {"bert": tf.AutoModelForMaskedLM, "bert-base": tf.AutoModel, "xlmr": tf.AutoModelForMaskedLM,
        "t5": tf.AutoModelForSeq2SeqLM, "mt5": tf.AutoModelForSeq2SeqLM, "gpt2": tf.AutoModelForCausalLM,
        "llama": tf.AutoModelForCausalLM, "gemma3": tf.AutoModelForCausalLM}


@pytest.mark.parametrize("arch", sorted(AUTO))
def test_auto_classes_load_an_asg_folder_bit_identically(arch, tmp_path):
    model = build(arch)
    asg.compress(model, asg.ASGConfig(k=16, m=8), progress=False)
    asg.save_pretrained(model, tmp_path / "ckpt")
    through_transformers = AUTO[arch].from_pretrained(tmp_path / "ckpt")
    ours = asg.from_pretrained(tmp_path / "ckpt")
    inputs = sample_inputs(arch)
    assert torch.equal(outputs(through_transformers, inputs), outputs(ours, inputs))
    assert isinstance(through_transformers.get_input_embeddings(), asg.ASGEmbedding)
    assert through_transformers.config.asg["format_version"] == asg.format.FORMAT_VERSION
    head = through_transformers.get_output_embeddings()
    if head is not None and arch in ("bert", "xlmr", "t5", "gpt2", "gemma3"):
        assert head.embedding is through_transformers.get_input_embeddings()  # tied stays tied


def test_transformers_own_save_of_a_loaded_model_loads_again(tmp_path):
    model = build("gpt2")
    asg.compress(model, asg.ASGConfig(k=16, m=8), progress=False)
    asg.save_pretrained(model, tmp_path / "ckpt")
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    loaded.save_pretrained(tmp_path / "again")
    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    inputs = sample_inputs("gpt2")
    assert torch.equal(outputs(again, inputs), outputs(model, inputs))


def test_without_import_asg_loading_stops_with_what_to_do(tmp_path):
    model = build("bert")
    asg.compress(model, asg.ASGConfig(k=16, m=8), progress=False)
    asg.save_pretrained(model, tmp_path / "ckpt")
    code = f"from transformers import AutoModelForMaskedLM; AutoModelForMaskedLM.from_pretrained({str(tmp_path / 'ckpt')!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode != 0
    assert "pip-install-asg-and-import-asg-before-from_pretrained" in done.stderr
    assert "size mismatch" not in done.stderr


# --- pipelines --------------------------------------------------------------------------------------


def compressed_folder(tmp_path, model_class, name, **config):
    """A tiny model of `model_class` with a word tokenizer, compressed and saved with asg."""
    source = write_bert_folder(tmp_path / f"{name}-dense", WORDS, model_class=model_class)
    model = model_class.from_pretrained(source, **config)
    asg.compress(model, asg.ASGConfig(k=16, m=8), progress=False)
    asg.save_pretrained(model, tmp_path / name, tokenizer=tf.AutoTokenizer.from_pretrained(source))
    return str(tmp_path / name)


@pytest.mark.parametrize("task, model_class, text", [
    ("feature-extraction", tf.BertModel, "the cat sat on the mat"),
    ("fill-mask", tf.BertForMaskedLM, "the cat sat on the [MASK]"),
    ("token-classification", tf.BertForTokenClassification, "father went to paris"),
    ("text-classification", tf.BertForSequenceClassification, "the dog was good"),
    ("text-generation", tf.GPT2LMHeadModel, "the cat"),
])
def test_pipelines_run_on_compressed_models(task, model_class, text, tmp_path):
    folder = compressed_folder(tmp_path, model_class, task)
    by_folder = tf.pipeline(task, model=folder)  # transformers loads it (through the asg quantizer)
    by_asg = tf.pipeline(task, model=asg.from_pretrained(folder), tokenizer=folder)
    kwargs = {"max_new_tokens": 5, "do_sample": False} if task == "text-generation" else {}
    got, want = by_folder(text, **kwargs), by_asg(text, **kwargs)
    assert isinstance(by_folder.model.get_input_embeddings(), asg.ASGEmbedding)
    if task == "feature-extraction":
        assert torch.equal(torch.tensor(got), torch.tensor(want))
    else:
        assert got == want
    assert got  # a real answer, not an empty one


# --- resizing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "mt5", "gpt2"])
def test_resize_token_embeddings_encodes_new_rows_against_the_codebooks(arch, tmp_path):
    model = build(arch)
    asg.compress(model, asg.ASGConfig(k=16, m=8), progress=False)
    table = model.get_input_embeddings()
    old_codes, old_rows = table.codes.clone(), table.weight.detach().clone()
    torch.manual_seed(0)
    returned = model.resize_token_embeddings(VOCAB + 9)
    assert returned is model.get_input_embeddings() and returned.num_embeddings == VOCAB + 9
    assert torch.equal(table.codes[:VOCAB], old_codes)  # old tokens keep their concepts
    assert torch.equal(table.weight.detach()[:VOCAB], old_rows)
    new = table.weight.detach()[VOCAB:]
    assert torch.equal(table.codes[VOCAB:].long(), torch.as_tensor(asg.pq.encode(
        table.codebooks.detach().view(8, 16, 4), new)).long())  # new rows sit on their nearest concepts
    head = model.get_output_embeddings()
    assert head.out_features == VOCAB + 9 and head.embedding.num_embeddings == VOCAB + 9
    inputs = {"input_ids": torch.tensor([[VOCAB + 8, 3]])}
    if arch == "mt5":
        inputs["decoder_input_ids"] = torch.tensor([[0, VOCAB + 8]])
    assert outputs(model, inputs).shape[-1] == VOCAB + 9
    assert model.config.vocab_size == VOCAB + 9
    asg.save_pretrained(model, tmp_path / "ckpt")
    assert torch.equal(outputs(asg.from_pretrained(tmp_path / "ckpt"), inputs), outputs(model, inputs))
    model.resize_token_embeddings(VOCAB - 11)
    small = {key: torch.tensor([[0, 3]]) for key in inputs}  # (the ids above are now outside the vocabulary)
    assert outputs(model, small).shape[-1] == VOCAB - 11
    with pytest.raises(IndexError, match=f"outside the vocabulary of {VOCAB - 11} tokens"):
        outputs(model, inputs)


def test_resize_of_a_baseline_table_says_what_to_do():
    model = build("bert")
    asg.compress(model, asg.baselines.SGConfig(ratio=0.2), progress=False)
    with pytest.raises(ValueError, match="resize the dense model first"):
        model.resize_token_embeddings(VOCAB + 1)


def test_adding_tokens_then_compressing_works(tmp_path):
    source = write_bert_folder(tmp_path / "dense", WORDS, model_class=tf.BertForMaskedLM)
    tokenizer = tf.AutoTokenizer.from_pretrained(source)
    tokenizer.add_tokens(["grandmother", "lisbon"])
    model = tf.BertForMaskedLM.from_pretrained(source)
    model.resize_token_embeddings(len(tokenizer))
    report = asg.compress(model, asg.ASGConfig(k=16, m=8), progress=False)
    assert report.tables["input"]["num_embeddings"] == len(tokenizer) == VOCAB + 2
    ids = tokenizer("grandmother in lisbon", return_tensors="pt")
    assert model(**ids).logits.shape[-1] == VOCAB + 2


# --- stability and scale-out --------------------------------------------------------------------------


def test_a_checkpoint_written_by_version_0_1_still_loads():
    expected = load_file(str(DATA / "bert-mlm-asg-v1.expected.safetensors"))
    written = json.loads((DATA / "bert-mlm-asg-v1.json").read_text())
    assert written["format_version"] == 1
    plan = asg.read_plan(DATA / "bert-mlm-asg-v1")
    assert (plan["config"]["k"], plan["config"]["m"], plan["config"]["codebook"]) == (16, 8, "separate")
    assert plan["tables"]["output"]["tied"] is True
    results = []
    for model in (asg.from_pretrained(DATA / "bert-mlm-asg-v1"),
                  tf.AutoModelForMaskedLM.from_pretrained(DATA / "bert-mlm-asg-v1")):
        with torch.no_grad():
            results.append(model(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"]).logits)
        # The reference logits were computed on the development machine: another CPU (or SIMD path) sums the
        # float32 matmuls in another order and differs in the last bits (9e-8 seen on an AMD EPYC). 1e-5 is
        # a hundred times that, and far below what a misread table gives (differences of order 1).
        torch.testing.assert_close(results[-1], expected["logits"], rtol=1e-5, atol=1e-5)
    assert torch.equal(results[0], results[1])  # the two loaders, in one process: bit-identical


TWO_RANKS = """
import json, sys, torch, transformers
import torch.distributed as dist
from asg.tasks import FinetuneRuntime, FinetuneSettings, finetune

class Dump(transformers.TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        table = model.get_input_embeddings()
        torch.save({"codebooks": table.codebooks.detach().cpu(), "codes": table.codes.cpu(),
                    "world": dist.get_world_size()}, sys.argv[2] + f"/rank{dist.get_rank()}.pt")

finetune(FinetuneSettings(task="nli", model=sys.argv[1], output=sys.argv[2] + "/run", train_files=[sys.argv[3]],
                          eval_files=[sys.argv[3]], max_steps=6, batch_size=8, max_length=32, learning_rate=1e-2),
         FinetuneRuntime(progress=False, callbacks=[Dump()]))
if dist.is_initialized():  # end the gloo threads before exit: left running, a loaded machine aborts at exit
    dist.barrier()
    dist.destroy_process_group()
"""


def test_finetune_under_torchrun_keeps_codebooks_identical_on_both_ranks(tmp_path):
    source = write_bert_folder(tmp_path / "dense", WORDS)
    model = tf.BertModel.from_pretrained(source)
    asg.compress(model, asg.ASGConfig(k=16, m=8), progress=False)
    asg.save_pretrained(model, tmp_path / "asg", tokenizer=tf.AutoTokenizer.from_pretrained(source))
    rows = [{"premise": "the cat sat", "hypothesis": f"the {w}", "label": w in ("good", "cat")} for w in WORDS] * 4
    data = tmp_path / "nli.jsonl"
    data.write_text("".join(json.dumps({**row, "label": str(row["label"])}) + "\n" for row in rows))
    (tmp_path / "two_ranks.py").write_text(TWO_RANKS)
    with socket.socket() as probe:  # a free port: two test runs on one machine must not meet on torchrun's default
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                           str(tmp_path / "two_ranks.py"), str(tmp_path / "asg"), str(tmp_path), str(data)],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert torch.equal(ranks[0]["codebooks"], ranks[1]["codebooks"])
    assert torch.equal(ranks[0]["codes"], ranks[1]["codes"])
    start = asg.from_pretrained(tmp_path / "asg").get_input_embeddings()
    assert not torch.equal(ranks[0]["codebooks"], start.codebooks)  # they trained, together
    assert torch.equal(ranks[0]["codes"], start.codes)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["train"]["steps"] == 6


# --- sentence-transformers ---------------------------------------------------------------------------


def write_sentence_transformers_folder(folder: Path, pooling: dict, dense: bool = True, pooled: int = 32) -> Path:
    """A tiny BERT laid out as a sentence-transformers model: pooling (to `pooled` features), a dense layer and
    normalisation."""
    from safetensors.torch import save_file

    write_bert_folder(folder, WORDS)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling}))
    if dense:
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
        (folder / "2_Dense").mkdir()
        (folder / "2_Dense" / "config.json").write_text(json.dumps(
            {"in_features": pooled, "out_features": 8, "bias": True, "activation_function": "torch.nn.modules.activation.Tanh"}))
        torch.manual_seed(5)
        save_file({"linear.weight": torch.randn(8, pooled), "linear.bias": torch.randn(8)},
                  str(folder / "2_Dense" / "model.safetensors"))
    modules.append({"idx": len(modules), "name": str(len(modules)), "path": f"{len(modules)}_Normalize",
                    "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "query: ", "document": ""}, "default_prompt_name": None, "similarity_fn_name": "cosine"}))
    return folder


@pytest.mark.parametrize("pooling, pooled", [({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, 32),
                                             ({"pooling_mode": ["max", "mean"]}, 64)])
def test_sentence_transformers_pipeline_is_carried_and_used(pooling, pooled, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    source = write_sentence_transformers_folder(tmp_path / "st", pooling, pooled=pooled)
    model = tf.AutoModel.from_pretrained(source)
    tokenizer = tf.AutoTokenizer.from_pretrained(source)
    reference = tf.AutoModel.from_pretrained(source)
    asg.compress(model, asg.ASGConfig(k=16, m=8), progress=False)
    asg.save_pretrained(model, tmp_path / "out", tokenizer=tokenizer)
    for name in ("modules.json", "1_Pooling/config.json", "2_Dense/model.safetensors", "sentence_bert_config.json",
                 "config_sentence_transformers.json"):
        assert (tmp_path / "out" / name).read_bytes() == (source / name).read_bytes(), name
    card = (tmp_path / "out" / "README.md").read_text()
    assert '"sentence-transformers"' in card and 'SentenceTransformer("path/to/this/folder")' in card
    texts = ["the cat sat on the mat", "father and mother", "good dog ran to rome", "bad"]
    loaded = st.SentenceTransformer(str(tmp_path / "out"), device="cpu")
    assert loaded.prompts["query"] == "query: "
    assert any(isinstance(m, asg.ASGEmbedding) for m in loaded.modules())  # the compressed model, not a dense one
    ours = asg.sentence.pipeline(tmp_path / "out")
    assert ours.skipped == [] and ours.steps[-1] == "normalize" and ours.steps[1] == "dense layer 2_Dense"
    with torch.no_grad():
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        expected = ours.embed(model(**enc).last_hidden_state, enc["attention_mask"])
    encoded = loaded.encode(texts, convert_to_tensor=True)
    assert encoded.shape == (4, 8)
    assert torch.allclose(encoded, expected, atol=1e-5)  # asg's reading of the pipeline is sentence-transformers' own
    row = asg.measure_fidelity(model, reference, tokenizer, texts)
    assert row["sentence_embedding"].startswith("pooling: ") and "dense layer 2_Dense" in row["sentence_embedding"]
    dense_ref = st.SentenceTransformer(str(source), device="cpu").encode(texts, convert_to_tensor=True)
    cosines = torch.nn.functional.cosine_similarity(encoded, dense_ref)
    assert row["mean_cosine"] == pytest.approx(cosines.mean().item(), abs=1e-5)


def test_task_models_and_damaged_pipelines_are_not_carried(tmp_path, caplog):
    source = write_sentence_transformers_folder(tmp_path / "st", {"pooling_mode_mean_tokens": True}, dense=False)
    classifier = tf.AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
    asg.compress(classifier, asg.ASGConfig(k=16, m=8), progress=False)
    asg.save_pretrained(classifier, tmp_path / "classifier")
    assert not (tmp_path / "classifier" / "modules.json").exists()  # a task model is not a sentence encoder
    modules = json.loads((source / "modules.json").read_text())
    modules[1]["path"] = "../../outside"
    (source / "modules.json").write_text(json.dumps(modules))
    model = tf.AutoModel.from_pretrained(source)
    asg.compress(model, asg.ASGConfig(k=16, m=8), progress=False)
    asg.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out" / "modules.json").exists()
    assert "must be a folder inside the model folder" in caplog.text
    assert asg.sentence.pipeline(None).steps == ["mean pooling"]
    modules[1]["path"] = "1_Pooling"
    modules.insert(2, {"idx": 9, "name": "9", "path": "", "type": "sentence_transformers.models.LayerNorm"})
    (source / "modules.json").write_text(json.dumps(modules))
    unknown = asg.sentence.pipeline(source)
    assert unknown.steps == ["pooling: mean_tokens"] and unknown.skipped[0].endswith("LayerNorm")
    assert unknown.describe() == ("pooling: mean_tokens (left out, not read by asg: sentence_transformers.models.LayerNorm, "
                                  "sentence_transformers.models.Normalize)")


# --- peft --------------------------------------------------------------------------------------------


def lora_train(peft_model, batches, steps=20):
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    losses = []
    for step in range(steps):
        loss = peft_model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    peft_model.eval()
    return losses


@pytest.mark.parametrize("arch", ["bert-classifier", "gpt2"])
def test_lora_on_a_compressed_model_trains_saves_reloads_and_merges(arch, tmp_path):
    peft = pytest.importorskip("peft")
    from asg.adapters import retie

    torch.manual_seed(0)
    model = make_bert_classifier() if arch == "bert-classifier" else build(arch)
    asg.compress(model, asg.ASGConfig(k=16, m=8), progress=False)
    asg.save_pretrained(model, tmp_path / "base")
    g = torch.Generator().manual_seed(0)
    if arch == "gpt2":  # LoRA on attention, the codebooks of the tied table as a trainable extra
        ids = torch.randint(5, 13, (4, 16, 12), generator=g)  # text of 8 of the 211 tokens: learnable
        config = dict(target_modules=["c_attn"], modules_to_save=["wte"], task_type="CAUSAL_LM")
        batches = [{"input_ids": x, "labels": x} for x in ids]
    else:  # ... and the classifier head, untied
        ids = torch.randint(5, VOCAB, (4, 16, 12), generator=g)
        config = dict(target_modules=["query", "value"], modules_to_save=["word_embeddings", "classifier"], task_type="SEQ_CLS")
        batches = [{"input_ids": x, "labels": x[:, 0] % 3} for x in ids]
    base = asg.from_pretrained(tmp_path / "base")
    table = base.get_input_embeddings()
    codes, codebooks = table.codes.clone(), table.codebooks.detach().clone()
    frozen = {name: p.detach().clone() for name, p in base.named_parameters() if "embeddings" not in name and "wte" not in name}
    tuned = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, **config))
    assert retie(tuned) == (1 if arch == "gpt2" else 0)  # the tied head now reads the copy that trains
    trainable = [name for name, p in tuned.named_parameters() if p.requires_grad]
    assert any("codebooks" in name for name in trainable) and not any("codes" in name.split(".")[-1] for name in trainable)
    losses = lora_train(tuned, batches, steps=60)
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4])  # the same four batches, before and after
    active = next(m for m in tuned.modules() if isinstance(m, asg.ASGEmbedding) and m.codebooks.requires_grad)
    assert torch.equal(active.codes, codes) and not torch.equal(active.codebooks.detach(), codebooks)
    assert torch.equal(table.codebooks, codebooks)  # the original table is untouched
    if arch == "gpt2":
        assert tuned.base_model.model.lm_head.embedding is active
    for name, p in tuned.base_model.model.named_parameters():
        key = name.replace(".base_layer", "")
        if key in frozen:
            assert torch.equal(p, frozen[key]), name  # LoRA leaves the base weights as they were
    tuned.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = tuned(input_ids=ids[0]).logits
    reloaded = peft.PeftModel.from_pretrained(asg.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert retie(reloaded) == (1 if arch == "gpt2" else 0)
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids[0]).logits, expected)
    merged = reloaded.merge_and_unload()
    assert isinstance(merged.get_input_embeddings(), asg.ASGEmbedding)
    if arch == "gpt2":
        assert merged.lm_head.embedding is merged.get_input_embeddings()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids[0]).logits, expected, atol=1e-5)  # LoRA folded into the weights
    asg.save_pretrained(merged, tmp_path / "merged")
    again = asg.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids[0]).logits, expected, atol=1e-5)
    assert torch.equal(again.get_input_embeddings().codes, codes)
