"""The state-tracking tasks: parity and modular arithmetic (with and without brackets). Labels recomputed from the
tokens by plain Python (a separate evaluator: recursive descent), exact lengths, seeding, the
final/running targets, bad arguments, and a 5-step run of each task through `run_task` and the ``tasks`` command."""
from __future__ import annotations

import json

import pytest
import torch

from mambakit.cli.tasks import tasks_main
from mambakit.errors import MambaKitError
from mambakit.tasks.generators import make_batch, task_vocab_size
from mambakit.tasks.runner import run_task
from mambakit.tasks.state_tracking import (
    ARITH_VOCAB,
    IGNORE,
    PARITY_VOCAB,
    evaluate_tokens,
    signed_sums,
    modular_arithmetic,
    parity,
)

SYMBOL = {v: k for k, v in ARITH_VOCAB.items() if k not in ("vocab_size",)}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _python_value(symbols: list[str], order: str = "left") -> int:
    """precedence: Python's own evaluation of the integer expression (``*`` before ``+ -``), mod 5; left: recursive
    descent (E -> T (op T)*, T -> digit | ( E )), left to right, each operation by Python, mod 5."""
    def expression(i: int) -> tuple[int, int]:
        value, i = term(i)
        while i < len(symbols) and symbols[i] in "+-*":
            right, j = term(i + 1)
            value, i = eval(f"({value}) {symbols[i]} ({right})") % 5, j  # noqa: S307 (two ints and an operator)
        return value, i

    def term(i: int) -> tuple[int, int]:
        if symbols[i] == "(":
            value, i = expression(i + 1)
            assert symbols[i] == ")"
            return value, i + 1
        return int(symbols[i]), i + 1

    if order == "precedence":
        return eval("".join(symbols)) % 5  # noqa: S307 (digits, + - * and brackets only)
    value, end = expression(0)
    assert end == len(symbols)
    return value


@pytest.mark.parametrize("supervision", ["final", "running"])
def test_parity_labels(supervision):
    ids, targets = parity(64, 23, gen(1), supervision)
    assert ids.shape == targets.shape == (64, 23)
    for row_ids, row_t in zip(ids.tolist(), targets.tolist()):
        assert row_ids[0] == PARITY_VOCAB["bos"] and set(row_ids[1:]) <= {0, 1}
        prefix = [sum(row_ids[1:i + 1]) % 2 for i in range(1, 23)]
        if supervision == "running":
            assert row_t == [IGNORE] + prefix
        else:
            assert row_t == [IGNORE] * 22 + [prefix[-1]]


def test_evaluate_tokens_by_hand():
    assert evaluate_tokens(list("3+4*2"), "left") == [3, None, 2, None, 4]
    assert evaluate_tokens(list("2-(1+4)*3"), "left") == [2, None, None, None, None, None, 2, None, 1]
    assert evaluate_tokens(list("((4))"), "left") == [None, None, None, None, 4]
    assert evaluate_tokens(list("3+4*2")) == [3, None, 2, None, 1]  # 3 + 8
    assert evaluate_tokens(list("2-3*4+1")) == [2, None, 4, None, 0, None, 1]  # 2 - 12 + 1 = -9
    assert evaluate_tokens(list("2-(1+4)*3")) == [2, None, None, None, None, None, 2, None, 2]
    assert evaluate_tokens(list("4*(2-3*1)")) == [4, None, None, None, None, None, None, None, 1]
    with pytest.raises(MambaKitError, match="order must be one of"):
        evaluate_tokens(list("1+2"), "right")


