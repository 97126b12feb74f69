"""Per-token dumps: a capped sample of one step's response tokens, one compact file each.

Shapes: every column is `[n]` over the same n sampled response tokens.

    idx = capped_sample(num_tokens, cap=20000, seed=step)
    write_token_dump(dump_path(run_dir, step), TokenDump(
        entropy_norm=h[idx], reverse_kl=d[idx], forward_kl=f[idx], kept=kept[idx],
        quadrant=labels[idx], rollout_id=rid[idx], position=pos[idx], step=step,
        entropy_threshold=0.05, div_threshold_nats=0.5, num_response_tokens=num_tokens))
    dump = read_token_dump(path)

Format: `<run dir>/token_dumps/step_000010.npz`, a compressed NumPy archive (no pickle) of
the columns below (`weight` may be absent in older dumps: read as `kept`) plus 0-d
metadata arrays and `format_version`. NumPy only (no torch,
no pyarrow) so any analysis environment reads it; ~9 bytes a token before compression.
The trainer writes one every `logging.dump_tokens_every` steps (train/token_dumps.py:
gathered over DP into one file per dump, uniformly capped at `logging.dump_tokens_max`).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
DUMP_DIR = "token_dumps"

#: column -> dtype on disk.
COLUMNS = {
    "entropy_norm": np.float32,
    "reverse_kl": np.float32,
    "forward_kl": np.float32,
    "kept": np.bool_,
    "quadrant": np.int8,
    "rollout_id": np.int64,
    "position": np.int32,
}
#: Columns older dumps may lack (read as their default): `weight` = kept as 0/1.
OPTIONAL_COLUMNS = {"weight": np.float32}
_META = ("step", "entropy_threshold", "div_threshold_nats", "num_response_tokens")


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, on any device
        value = value.detach().cpu().numpy()
    return np.asarray(value)


@dataclass(frozen=True)
class TokenDump:
    """One dump. Columns are coerced to their on-disk dtypes and validated on construction."""

    entropy_norm: np.ndarray
    """[n] student entropy / log|V| (unitless, in [0, 1])."""
    reverse_kl: np.ndarray
    """[n] KL(student || teacher) at the token, nats."""
    forward_kl: np.ndarray
    """[n] KL(teacher || student) at the token, nats."""
    kept: np.ndarray
    """[n] bool: the selection rule kept the token for the loss."""
    quadrant: np.ndarray
    """[n] TIP quadrant 1..4 (response tokens only: no 0 = prompt/padding)."""
    rollout_id: np.ndarray
    """[n] global rollout id of the token's sequence."""
    position: np.ndarray
    """[n] index of the token within its response (0 = first generated token)."""
    step: int = 0
    """Training step the tokens come from."""
    entropy_threshold: float = math.nan
    """The quadrant rule's entropy split (NaN when it is not a fixed threshold)."""
    div_threshold_nats: float = math.nan
    """The quadrant rule's reverse-KL split in nats (NaN when not fixed)."""
    num_response_tokens: int = -1
    """Response tokens of the step before capping (-1: unknown)."""
    weight: Any = None
    """[n] the token's weight in the loss, in [0, 1] (a weighted rule, docs/tip.md); None:
    `kept` as 0/1 (a mask rule, and dumps written before weights existed)."""

    def __post_init__(self) -> None:
        lengths = {}
        for name, dtype in COLUMNS.items():
            array = _as_numpy(getattr(self, name))
            if array.ndim != 1:
                raise ValueError(f"token dump column {name}: expected a 1-D array, got shape "
                                 f"{array.shape}")
            if dtype is np.bool_ and array.dtype != np.bool_:
                raise ValueError(f"token dump column kept: expected bool, got {array.dtype}")
            object.__setattr__(self, name, array.astype(dtype, copy=False))
            lengths[name] = len(array)
        weight = self.kept.astype(np.float32) if self.weight is None else _as_numpy(self.weight)
        if weight.ndim != 1:
            raise ValueError(f"token dump column weight: expected a 1-D array, got shape {weight.shape}")
        object.__setattr__(self, "weight", weight.astype(np.float32, copy=False))
        lengths["weight"] = len(weight)
        if len(set(lengths.values())) > 1:
            raise ValueError(f"token dump columns differ in length: {lengths}; all must be "
                             "the same sampled tokens")
        if self.quadrant.size and not np.isin(self.quadrant, (1, 2, 3, 4)).all():
            raise ValueError("token dump column quadrant: values must be 1..4 (response "
                             f"tokens only), got {sorted(set(self.quadrant.tolist()))}")

    @property
    def num_tokens(self) -> int:
        return len(self.kept)


def dump_path(run_dir: str | Path, step: int) -> Path:
    """`<run_dir>/token_dumps/step_<step:06d>.npz`."""
    return Path(run_dir) / DUMP_DIR / f"step_{step:06d}.npz"


def capped_sample(num_tokens: int, cap: int, seed: int) -> np.ndarray:
    """Sorted indices of min(cap, num_tokens) tokens drawn without replacement."""
    if num_tokens <= cap:
        return np.arange(num_tokens)
    return np.sort(np.random.default_rng(seed).choice(num_tokens, size=cap, replace=False))


def write_token_dump(path: str | Path, dump: TokenDump) -> Path:
    """Write atomically (temp file + rename: a reader never sees half a dump)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {name: getattr(dump, name) for name in (*COLUMNS, *OPTIONAL_COLUMNS)}
    arrays.update({name: np.asarray(getattr(dump, name)) for name in _META})
    arrays["format_version"] = np.asarray(FORMAT_VERSION)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_token_dump(path: str | Path) -> TokenDump:
    """Read a dump; a file of another format is a ValueError naming what is missing."""
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in (*COLUMNS, *_META, "format_version") if k not in data.files]
        if missing:
            raise ValueError(f"{path}: not a token dump (missing {missing}); expected the "
                             f"file write_token_dump writes")
        version = int(data["format_version"])
        if version != FORMAT_VERSION:
            raise ValueError(f"{path}: token dump format {version}; this version reads "
                             f"{FORMAT_VERSION}")
        fields = {name: data[name] for name in COLUMNS}
        fields.update({name: data[name] for name in OPTIONAL_COLUMNS if name in data.files})
        kinds = {f.name: f.type for f in dataclasses.fields(TokenDump)}
        for name in _META:
            fields[name] = (int if kinds[name] in (int, "int") else float)(data[name])
    return TokenDump(**fields)
