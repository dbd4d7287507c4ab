"""GraphedDecoder with its CUDA graph replaced by eager runs of the very step it would capture, for the CPU tests of
everything around the graph (token buffers, shared caches, seqlen_offset, the compat graph cache)."""
from __future__ import annotations

import torch

from mambakit.compat.mamba_ssm.utils import generation
from mambakit.models import cuda_graph
from mambakit.models.cuda_graph import GraphedDecoder


class EagerDecoder(GraphedDecoder):
    """`_capture`: the warm-up runs and one more (what the graph records); `_replay`: that run again, into the same
    output buffer (what a replay does, leaving cache.seqlen_offset to `decode_tokens`). `made` and `replays` count
    the decoders built and the replays."""

    made = replays = 0

    def __init__(self, *args, **kwargs):
        EagerDecoder.made += 1
        super().__init__(*args, **kwargs)

    def _capture(self, warmup: int) -> torch.Tensor:
        for _ in range(warmup):
            self._run()
        return self._run()

    def _replay(self) -> None:
        EagerDecoder.replays += 1
        offset = self.cache.seqlen_offset  # a replay runs no Python: the model's own count is not advanced
        self.logits.copy_(self._run())
        self.cache.seqlen_offset = offset


def use_eager_graphs(monkeypatch) -> None:
    """CPU models pass check_graphable, and the compat graph cache builds EagerDecoders."""
    cpu = lambda model, batch: torch.device("cpu")  # noqa: E731
    monkeypatch.setattr(cuda_graph, "check_graphable", cpu)
    monkeypatch.setattr(generation, "check_graphable", cpu)
    monkeypatch.setattr(generation, "GraphedDecoder", EagerDecoder)
    EagerDecoder.made = EagerDecoder.replays = 0
