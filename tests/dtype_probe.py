"""Record the dtype every adapted layer computes in, by phase (loss, evaluation, samples), during a real run.

In the test process: ``install(monkeypatch, records)`` and call `train_plora.cli`. Under torchrun:
``torchrun ... tests/dtype_probe.py OUT_PREFIX ARGS...`` runs the CLI with the probe on every rank and
writes OUT_PREFIX.rank<N>.json: {phase: [dtype names]}.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from pathlib import Path

from fastchat_plora import train_plora
from fastchat_plora.callback import SamplesCallback
from fastchat_plora.distributed import close_process_group
from fastchat_plora.plora import lora_layers

sampling = [False]  # set while SamplesCallback generates


def probe(records: dict):
    def hook(module, inputs, output):
        phase = "samples" if sampling[0] else ("loss" if module.training else "evaluation")
        records[phase].add(str(output.dtype).removeprefix("torch."))

    return hook


def install(patch, records: dict) -> None:
    """Hooks on every adapted layer's base and LoRA B outputs, put on as the run adapts its model."""
    adapt, sample = train_plora.adapt, SamplesCallback._sample

    def adapt_with_hooks(*args, **kwargs):
        model = adapt(*args, **kwargs)
        for _, layer in lora_layers(model):
            layer.get_base_layer().register_forward_hook(probe(records))
            layer.lora_B["default"].register_forward_hook(probe(records))
        return model

    def sample_flagged(self, *args, **kwargs):
        sampling[0] = True
        try:
            return sample(self, *args, **kwargs)
        finally:
            sampling[0] = False

    patch(train_plora, "adapt", adapt_with_hooks)
    patch(SamplesCallback, "_sample", sample_flagged)


if __name__ == "__main__":
    prefix, argv = sys.argv[1], sys.argv[2:]
    seen = defaultdict(set)
    install(setattr, seen)
    train_plora.main(*train_plora.parse_args(argv))
    rank = os.environ.get("RANK", "0")
    Path(f"{prefix}.rank{rank}.json").write_text(json.dumps({k: sorted(v) for k, v in seen.items()}))
    close_process_group()
