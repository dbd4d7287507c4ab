"""Zamba2 and Falcon-H1 on CUDA (the Triton SSD, conv and norm kernels, SDPA): logits against transformers on the
CPU, chunked prefill and greedy decoding against the model's own forward, in fp32 and bf16. Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.gpu

from mambakit.models.io import from_pretrained  # noqa: E402
from tests.conftest import rel_err  # noqa: E402
from tests.models.test_pretrained import ids_for, is_hf_full_forward_greedy  # noqa: E402

transformers.logging.set_verbosity_error()


def _builders():
    from tests.models.io.test_falcon_h1 import hf_falcon_h1
    from tests.models.io.test_zamba2 import hf_zamba2

    return {"zamba2": lambda: hf_zamba2("rope-bias-gqa", chunk_size=16),
            "falcon_h1": lambda: hf_falcon_h1("gated-bias", mamba_chunk_size=16)}


@pytest.mark.parametrize("model_type", ["zamba2", "falcon_h1"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_cuda_matches_transformers(model_type, dtype, tol, tmp_path):
    ref = _builders()[model_type]()
    ref.save_pretrained(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf", device="cuda", dtype=dtype)
    ids = ids_for(ref.config.vocab_size, seqlen=77)  # several SSD chunks
    with torch.no_grad():
        want = ref(ids).logits
        got = model(ids.cuda()).logits.float().cpu()
        assert rel_err(got, want) <= tol
        cache = model.allocate_cache(2)
        parts = [model(ids[:, a:b].cuda(), cache=cache).logits for a, b in ((0, 30), (30, 31), (31, 77))]
        assert rel_err(torch.cat(parts, 1).float().cpu(), got) <= tol
    if dtype == torch.float32:
        prompt = ids[:1, :9]
        out = model.generate(prompt.cuda(), 12, temperature=0).cpu()
        assert is_hf_full_forward_greedy(ref, out, prompt.shape[1], ref.config.vocab_size)
