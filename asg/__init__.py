"""asg: Aggregate Semantic Grouping — compress a transformer's token tables into shared concept vectors.

    import asg
    report = asg.compress(model, asg.ASGConfig(k=1024, m=48))   # in place
    asg.save_pretrained(model, "model-asg")
    model = asg.from_pretrained("model-asg")
"""

from ._version import __version__

try:
    from . import adapters, baselines, hf, pq, sentence
    from .calibration import calibrate
    from .checkpoint import from_pretrained, read_plan, save_pretrained
    from .config import ASGConfig
    from .modules import ASGEmbedding, ASGHead
    from .report import CompressionReport
    from .fidelity import fidelity as measure_fidelity
    from .loading import load_model, load_tokenizer
    from .surgery import asg_modules, compress, is_compressed
except KeyboardInterrupt:
    from ._interrupt import exit_if_command

    exit_if_command()  # Ctrl-C while `asg` is still importing torch: a message and exit code 130, not a traceback
    raise

__all__ = [
    "ASGConfig",
    "ASGEmbedding",
    "ASGHead",
    "CompressionReport",
    "adapters",
    "asg_modules",
    "baselines",
    "calibrate",
    "measure_fidelity",
    "compress",
    "from_pretrained",
    "is_compressed",
    "load_model",
    "load_tokenizer",
    "pq",
    "read_plan",
    "save_pretrained",
    "sentence",
]
