"""Where a hub id comes from: a local copy named in a mirror file, or the Hugging Face hub.

Configs name models and datasets by their hub ids, so a user with network runs them as written. A machine
without network points a mirror file at local copies (set `mirror:` in the config or MRL_MIRROR=file):

    models:
      sentence-transformers/all-MiniLM-L6-v2: path/to/all-MiniLM-L6-v2
    datasets:
      sentence-transformers/stsb:          # replaces path/name/data_files of a spec whose path is this id
        path: csv
        data_files: {train: stsb/train.csv, validation: stsb/dev.csv, test: stsb/test.csv}
        score_max: 5                       # the local copy scores in [0, 5]; the hub's in [0, 1]

Relative paths are relative to the mirror file. An entry whose files are missing is skipped (the hub is
tried), so one mirror file serves machines with and without the copies.
"""

import os

import yaml

MIRROR_ENV = "MRL_MIRROR"


def load_mirror(path: str | None) -> dict:
    """{'models': {id: dir}, 'datasets': {id: spec}, 'file': path} with paths made absolute; {} if none."""
    path = os.environ.get(MIRROR_ENV) or path
    if not path:
        return {}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mirror: no mirror file at {path!r} (from {MIRROR_ENV} or the config's `mirror`)")
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    unknown = set(raw) - {"models", "datasets"}
    if unknown:
        raise KeyError(f"mirror {path}: unknown sections {sorted(unknown)}; expected models, datasets")
    root = os.path.dirname(os.path.abspath(path))
    models = {k: os.path.normpath(os.path.join(root, v)) for k, v in (raw.get("models") or {}).items()}
    datasets = {}
    for hub_id, spec in (raw.get("datasets") or {}).items():
        spec = dict(spec)
        if "data_files" in spec:
            spec["data_files"] = _map_files(spec["data_files"], lambda p: os.path.normpath(os.path.join(root, p)))
        datasets[hub_id] = spec
    return {"models": models, "datasets": datasets, "file": path}


def resolve_model(name: str, mirror: dict) -> str:
    """A local folder for `name` if there is one, else `name` itself (a hub id)."""
    if os.path.isdir(name):
        return name
    if _looks_like_path(name):
        raise FileNotFoundError(f"model.name: no model folder at {name!r}")
    local = mirror.get("models", {}).get(name)
    return local if local and os.path.isdir(local) else name


def resolve_dataset(spec: dict, mirror: dict) -> dict:
    """The spec with a hub id replaced by its local copy where the mirror has one whose files exist."""
    local = mirror.get("datasets", {}).get(spec.get("path"))
    if local is None or not all(os.path.exists(p) for p in data_file_paths(local.get("data_files"))):
        return spec
    kept = {k: v for k, v in spec.items() if k not in ("path", "name", "data_files", "data_dir")}
    return {**local, **kept}


def unreachable(kind: str, name: str, mirror: dict, error: Exception) -> RuntimeError:
    """The error for a hub id that neither a local copy nor the hub could provide."""
    entry = mirror.get("models" if kind == "model" else "datasets", {}).get(name)
    if entry is not None:
        missing = [entry] if kind == "model" else [p for p in data_file_paths(entry.get("data_files"))
                                                   if not os.path.exists(p)]
        where = f"the mirror file {mirror['file']} maps it to {', '.join(missing)}, which does not exist"
    elif mirror:
        where = f"the mirror file {mirror['file']} has no entry for it"
    else:
        where = "no mirror file is set"
    return RuntimeError(
        f"could not load {kind} {name!r}: it is not a local path, {where}, and the hub failed "
        f"({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else '-'}; the full "
        f"error is above). Give a local path instead, or map {name!r} to a local copy in a "
        f"mirror file (set `mirror:` in the config or {MIRROR_ENV}=/path/to/mirror.yaml; see mrl/sources.py).")


def check_local_files(spec: dict, field: str) -> None:
    """Fail before any loading if a spec names local data files that do not exist."""
    for path in local_files(spec.get("data_files")):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{field}.data_files: no such file {path!r}")


def local_files(data_files) -> list[str]:
    """The plain local paths among a spec's data_files (no URLs, no glob patterns)."""
    return [p for p in data_file_paths(data_files) if "://" not in p and not any(c in p for c in "*?[")]


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def data_file_paths(data_files) -> list[str]:
    """Every entry of a spec's data_files (a path, a list, or {split: either}), as listed: paths, URLs, patterns."""
    if data_files is None:
        return []
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [p for v in data_files.values() for p in data_file_paths(v)]
    return [p for v in data_files for p in data_file_paths(v)]


def _map_files(data_files, fn):
    if isinstance(data_files, str):
        return fn(data_files)
    if isinstance(data_files, dict):
        return {k: _map_files(v, fn) for k, v in data_files.items()}
    return [_map_files(v, fn) for v in data_files]
