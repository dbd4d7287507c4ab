"""Finding a checkpoint folder and reading its JSON: clear errors for a missing folder (a Hub id, a cache entry, a
leftover backup), and the value tests the config readers share."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Union

from mambakit.errors import CheckpointError
from mambakit.models.io.atomic import backup_hint, recover
from mambakit.models.io.names import CONFIG_NAME

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def resolve_folder(path: Union[str, os.PathLike], need_config: bool = True) -> Path:
    """The checkpoint folder `path` (``~`` expanded), recovered first when an interrupted save left it missing (see
    `atomic.recover`); CheckpointError when it does not exist, is a file, or (with
    need_config) holds no config.json. The messages say what to pass instead where that can be guessed."""
    text = os.fspath(path)
    p = Path(text).expanduser()
    if not p.exists():
        recover(p)
    if not p.exists():
        hint = backup_hint(p)
        # "org/name" whose "org" is no local folder reads as a Hub id; "runs/x" with a runs/ here is a local path
        if _HUB_ID.match(text) and not text.startswith(".") and not hint and not Path(text.split("/")[0]).exists():
            local = text.split("/")[-1]
            raise CheckpointError(
                f"checkpoint folder {text!r} does not exist. If it is a Hugging Face Hub id: mambakit does not "
                f"download, so download it first (e.g. `hf download {text} --local-dir {local}`) and pass the folder "
                f"{local!r}")
        raise CheckpointError(f"checkpoint folder {text!r} does not exist{hint}")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint path {text!r} is a file, not a directory; pass the folder that holds "
                              f"{CONFIG_NAME} and the weights")
    if need_config and not (p / CONFIG_NAME).is_file():
        hint = ""
        snapshots = p / "snapshots"
        if snapshots.is_dir():  # a Hugging Face cache entry (models--org--name)
            subs = sorted(s.name for s in snapshots.iterdir() if s.is_dir())
            if subs:
                hint = f"; this looks like a Hugging Face cache entry: pass {str(snapshots / subs[-1])!r}"
        else:
            inner = sorted(c.name for c in p.iterdir() if c.is_dir() and (c / CONFIG_NAME).is_file())
            if inner:
                hint = f"; sub-folders holding a {CONFIG_NAME}: {inner}"
        raise CheckpointError(f"folder {text!r} holds no {CONFIG_NAME}, so it is not a checkpoint{hint}")
    return p


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object stored in `path`; CheckpointError when it cannot be read or is not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def json_float(v: Any) -> float:
    """A float from JSON as transformers writes it: a number, {"__float__": "Infinity"} (5.x), a bare Infinity
    (4.x, parsed by Python's json as float('inf')), or a string such as "inf". ValueError otherwise."""
    if is_number(v):
        return float(v)
    if isinstance(v, dict) and set(v) == {"__float__"} and isinstance(v["__float__"], str):
        v = v["__float__"]
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    raise ValueError(f"not a number: {v!r}")
