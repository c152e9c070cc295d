"""The `sliding` source format: {train,valid,test}.csv (user_id,item_ids,timestamp) + id2name4Rec.json."""

from __future__ import annotations

import ast
import csv
import json
from pathlib import Path

from gdrt_core.errors import GdrtError


def read_titles(path: Path) -> dict[int, str]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GdrtError("item titles file not found", path=str(path)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GdrtError(f"not valid UTF-8 JSON ({e})", path=str(path)) from None
    return {int(k): v for k, v in raw.items()}


def read_split(path: Path, titles: dict[int, str], max_history: int, start_id: int) -> dict[str, list]:
    cols: dict[str, list] = {"example_id": [], "user_id": [], "history": [], "target": [], "timestamp": []}
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, row in enumerate(csv.DictReader(f), start=2):
            ids = ast.literal_eval(row["item_ids"])
            for i in ids:
                if i not in titles:
                    raise GdrtError(f"unknown item id {i}", path=str(path), line=lineno)
            hist, tgt = ids[:-1], ids[-1]
            if len(hist) > max_history:
                raise GdrtError(f"history of {len(hist)} items is longer than {max_history}", path=str(path), line=lineno)
            cols["example_id"].append(start_id + len(cols["example_id"]))
            cols["user_id"].append(str(row["user_id"]))
            cols["history"].append(hist)
            cols["target"].append(tgt)
            cols["timestamp"].append(int(row["timestamp"]))
    return cols


def read_sliding(config) -> tuple[dict[int, str], dict[str, dict[str, list]], dict]:
    src = Path(config.source)
    titles = read_titles(src / "id2name4Rec.json")
    splits = {}
    next_id = 0
    for name in ("train", "valid", "test"):
        splits[name] = read_split(src / f"{name}.csv", titles, config.max_history, next_id)
        next_id += len(splits[name]["example_id"])
    return titles, splits, {"files": [f"{n}.csv" for n in splits]}