@pytest.mark.parametrize("order", ["precedence", "left"])
@pytest.mark.parametrize("brackets", [False, True])
@pytest.mark.parametrize("seq_len", [3, 4, 41, 64])
def test_modular_arithmetic_labels(brackets, seq_len, order):
    """Without brackets, and with the chain form of brackets (E op T, + - *)."""
    ids, targets = modular_arithmetic(40, seq_len, gen(seq_len), brackets, "running", order, "chain")
    _, final = modular_arithmetic(40, seq_len, gen(seq_len), brackets, "final", order, "chain")
    assert ids.shape == targets.shape == (40, seq_len)
    saw_bracket = False
    for row_ids, row_t, row_f in zip(ids.tolist(), targets.tolist(), final.tolist()):
        start = 1 if seq_len % 2 else 2
        assert row_ids[0] == ARITH_VOCAB["bos"] and row_ids[-1] == ARITH_VOCAB["="]
        assert row_ids[1:start] == [ARITH_VOCAB["pad"]] * (start - 1)
        symbols = [str(t) if t < 5 else SYMBOL[t] for t in row_ids[start:-1]]
        assert len(symbols) % 2 == 1 and symbols[0] in "01234("
        saw_bracket |= "(" in symbols
        assert brackets or "(" not in symbols
        value = _python_value(symbols, order)
        assert row_f == [IGNORE] * (seq_len - 1) + [value] and row_t[-1] == value
        depth = 0
        for i, s in enumerate(symbols):  # running targets: after each operand at depth 0, the value so far
            depth += (s == "(") - (s == ")")
            ends_operand = depth == 0 and (s.isdigit() or s == ")")
            expected = _python_value(symbols[:i + 1], order) if ends_operand else IGNORE
            assert row_t[start + i] == expected, (symbols, i)
    assert saw_bracket or not brackets or seq_len < 5


@pytest.mark.parametrize("seq_len", [3, 4, 6, 41, 64])
def test_nested_brackets_labels(seq_len):
    """Deletang et al.'s form: + - and unary minus only, every operation in brackets, no PAD at any length; the final
    answer is Python's value of the expression, a running answer that of the expression with every later digit 0."""
    ids, targets = modular_arithmetic(40, seq_len, gen(seq_len), True, "running")
    _, final = modular_arithmetic(40, seq_len, gen(seq_len), True, "final", "left", "nested")
    assert ids.shape == targets.shape == (40, seq_len)
    for row_ids, row_t, row_f in zip(ids.tolist(), targets.tolist(), final.tolist()):
        assert row_ids[0] == ARITH_VOCAB["bos"] and row_ids[-1] == ARITH_VOCAB["="]
        symbols = [str(t) if t < 5 else SYMBOL[t] for t in row_ids[1:-1]]
        assert set(symbols) <= set("01234+-()") and symbols.count("(") == symbols.count(")")
        assert (symbols[0], symbols[-1]) == ("(", ")") or seq_len < 5
        value = eval("".join(symbols)) % 5  # noqa: S307 (digits, + -, brackets)
        assert row_f == [IGNORE] * (seq_len - 1) + [value] and row_t[-1] == value
        for i, s in enumerate(symbols):
            later_zero = symbols[:i + 1] + ["0" if c.isdigit() else c for c in symbols[i + 1:]]
            expected = eval("".join(later_zero)) % 5 if s.isdigit() else IGNORE  # noqa: S307
            assert row_t[1 + i] == expected, (symbols, i)
    assert signed_sums(list("(2-(2--2))")) == [None, 2, None, None, 0, None, None, 3, None, None]
    with pytest.raises(MambaKitError, match=r"\+ - expressions only"):
        signed_sums(list("2*3"))


def test_the_two_orders_differ_only_in_the_answers():
    """The same seed gives the same expressions in both orders; the answers differ where a * follows a + or -."""
    a, b = modular_arithmetic(64, 41, gen(5), order="precedence"), modular_arithmetic(64, 41, gen(5), order="left")
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1][:, -1], b[1][:, -1])


def test_seeded_and_in_vocabulary():
    for name, kw in (("parity", {}), ("modular-arithmetic", {"brackets": True})):
        a, b = make_batch(name, 3, 30, gen(2), **kw), make_batch(name, 3, 30, gen(2), **kw)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[0], make_batch(name, 3, 30, gen(3), **kw)[0])
        assert int(a[0].max()) < task_vocab_size(name)


