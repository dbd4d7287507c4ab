"""Every ```python block of the README and of docs/*.md runs as written.

The blocks of one file run in order in one namespace (as a reader pastes them into one session), in a fresh
working directory. The folders the text tells the reader to fetch are provided as tiny stand-ins: "mamba-130m-hf"
(a 2-layer transformers-format Mamba with a word-level tokenizer.json); distributed blocks run as rank 0 of a
world of 1 (the environment torchrun would set).
"""
from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(first line number, code) of each ```python block of a Markdown file."""
    text = path.read_text()
    return [(text[:m.start()].count("\n") + 2, m.group(1)) for m in BLOCK.finditer(text)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_hf_checkpoint(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from mambakit import MambaConfig, MambaLMHeadModel
    from mambakit.models.pretrained import save_pretrained

    torch.manual_seed(0)
    words = ["[UNK]", "Mamba", "is", "a", "snake", "model", "fast", "state", "space"]
    model = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=64, ssm_cfg={"d_state": 8}))
    save_pretrained(model, folder, format="hf")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))


def test_the_docs_have_python_blocks():
    assert len(python_blocks(ROOT / "README.md")) >= 5


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.name)
def test_python_blocks_run(path, tmp_path, monkeypatch):
    blocks = python_blocks(path)
    if not blocks:
        pytest.skip(f"{path.name} has no python block")
    monkeypatch.chdir(tmp_path)
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                        "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    if any("mamba-130m-hf" in code for _, code in blocks):
        _tiny_hf_checkpoint(tmp_path / "mamba-130m-hf")
    namespace: dict = {"__name__": "__docs__"}
    try:
        for line, code in blocks:
            try:
                exec(compile(code, f"{path.name}:{line}", "exec"), namespace)
            except Exception as exc:
                raise AssertionError(f"{path.name} block at line {line} fails: {type(exc).__name__}: {exc}") from exc
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def test_the_readmes_train_examples_each_write_their_own_folder():
    """Issue 25: running the README's commands one after the other must not replace an earlier run: every `mambakit
    train` example that starts a run names an --out of its own (the bare first command uses runs/mamba); only
    --resume (and --init-from's source) may name an existing one."""
    text = (ROOT / "README.md").read_text()
    commands = [line.split("#")[0] for block in re.findall(r"```bash\n(.*?)```", text, re.S)
                for line in block.splitlines() if re.search(r"\bmambakit train\b", line)]
    assert len(commands) >= 4
    outs = []
    for cmd in commands:
        if "--resume" in cmd or "--help" in cmd:
            continue
        found = re.search(r"--out\s+(\S+)", cmd)
        outs.append(found.group(1) if found else "runs/mamba")
    assert len(outs) >= 4 and len(set(outs)) == len(outs), outs


def _command_lines() -> list[tuple[str, list[str]]]:
    """(where, the arguments after `mambakit`) of every mambakit command in the ```bash blocks of the docs."""
    import shlex

    found = []
    for path in DOC_FILES:
        for block in re.findall(r"^```bash\n(.*?)^```", path.read_text(), re.S | re.M):
            for line in block.splitlines():
                for part in line.split("&&"):
                    words = shlex.split(part.replace("[", "").replace("]", ""), comments=True)
                    if "mambakit" in words:
                        found.append((f"{path.name}: {line.strip()}", words[words.index("mambakit") + 1:]))
    return found


def test_every_documented_command_parses(capsys):
    """Issue 25: the shell commands of README.md and docs/ use only options that exist, with valid values (parsed by
    the real parser; nothing is run)."""
    from mambakit.cli.main import build_parser

    lines = _command_lines()
    assert len(lines) >= 20 and {argv[0] for _, argv in lines} >= {"train", "generate", "explain", "info", "tasks"}
    for where, argv in lines:
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            assert exc.code == 0, f"{where}: {capsys.readouterr().err.strip()}"
        capsys.readouterr()
