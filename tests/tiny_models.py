"""Tiny random transformers models built from configs, one per architecture the core must handle."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 211  # prime, so it never coincides with a position table or a head size
HIDDEN = 32


def _bert_config(**extra):
    return tf.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, **extra)


def _t5_config(cls, tied: bool):
    config = cls(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    # transformers 5 ignores tie_word_embeddings as a T5Config keyword: set it afterwards.
    config.tie_word_embeddings = tied
    return config


def make_bert():
    return tf.BertForMaskedLM(_bert_config())


def make_bert_base():
    return tf.BertModel(_bert_config())


def make_bert_classifier():
    return tf.BertForSequenceClassification(_bert_config(num_labels=3))


def make_xlmr():
    return tf.XLMRobertaForMaskedLM(tf.XLMRobertaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=66, pad_token_id=1))


def make_t5():
    return tf.T5ForConditionalGeneration(_t5_config(tf.T5Config, tied=True))


def make_mt5():
    """Shaped like a real mT5 checkpoint: one input table shared by encoder and decoder, an untied head."""
    model = tf.MT5ForConditionalGeneration(_t5_config(tf.MT5Config, tied=False))
    model.set_input_embeddings(model.shared)  # built from a config, transformers 5 leaves three separate tables
    return model


def make_untied_t5_from_config():
    """What transformers 5 builds from an untied T5 config: separate shared/encoder/decoder tables."""
    return tf.T5ForConditionalGeneration(_t5_config(tf.T5Config, tied=False))


def make_gpt2():
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64,
                                            bos_token_id=0, eos_token_id=0, pad_token_id=0))


def make_llama():
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0))


def make_gemma3():
    return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=8,
        tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0))


#: name -> (factory, kind) where kind says how to call the model
ARCHITECTURES = {
    "bert": (make_bert, "encoder"),
    "bert-base": (make_bert_base, "encoder"),
    "xlmr": (make_xlmr, "encoder"),
    "t5": (make_t5, "seq2seq"),
    "mt5": (make_mt5, "seq2seq"),
    "gpt2": (make_gpt2, "decoder"),
    "llama": (make_llama, "decoder"),
    "gemma3": (make_gemma3, "decoder"),
}
TIED = {"bert", "xlmr", "t5", "gpt2", "gemma3"}
GENERATIVE = {"t5", "mt5", "gpt2", "llama", "gemma3"}


def build(name: str, seed: int = 0):
    """A tiny random model of architecture `name`, in eval mode, seeded."""
    torch.manual_seed(seed)
    return ARCHITECTURES[name][0]().eval()


def sample_inputs(name: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """Model inputs for architecture `name`: token ids from the whole vocabulary, with padding mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if ARCHITECTURES[name][1] == "seq2seq":
        inputs["decoder_input_ids"] = torch.randint(2, VOCAB, (2, 5), generator=gen)
    return inputs


def outputs(model, inputs) -> torch.Tensor:
    """The model's main output tensor: logits where it has a head, else the last hidden state."""
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def dense_twin(original, compressed, table_of):
    """The original model with each replaced dense table overwritten by `table_of(compressed table module)`."""
    import copy

    twin = copy.deepcopy(original)
    with torch.no_grad():
        for name, entry in compressed.config.asg["tables"].items():
            module = compressed.get_submodule(entry["locations"][0])
            table = table_of(module if name == "input" else module.embedding)
            for path in entry["locations"]:
                twin.get_submodule(path).weight.copy_(table)
    return twin


SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_bert_folder(folder, words, seed: int = 0, model_class=None):
    """A tiny random model and a WordPiece tokenizer of specials + `words` + fillers: a BERT of `model_class`
    (BertModel by default), or a GPT-2 when `model_class` is GPT2LMHeadModel."""
    import transformers as tf

    vocab = SPECIALS + [w for w in words if w not in SPECIALS]
    vocab += [f"w{i}" for i in range(VOCAB - len(vocab))]
    tokenizer = tf.BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    if model_class is tf.GPT2LMHeadModel:
        make_gpt2().save_pretrained(folder)
    else:
        (model_class or tf.BertModel)(_bert_config()).save_pretrained(folder)
    return folder


def write_t5_folder(folder, words, seed: int = 0, mt5: bool = False):
    """A tiny random T5 (tied), or with `mt5` an mT5 shaped like the real ones (untied head), with a
    word-level tokenizer over `words`, for text-to-text tasks."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = ["<pad>", "</s>", "<unk>"] + [w for w in words if w not in ("<pad>", "</s>", "<unk>")]
    vocab += [f"w{i}" for i in range(VOCAB - len(vocab))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import processors
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    (make_mt5() if mt5 else tf.T5ForConditionalGeneration(_t5_config(tf.T5Config, tied=True))).save_pretrained(folder)
    return folder
