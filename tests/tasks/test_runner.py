"""`mambakit.tasks.runner` and the ``tasks`` command: tiny trainings beat chance, chunked evaluation is exact,
results/plots are written, bad arguments raise MambaKitError naming the argument."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mambakit.errors import MambaKitError
from mambakit.models.lm import MambaLMHeadModel
from mambakit.tasks.generators import make_batch, task_vocab_size
from mambakit.tasks.runner import MIXERS, build_model_config, count_correct, run_task

# tiny sizes (1 thread: much faster for models this small, above all on a CPU shared with other jobs)
TINY = dict(batch=16, d_model=16, n_layer=2, seq_len=12, lr=1e-2, eval_samples=64, eval_lengths=[], threads=1,
            progress=False, log=lambda msg: None)


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("name, mixer, steps, extra", [
    ("selective-copying", "mamba", 150, dict(n_tokens=3, vocab=4)),
    ("copying", "s4", 150, dict(n_tokens=3, vocab=4)),
    ("induction-heads", "mamba", 300, dict(vocab=4)),
    ("mqar", "mamba", 150, dict(n_pairs=2, vocab=8)),
])
def test_tiny_training_beats_chance(name, mixer, steps, extra):
    r = run_task(name, mixer, steps=steps, **{**TINY, **extra})
    assert r["steps_run"] == steps
    assert r["history"]["eval_step"][0] == 0 and r["history"]["eval_step"][-1] == steps
    assert r["accuracy"] >= r["chance"] + 0.15, (r["accuracy"], r["chance"])
    assert r["n_params"] > 0 and r["threads"] == 1


@pytest.mark.parametrize("mixer", ["mamba", "mamba2", "attention"])
def test_chunked_evaluation_matches_full(mixer):
    """Feeding the sequence chunk by chunk through the cache gives the same predictions as one forward pass."""
    torch.manual_seed(0)
    vocab_size = task_vocab_size("mqar", 16)
    model = MambaLMHeadModel(build_model_config(mixer, vocab_size, 16, 2, None)).eval()
    ids, targets = make_batch("mqar", 4, 40, torch.Generator().manual_seed(1), vocab=16, n_pairs=6)
    full = count_correct(model, ids, targets, vocab_size, mode="full")
    chunked = count_correct(model, ids, targets, vocab_size, mode="kv" if mixer == "attention" else "recurrent",
                            chunk=7)
    with torch.no_grad():
        pred = model(ids).logits[..., :vocab_size].argmax(-1)
    has = targets != -100
    assert full == chunked == (int(((pred == targets) & has).sum()), int(has.sum()))


def test_induction_length_eval_and_outputs(tmp_path):
    r = run_task("induction-heads", "attention", steps=3, out=tmp_path, vocab=4,
                 **{**TINY, "eval_lengths": [12, 40, 100]}, eval_chunk=16, max_attention_len=64)
    assert set(r["eval_lengths"]) == {"12", "40", "100"}
    assert r["eval_lengths"]["40"]["mode"] == "kv" and r["eval_lengths"]["40"]["accuracy"] is not None
    assert r["eval_lengths"]["100"]["accuracy"] is None and "max_attention_len" in r["eval_lengths"]["100"]["skipped"]
    assert Path(r["plot"]).stat().st_size > 0
    saved = json.loads(Path(r["json"]).read_text())
    assert saved["accuracy"] == r["accuracy"] and saved["config"]["seq_len"] == 12


def test_all_mixers_build_and_step():
    for mixer in MIXERS:
        r = run_task("mqar", mixer, steps=1, n_pairs=2, vocab=8, **TINY)
        assert 0.0 <= r["accuracy"] <= 1.0
        assert (r["config"]["d_state"] is None) == (mixer == "attention")


@pytest.mark.parametrize("kwargs, flag", [
    (dict(name="nope"), "NAME"),
    (dict(mixer="rnn"), "--mixer"),
    (dict(steps=0), "--steps"),
    (dict(lr=-1.0), "--lr"),
    (dict(d_model=0), "--d-model"),
    (dict(seq_len=10, n_pairs=4), "--seq-len"),
    (dict(eval_lengths=[1]), "--eval-lengths"),
    (dict(threads=0), "--threads"),
    (dict(device="tpu"), "tpu"),
])
def test_run_task_bad_arguments(kwargs, flag):
    call = dict(name="mqar", mixer="mamba", steps=1, batch=2, d_model=8, n_layer=1, seq_len=12, n_pairs=2, vocab=8,
                progress=False, log=lambda msg: None)
    call.update(kwargs)
    with pytest.raises(MambaKitError, match=flag):
        run_task(**call)


def test_task_defaults_are_consistent():
    """Every task's defaults (the sizes reported in benchmarks/RESULTS.md) make a valid batch of the task."""
    from mambakit.tasks.runner import TASK_DEFAULTS

    for name, d in TASK_DEFAULTS.items():
        ids, targets = make_batch(name, 2, d["seq_len"], torch.Generator().manual_seed(0), vocab=d["vocab"],
                                  n_tokens=d.get("n_tokens", 16), n_pairs=d.get("n_pairs", 8))
        assert ids.shape == targets.shape == (2, d["seq_len"])
        assert int(ids.max()) < task_vocab_size(name, d["vocab"]) and bool((targets != -100).any())


def test_task_config_defaults_and_spellings():
    """run_task's options are a TaskConfig: None takes the task's default; any registry spelling of a mixer works."""
    from mambakit.tasks.config import TASK_DEFAULTS, TaskConfig, resolve_task_config

    cfg = resolve_task_config(TaskConfig("copying", "mamba2", d_model=16))
    d = TASK_DEFAULTS["copying"]
    assert (cfg.steps, cfg.batch, cfg.lr, cfg.d_model, cfg.n_tokens) == (d["steps"], d["batch"], d["lr"], 16,
                                                                         d["n_tokens"])
    assert cfg.eval_lengths == [] and cfg.n_pairs == 8 and cfg.d_state is None and cfg.warmup is None
    with pytest.raises(TypeError):
        run_task("mqar", "mamba", colour="red")
    r = run_task("mqar", "mamba1", steps=1, n_pairs=2, vocab=8, **TINY)
    assert r["mixer"] == "mamba1" and r["config"]["d_state"] == 16
    assert r["config"]["model_config"]["ssm_cfg"]["layer"] == "Mamba1"


def test_threads_set_for_the_run_and_restored():
    torch.set_num_threads(2)
    seen = run_task("mqar", "mamba", steps=1, n_pairs=2, vocab=8, **{**TINY, "threads": 1})["threads"]
    assert seen == 1 and torch.get_num_threads() == 2
    untouched = run_task("mqar", "mamba", steps=1, n_pairs=2, vocab=8, **{**TINY, "threads": None})["threads"]
    assert untouched == 2 and torch.get_num_threads() == 2
