"""One split of a dataset as a `datasets.Dataset`, from the Hub or from a local mirror.

    >>> ds = read_table(None, "lmms-lab/MMBench", "dev", "en")          # the Hub
    >>> ds = read_table("mirrors/MMBench", "lmms-lab/MMBench", "dev", "en")  # en/dev-*.parquet
    >>> ds = read_table("mirrors/x/test-00000-of-00001.parquet", "", "test", None)  # one file

Both go through `datasets.load_dataset`. For a local folder this module picks the split's files
itself (named `<split>-...` or `<split>.<ext>`, or inside a folder named after the split, under
`<config>/` when that folder exists): `load_dataset(folder)` would rename `dev` to `validation`,
mix a repository's configs, and mistake a folder with clips in it for a video dataset. Image
columns come back undecoded ({"bytes", "path"}), so the caller decodes each row itself and can
name a row whose image is bad.
"""

from __future__ import annotations

import re
from pathlib import Path

from datasets import Dataset, Image, load_dataset

_FILE_KINDS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def _looks_like_hub_id(source: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", source))


def read_table(source: str | None, hub_id: str, split: str, config: str | None) -> Dataset:
    """One split of a benchmark's table: from `source` (local folder, data file or Hub id) or,
    without one, from `hub_id`. Image columns come back undecoded (bytes and path)."""
    if source is None or (not Path(source).expanduser().exists() and _looks_like_hub_id(source)):
        ds = load_dataset(source or hub_id, config, split=split)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"benchmark data {path} does not exist (nor is it a Hub id)")
        if path.is_file():
            kind = _FILE_KINDS.get(path.suffix.lower())
            if kind is None:
                raise ValueError(f"{path}: expected one of {sorted(_FILE_KINDS)} files")
            ds = load_dataset(kind, data_files=str(path), split="train")
        else:
            files = _split_files(path, split, config)
            kind = _FILE_KINDS[files[0].suffix.lower()]
            ds = load_dataset(kind, data_files=[str(f) for f in files], split="train")
    for name, feature in ds.features.items():
        if isinstance(feature, Image):  # decode ourselves, so a bad image names its row
            ds = ds.cast_column(name, Image(decode=False))
    return ds


def _split_files(root: Path, split: str, config: str | None) -> list[Path]:
    """The data files of `split` under `root` (under `root/config` when that folder exists):
    files named `<split>-...` or `<split>.<ext>`, or inside a folder named `split`. Chosen here,
    not by `load_dataset(folder)`, which renames `dev` to `validation` and would mix configs."""
    base = root / config if config and (root / config).is_dir() else root
    files = [
        f
        for f in sorted(base.rglob("*"))
        if f.suffix.lower() in _FILE_KINDS
        and f.is_file()
        and not any(part.startswith(".") for part in f.relative_to(base).parts)
    ]
    if not files:
        raise FileNotFoundError(f"no {'/'.join(sorted(_FILE_KINDS))} files under {base}")
    chosen = [
        f for f in files if f.stem.split("-")[0] == split or split in f.relative_to(base).parts[:-1]
    ]
    if not chosen:
        found = sorted({f.stem.split("-")[0] for f in files})
        raise ValueError(f"{base} has no files of split {split!r}; file names give {found}")
    kinds = {_FILE_KINDS[f.suffix.lower()] for f in chosen}
    if len(kinds) > 1:
        raise ValueError(f"{base}: split {split!r} mixes {sorted(kinds)} files")
    return chosen