def test_bad_arguments():
    with pytest.raises(MambaKitError, match="seq_len"):
        parity(2, 1, gen())
    with pytest.raises(MambaKitError, match="supervision"):
        modular_arithmetic(2, 10, gen(), supervision="dense")
    with pytest.raises(MambaKitError, match="--brackets"):
        run_task("parity", "mamba3", brackets=True, steps=1)
    with pytest.raises(MambaKitError, match="order must be one of"):
        modular_arithmetic(2, 10, gen(), order="right")
    with pytest.raises(MambaKitError, match="--order must be one of"):
        run_task("modular-arithmetic", "mamba3", order="right", steps=1)
    with pytest.raises(MambaKitError, match="--order applies to modular-arithmetic only"):
        run_task("parity", "mamba3", order="left", steps=1)
    with pytest.raises(MambaKitError, match="bracket_form must be one of"):
        modular_arithmetic(2, 10, gen(), brackets=True, bracket_form="flat")
    with pytest.raises(MambaKitError, match="--bracket-form must be one of"):
        run_task("modular-arithmetic", "mamba3", brackets=True, bracket_form="flat", steps=1)
    with pytest.raises(MambaKitError, match="--bracket-form applies to modular-arithmetic only"):
        run_task("parity", "mamba3", bracket_form="chain", steps=1)
    with pytest.raises(MambaKitError, match="--vocab of parity is fixed"):
        run_task("parity", "mamba3", vocab=4, steps=1)


TINY = dict(steps=5, batch=4, d_model=16, n_layer=1, d_state=8, seq_len=12, eval_samples=4, eval_lengths=[16],
            min_long_eval_samples=2, threads=1, progress=False, log=lambda msg: None)


@pytest.mark.parametrize("name, extra", [("parity", {}), ("modular-arithmetic", {}),
                                         ("modular-arithmetic", {"brackets": True, "supervision": "final"}),
                                         ("modular-arithmetic", {"order": "left"}),
                                         ("modular-arithmetic", {"brackets": True, "bracket_form": "chain"})])
def test_five_step_run(name, extra, tmp_path):
    r = run_task(name, "mamba3", out=tmp_path, **{**TINY, **extra})
    label = name + ("-brackets" if extra.get("brackets") else "")
    assert r["task"] == label and r["steps_run"] == 5 and set(r["eval_lengths"]) == {"16"}
    assert 0 <= r["eval_lengths"]["16"]["accuracy"] <= 1
    saved = json.loads((tmp_path / f"{label}_mamba3.json").read_text())
    assert saved["config"]["supervision"] == extra.get("supervision", "running")
    if name == "modular-arithmetic":
        assert saved["config"]["order"] == extra.get("order", "precedence")
        assert saved["config"]["bracket_form"] == extra.get("bracket_form", "nested")
    else:
        assert "order" not in saved["config"] and "bracket_form" not in saved["config"]


def test_cli_runs_both_mixers_and_prints_the_table(tmp_path, capsys):
    argv = ["parity", "--mixer", "mamba2", "mamba3", "--steps", "5", "--batch-size", "4", "--d-model", "16",
            "--n-layer", "1", "--d-state", "8", "--seq-len", "10", "--eval-samples", "4", "--eval-lengths", "20",
            "--threads", "1", "--out", str(tmp_path), "--no-progress"]
    assert tasks_main(argv) == 0
    text = capsys.readouterr().out
    assert "mamba2" in text and "mamba3" in text and "at length       20" in text
    table = json.loads((tmp_path / "parity_sweep.json").read_text())
    assert [row["mixer"] for row in table] == ["mamba2", "mamba3"] and set(table[0]["eval_lengths"]) == {"20"}
    assert (tmp_path / "parity_lengths.png").exists()


