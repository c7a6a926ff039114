"""Test settings: no hub access, quiet transformers, the datasets cache in a temporary folder."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="asg-test-datasets-"))
