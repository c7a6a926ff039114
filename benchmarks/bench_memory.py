"""Peak memory while compressing and while loading, in units of the dense embedding table.

A thread samples the process's resident memory every 5 ms; each stage reports how far above its
starting point memory rose. The claim (issue 9): compressing and loading never hold more than two
dense copies of the table at once. Also: what one candidate copy of the model costs the --auto search
(its own tables, the layers shared), against a full copy, measured in the same run. Default model: Gemma 3 270M from its GGUF file (262,144 x 640
table), or any model folder / GGUF path given.

    python benchmarks/bench_memory.py [MODEL] [--k 1024 --m 80]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

from _common import model_or_gemma

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rss() -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmRSS"))


class Peak:
    """Highest resident memory seen while the `with` block runs, above where it started."""

    def __enter__(self):
        self.start = self.peak = rss()
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss())
        self.rise = self.peak - self.start


def new_bytes(copied, model) -> int:
    """Bytes of the tensors of `copied` that are not `model`'s."""
    theirs = {t.data_ptr() for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in (*copied.parameters(), *copied.buffers())
               if t.data_ptr() not in theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--m", type=int, default=80)
    args = parser.parse_args()

    import copy
    import gc

    import asg
    from asg.loading import load_model

    source = model_or_gemma(args.model)
    model = load_model(source).eval()
    table = model.get_input_embeddings().weight
    table_bytes = table.numel() * table.element_size()
    print(f"# Peak memory, {source.rsplit('/', 1)[-1]}: dense table {tuple(table.shape)} = {table_bytes / 2**20:.0f} MiB")
    del table
    costs = {}
    for name, make in (("copy.deepcopy", copy.deepcopy), ("copy_with_own_tables", asg.surgery.copy_with_own_tables)):
        with Peak() as peak:  # resident memory can rise by less: freed pages of the GGUF reading are reused
            twin = make(model)
        costs[name] = (new_bytes(twin, model), peak.rise)
        del twin
        gc.collect()
    (full, _), (own, _) = costs.values()
    print("- one candidate copy of the model, as --auto, compare and compress's fidelity reference make it: "
          + ", ".join(f"{name} {size / 2**20:.0f} MiB of new tensors (resident memory rose {rise / 2**20:.0f} MiB)"
                      for name, (size, rise) in costs.items()) + f"; {own / full:.2f}x")
    with Peak() as compressing:
        asg.compress(model, asg.ASGConfig(k=args.k, m=args.m), progress=False)
    gc.collect()
    print(f"- compressing (k={args.k}, m={args.m}): memory rose at most {compressing.rise / table_bytes:.2f} dense "
          f"tables above the loaded dense model")
    folder = tempfile.mkdtemp()
    asg.save_pretrained(model, folder)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    del model
    gc.collect()
    with Peak() as loading:
        loaded = asg.from_pretrained(folder)
    print(f"- loading the ASG folder: memory rose {loading.rise / 2**20:.0f} MiB for a model of {model_bytes / 2**20:.0f} MiB; "
          f"beyond the model itself, at most {max(0, loading.rise - model_bytes) / table_bytes:.2f} dense tables")
    del loaded


if __name__ == "__main__":
    main()