def test_arithmetic_defaults_heads_and_initial_step():
    """modular-arithmetic defaults to heads of 8 and an initial step in [0.1, 1] for every SSM mixer (the same for
    Mamba-2 and Mamba-3); the other tasks keep the mixers' own; --dt-init and --headdim override them."""
    from mambakit.tasks.config import TaskConfig, resolve_task_config

    cfg = resolve_task_config(TaskConfig("modular-arithmetic", "mamba3"))
    assert cfg.headdim == 8 and cfg.dt_init == (0.1, 1.0) and cfg.order == "precedence" and cfg.steps == 1600
    assert cfg.bracket_form == "nested"
    cfg = resolve_task_config(TaskConfig("parity", "mamba3"))
    assert cfg.headdim is None and cfg.dt_init is None and cfg.order is None and cfg.bracket_form is None
    assert (cfg.steps, cfg.n_layer, cfg.seq_len) == (800, 1, 40)  # parity keeps its defaults
    tiny = {**TINY, "d_model": 32, "eval_lengths": []}
    for mixer in ("mamba2", "mamba3"):
        r = run_task("modular-arithmetic", mixer, **tiny)
        ssm = r["config"]["model_config"]["ssm_cfg"]
        assert (ssm["headdim"], ssm["dt_min"], ssm["dt_max"]) == (8, 0.1, 1.0)
        assert r["config"]["dt_init"] == [0.1, 1.0]
    r = run_task("modular-arithmetic", "mamba3", dt_init=[0.2, 0.5], headdim=32, **tiny)
    ssm = r["config"]["model_config"]["ssm_cfg"]
    assert (ssm["headdim"], ssm["dt_min"], ssm["dt_max"]) == (32, 0.2, 0.5)
    assert "dt_min" not in run_task("parity", "mamba3", **tiny)["config"]["model_config"]["ssm_cfg"]


def test_initial_step_lies_in_the_dt_init_range():
    """The Mamba-3 layers built for --dt-init 0.1 1.0 start with softplus(dt_bias) inside [0.1, 1.0]."""
    from mambakit.models.lm import MambaLMHeadModel
    from mambakit.tasks.config import build_model_config

    config = build_model_config("mamba3", 13, 32, 2, 8, 16)
    config.ssm_cfg.update(dt_min=0.1, dt_max=1.0)
    torch.manual_seed(3)
    model = MambaLMHeadModel(config)
    steps = [torch.nn.functional.softplus(p.detach()) for n, p in model.named_parameters() if n.endswith("dt_bias")]
    assert len(steps) == 2 and all(s.numel() == 4 for s in steps)
    assert all(bool(((s >= 0.1 - 1e-6) & (s <= 1.0 + 1e-6)).all()) for s in steps)


@pytest.mark.parametrize("bad", [(1.0, 0.1), (0.0, 1.0), (0.1,), (0.1, float("nan")), "0.1 1"])
def test_bad_dt_init_names_the_flag(bad):
    with pytest.raises(MambaKitError, match="--dt-init must be two positive numbers"):
        run_task("modular-arithmetic", "mamba3", dt_init=bad, **TINY)


def test_cli_dt_init_and_headdim_reach_the_model(tmp_path):
    argv = ["modular-arithmetic", "--mixer", "mamba3", "--steps", "2", "--batch-size", "4", "--d-model", "16",
            "--n-layer", "1", "--d-state", "8", "--seq-len", "9", "--eval-samples", "4", "--eval-lengths",
            "--headdim", "8", "--dt-init", "0.05", "0.5", "--threads", "1", "--out", str(tmp_path), "--no-progress",
            "--order", "left", "--brackets", "--bracket-form", "chain"]
    assert tasks_main(argv) == 0
    config = json.loads((tmp_path / "modular-arithmetic-brackets_mamba3.json").read_text())["config"]
    ssm = config["model_config"]["ssm_cfg"]
    assert (ssm["headdim"], ssm["dt_min"], ssm["dt_max"]) == (8, 0.05, 0.5)
    assert (config["order"], config["brackets"], config["bracket_form"]) == ("left", True, "chain")
    with pytest.raises(MambaKitError, match="--order"):
        tasks_main(argv[:-4] + ["right"])
    with pytest.raises(MambaKitError, match="--bracket-form"):
        tasks_main(argv[:-1] + ["flat"])
