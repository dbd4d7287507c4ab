"""Issue 21, class 7: every subcommand, fed hostile values, fails with exit status 2 and one `error:` line on stderr,
never a traceback: oversized seeds and numbers, prompts that are not UTF-8, empty paths, broken config.json files,
optimizer states and trainer states of the wrong types on --resume, sizes no machine holds (refused before anything
is allocated), token and thread counts out of range."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mambakit.cli import main
from tests.cli.conftest import TINY, error_line

BIG = "18446744073709551616"  # 2**64


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "run"
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY]) == 0
    return out


def edit_json(name, change):
    def edit(ck: Path) -> None:
        data = json.loads((ck / name).read_text())
        change(data)
        (ck / name).write_text(json.dumps(data))
    return edit


def set_key(name, key, value):
    return edit_json(name, lambda d: d.__setitem__(key, value))


def set_arg(key, value):
    return edit_json("trainer_state.json", lambda d: d["args"].__setitem__(key, value))


def optimizer_of_other_groups(ck: Path) -> None:
    torch.save({"state": {}, "param_groups": [{"params": [0]}]}, ck / "optimizer.pt")


def optimizer_of_other_shapes(ck: Path) -> None:
    state = torch.load(ck / "optimizer.pt", weights_only=True)
    for entry in state["state"].values():
        entry["exp_avg"] = torch.zeros(3)
    torch.save(state, ck / "optimizer.pt")


# (name, arguments after the subcommand's checkpoint or out folder, edit of a copy of the checkpoint or None,
#  words the error line must contain)
RUN = "{run}"
CASES = [
    ("train seed 2**64", ["train", "--seed", BIG, "--data", "{corpus}", "--out", "{tmp}/a", *TINY], None, "--seed"),
    ("train empty data", ["train", "--data", "", "--out", "{tmp}/b", *TINY], None, "--data"),
    ("train lr nan", ["train", "--lr", "nan", "--data", "{corpus}", "--out", "{tmp}/c", *TINY], None, "--lr"),
    ("train steps 0", ["train", "--steps", "0", "--out", "{tmp}/d"], None, "--steps"),
    ("generate not utf-8", ["generate", "--checkpoint", RUN, "--prompt", "a\udcffb"], None, "UTF-8"),
    ("generate seed 2**64", ["generate", "--checkpoint", RUN, "--prompt", "ab", "--seed", BIG], None, "--seed"),
    ("generate top-p 2", ["generate", "--checkpoint", RUN, "--prompt", "ab", "--top-p", "2"], None, "--top-p"),
    ("explain not utf-8", ["explain", "--checkpoint", RUN, "--prompt", "\udcff", "--out", "{tmp}/e"], None, "UTF-8"),
    ("explain layer huge", ["explain", "--checkpoint", RUN, "--prompt", "ab", "--layer", BIG, "--out", "{tmp}/e"],
     None, "--layer"),
    ("ssm_cfg null", ["generate", "--checkpoint", RUN, "--prompt", "ab"], set_key("config.json", "ssm_cfg", None),
     "ssm_cfg"),
    ("norm_epsilon text", ["generate", "--checkpoint", RUN, "--prompt", "ab"],
     set_key("config.json", "norm_epsilon", "small"), "norm_epsilon"),
    ("norm_epsilon negative", ["explain", "--checkpoint", RUN, "--prompt", "ab", "--out", "{tmp}/e"],
     set_key("config.json", "norm_epsilon", -1e-5), "norm_epsilon"),
    ("d_model huge", ["generate", "--checkpoint", RUN, "--prompt", "ab"], set_key("config.json", "d_model", 10**7),
     "shape"),
    ("n_layer huge", ["generate", "--checkpoint", RUN, "--prompt", "ab"], set_key("config.json", "n_layer", 10**7),
     "n_layer"),
    ("optimizer groups", ["train", "--resume", "--out", RUN, "--steps", "6", "--data", "{corpus}", "--no-progress"],
     optimizer_of_other_groups, "optimizer state"),
    ("optimizer shapes", ["train", "--resume", "--out", RUN, "--steps", "6", "--data", "{corpus}", "--no-progress"],
     optimizer_of_other_shapes, "exp_avg has shape"),
]
for key, value, words in [("step", -5, "'step' must be >= 0"), ("step", "4", "integer 'step'"),
                          ("history", {"train": 5}, "history"), ("args", [1], "'args' must be"),
                          ("train_time_s", "x", "train_time_s"), ("tokens_seen", 1.5, "tokens_seen")]:
    CASES.append((f"trainer_state {key}={value!r}", ["train", "--resume", "--out", RUN, "--steps", "6", "--data",
                                                     "{corpus}", "--no-progress"],
                  set_key("trainer_state.json", key, value), words))
for key, value in [("lr", "x"), ("min_lr_ratio", "x"), ("data", 5), ("device", 5), ("sample_prompt", 5),
                   ("seed", 2**70)]:
    CASES.append((f"stored args {key}={value!r}", ["train", "--resume", "--out", RUN, "--steps", "6", "--data",
                                                   "{corpus}", "--no-progress"], set_arg(key, value), key))
HUGE = "1000000000"
for flag, value in [("--d-model", "10000000"), ("--n-layer", "1000000"), ("--batch-size", HUGE), ("--seq-len", HUGE),
                    ("--eval-batches", HUGE)]:
    CASES.append((f"train {flag} huge",
                  ["train", "--data", "{corpus}", "--out", "{tmp}/f", "--steps", "2", flag, value],
                  None, "needs at least"))
    if flag != "--eval-batches":
        CASES.append((f"tasks {flag} huge", ["tasks", "mqar", "--steps", "1", flag, value], None, "needs at least"))
for task, flag, value in [("mamba-nd-digits", "--d-model", "10000000"), ("mamba-nd-digits", "--batch-size", HUGE),
                          ("mamba-nd-digits", "--image-size", "1000000"), ("mamba-nd-video", "--depth", "10000000")]:
    CASES.append((f"{task} {flag} huge", ["tasks", task, "--steps", "1", flag, value], None, "needs at least"))
CASES.append(("tasks --vocab huge", ["tasks", "mqar", "--steps", "1", "--vocab", "1000000000000"], None,
              "needs at least"))
for command in (["train", "--data", "{corpus}", "--out", "{tmp}/g", *TINY],
                ["generate", "--checkpoint", RUN, "--prompt", "ab"],
                ["explain", "--checkpoint", RUN, "--prompt", "ab", "--out", "{tmp}/e"], ["info"],
                ["tasks", "mqar", "--steps", "1"], ["tasks", "mamba-nd-digits", "--steps", "1"]):
    for value in (BIG, "0", "1e3"):
        CASES.append((f"{' '.join(command[:2])} threads {value}", [*command, "--threads", value], None, "--threads"))
CASES += [
    ("generate max-new-tokens 1e20", ["generate", "--checkpoint", RUN, "--prompt", "ab", "--max-new-tokens", "1e20"],
     None, "--max-new-tokens"),
    ("generate max-new-tokens 10**20", ["generate", "--checkpoint", RUN, "--prompt", "ab", "--max-new-tokens",
                                        "100000000000000000000"], None, "in [1, 10000000]"),
    ("generate max-new-tokens 0", ["generate", "--checkpoint", RUN, "--prompt", "ab", "--max-new-tokens", "0"], None,
     "--max-new-tokens"),
    ("generate top-k 1e20", ["generate", "--checkpoint", RUN, "--prompt", "ab", "--top-k", "1e20"], None, "--top-k"),
    ("generate top-k -1", ["generate", "--checkpoint", RUN, "--prompt", "ab", "--top-k", "-1"], None, "--top-k"),
    ("generate temperature nan", ["generate", "--checkpoint", RUN, "--prompt", "ab", "--temperature", "nan"], None,
     "--temperature"),
    ("train sample-tokens 10**20", ["train", "--data", "{corpus}", "--out", "{tmp}/h", *TINY, "--sample-tokens", BIG],
     None, "--sample-tokens"),
    ("train weight-decay inf", ["train", "--data", "{corpus}", "--out", "{tmp}/i", *TINY, "--weight-decay", "inf"],
     None, "--weight-decay"),
    ("vocab_size huge", ["generate", "--checkpoint", RUN, "--prompt", "ab"],
     set_key("config.json", "vocab_size", 10**12), "shape"),
    ("tasks seed 2**64", ["tasks", "mqar", "--seed", BIG, "--steps", "1"], None, "--seed"),
    ("tasks steps -1", ["tasks", "mqar", "--steps", "-1"], None, "--steps"),
    ("tasks lr nan", ["tasks", "mqar", "--lr", "nan", "--steps", "1"], None, "--lr"),
    ("tasks unknown", ["tasks", "no-such-task"], None, "NAME"),
    ("nd seed 2**64", ["tasks", "mamba-nd-digits", "--seed", BIG, "--steps", "1"], None, "--seed"),
    ("nd patch 0", ["tasks", "mamba-nd-video", "--patch", "0,2", "--steps", "1"], None, "--patch"),
]


@pytest.mark.parametrize("name, argv, edit, words", CASES, ids=[c[0] for c in CASES])
def test_hostile_value_is_one_error_line(tmp_path, trained, corpus, capsys, name, argv, edit, words):
    run = trained
    if edit is not None:
        run = tmp_path / "copy"
        shutil.copytree(trained, run)
        edit(run / "checkpoint")
    argv = [a.format(run=run, corpus=corpus, tmp=tmp_path) for a in argv]
    capsys.readouterr()
    assert main(argv) == 2
    assert words in error_line(capsys)


def test_top_k_above_the_vocabulary_keeps_every_token(trained, capsys):
    """As transformers' top-k: a k larger than the vocabulary is the whole vocabulary (said in --help)."""
    argv = ["generate", "--checkpoint", str(trained), "--prompt", "ab", "--max-new-tokens", "3", "--seed", "0"]
    assert main([*argv, "--top-k", "100000000000000000000"]) == 0
    huge = capsys.readouterr().out
    assert main([*argv, "--top-k", "0"]) == 0
    assert capsys.readouterr().out == huge
