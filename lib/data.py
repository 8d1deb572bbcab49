"""Data files in, numpy batches out.

Readers (`read_jsonl`, `read_json`, `read_tsv`) validate every record and report a bad one as a
`UserError` that names `file:line` and the field. `ArrayDataset` holds already tokenized
examples and serves batches by step index: the order is a pure function of (seed, step), so a
resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from lib.errors import UserError

# A field's expected type: one type or a tuple of alternatives (e.g. `(int, float)`).
FieldType = type | tuple[type, ...]
PathLike = str | os.PathLike


# ------------------------------------------------------------------------------------------
# Reading and validation.


def _check_file(path: PathLike, key: str | None) -> None:
    """Raise a UserError if `path` is not an existing file, naming the config key to fix."""
    hint = f" (set --config.{key}=PATH to an existing file)" if key else ""
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory, expected a data file{hint}")
    if not os.path.isfile(path):
        raise UserError(f"{path}: data file not found{hint}")


def _read_lines(path: PathLike) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, text without the line break); a UTF-8 error names its line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{number}: not valid UTF-8 ({e.reason})") from None
            yield number, text.rstrip("\r\n")


def _type_name(expected: FieldType) -> str:
    """'str', or 'int or float' for a tuple of alternatives."""
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _json_type_name(value: Any) -> str:
    """The JSON-ish name of a value's type, for messages."""
    return "null" if value is None else type(value).__name__


def _matches(value: Any, expected: FieldType) -> bool:
    """isinstance, except that a bool is not an int and an int is a float (as JSON means)."""
    types = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def _validate(record: Any, required: Mapping[str, FieldType], where: str) -> dict:
    """Check that `record` is an object with every required field of the right type."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {_json_type_name(record)}")
    for name, expected in required.items():
        if name not in record:
            raise UserError(f'{where}: field "{name}" is missing (expected {_type_name(expected)})')
        if not _matches(record[name], expected):
            raise UserError(
                f'{where}: field "{name}" has type {_json_type_name(record[name])}, '
                f"expected {_type_name(expected)}"
            )
    return record


def read_jsonl(
    path: PathLike, required: Mapping[str, FieldType], key: str | None = None
) -> list[dict]:
    """Read a JSON Lines file (one object per line; blank lines skipped), validating each record.

    `required` maps field names to types; extra fields are kept. `key` is the config key the path
    came from (e.g. "data.train"), named in the error when the file is missing.
    """
    _check_file(path, key)
    records = []
    for number, line in _read_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            message = f"{path}:{number}: invalid JSON ({e.msg} at column {e.colno})"
            raise UserError(message) from None
        records.append(_validate(record, required, f"{path}:{number}"))
    return records


def _record_lines(text: str, count: int) -> list[int]:
    """1-based line numbers where the first `count` elements of a JSON array text start."""
    decoder = json.JSONDecoder()
    ws = " \t\r\n"
    lines: list[int] = []
    i = text.index("[") + 1
    line, counted_to = 1, 0
    while len(lines) < count:
        while text[i] in ws or text[i] == ",":
            i += 1
        line += text.count("\n", counted_to, i)
        counted_to = i
        lines.append(line)
        _, i = decoder.raw_decode(text, i)
    return lines


def read_json(
    path: PathLike, required: Mapping[str, FieldType], key: str | None = None
) -> list[dict]:
    """Read a file holding one JSON array of objects, validating each record.

    Errors name the record's index and the line where it starts: `f.json:12: record [3]: ...`.
    """
    _check_file(path, key)
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 at byte {e.start} ({e.reason})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of objects, got {_json_type_name(data)}")
    for index, record in enumerate(data):
        try:
            _validate(record, required, "")
        except UserError as e:
            # Line numbers are only worked out for the bad record: parsing is the common case.
            line = _record_lines(text, index + 1)[index]
            raise UserError(f"{path}:{line}: record [{index}]{e}") from None
    return data


def read_tsv(
    path: PathLike,
    columns: Sequence[str],
    types: Mapping[str, type] | None = None,
    key: str | None = None,
    check: Callable[[dict], str | None] | None = None,
) -> list[dict]:
    """Read a tab-separated file with exactly `len(columns)` columns per non-blank line.

    No header line and no quoting: a field cannot contain a tab. Values are str unless `types`
    maps the column to `int` or `float`, which must then parse. `check(record)` may return a
    message for a record the task cannot use; it is raised as a UserError at `file:line`.
    """
    _check_file(path, key)
    types = dict(types or {})
    unknown = set(types) - set(columns)
    if unknown:
        raise ValueError(f"types name columns that are not in {list(columns)}: {sorted(unknown)}")
    if not set(types.values()) <= {int, float, str}:
        raise ValueError(f"column types must be int, float or str, got {types}")
    records = []
    for number, line in _read_lines(path):
        if not line.strip():
            continue
        values = line.split("\t")
        if len(values) != len(columns):
            raise UserError(
                f"{path}:{number}: expected {len(columns)} tab-separated columns "
                f"({', '.join(columns)}), got {len(values)}"
            )
        record: dict[str, Any] = dict(zip(columns, values))
        for name, kind in types.items():
            try:
                record[name] = kind(record[name])
            except ValueError:
                raise UserError(
                    f'{path}:{number}: column "{name}" is not a valid {kind.__name__}: '
                    f"{record[name]!r}"
                ) from None
        problem = check(record) if check is not None else None
        if problem:
            raise UserError(f"{path}:{number}: {problem}")
        records.append(record)
    return records


def json_object_or_none(text: str) -> dict | None:
    """A ``--mode=predict`` input line as a JSON object, or None when it is plain text (a line
    that merely starts with ``{`` but is not a JSON object is plain text too)."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


# ------------------------------------------------------------------------------------------
# Padding.


def pad_and_stack(
    seqs: Sequence[Sequence[int]],
    max_len: int | None = None,
    pad_id: int = 0,
    side: str = "right",
    dtype: Any = np.int32,
) -> tuple[np.ndarray, np.ndarray]:
    """Pad token id lists to one `[len(seqs), max_len]` array; return (ids, mask).

    `mask` is 1 on real tokens and 0 on padding. `side="left"` puts the padding first (for
    decoder prompts, so that generation continues from the last column). `max_len=None` uses the
    longest sequence. A sequence longer than `max_len` is an error: truncate before padding.
    """
    if side not in ("right", "left"):
        raise ValueError(f'side must be "right" or "left", got {side!r}')
    longest = max((len(s) for s in seqs), default=0)
    width = longest if max_len is None else max_len
    if longest > width:
        index = next(i for i, s in enumerate(seqs) if len(s) > width)
        raise ValueError(f"sequence {index} has {len(seqs[index])} tokens > max_len {width}")
    ids = np.full((len(seqs), width), pad_id, dtype=dtype)
    mask = np.zeros((len(seqs), width), dtype=np.int32)
    for row, seq in enumerate(seqs):
        n = len(seq)
        if n == 0:
            continue
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[row, cols] = seq
        mask[row, cols] = 1
    return ids, mask


# ------------------------------------------------------------------------------------------
# Step-indexed batching.


class ArrayDataset:
    """Equal-length numpy arrays (one row per example) served as batches by step index.

    Training order: the stream of examples is epoch 0's permutation, then epoch 1's, ...; epoch
    `e`'s permutation comes from `np.random.default_rng((seed, e))`. Step `s` takes positions
    `[s * batch_size, (s + 1) * batch_size)` of that stream, so a batch may straddle two epochs
    and every example appears exactly once per epoch. Nothing depends on earlier calls: asking
    for a step again (e.g. after a resume) returns the same batch.
    """

    VALID = "_valid"

    def __init__(self, arrays: Mapping[str, Any], name: str = "dataset"):
        """Wrap `arrays` (lists are converted with np.asarray); `name` is used in messages."""
        self.name = name
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        if not self.arrays:
            raise ValueError(f"{name}: no arrays given")
        if self.VALID in self.arrays:
            raise ValueError(f'{name}: "{self.VALID}" is reserved for the eval padding mask')
        sizes = {k: v.shape[0] if v.ndim else None for k, v in self.arrays.items()}
        if len(set(sizes.values())) != 1 or None in sizes.values():
            raise ValueError(f"{name}: arrays differ in length: {sizes}")
        self._n = next(iter(sizes.values()))
        if self._n == 0:
            raise UserError(f"{name}: the dataset is empty (check the data file)")
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        """Number of examples."""
        return self._n

    def steps_per_epoch(self, batch_size: int) -> int:
        """Steps needed to see every example at least once: ceil(len / batch_size)."""
        return -(-self._n // batch_size)

    def epoch(self, step: int, batch_size: int) -> float:
        """Fractional epoch reached after `step` steps (for logs)."""
        return step * batch_size / self._n

    def _permutation(self, seed: int, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s example order; the last few are cached (a batch spans at most a few)."""
        perm = self._perms.get((seed, epoch))
        if perm is None:
            perm = np.random.default_rng((seed, epoch)).permutation(self._n)
            if len(self._perms) >= 4:
                self._perms.pop(next(iter(self._perms)))
            self._perms[(seed, epoch)] = perm
        return perm

    def indices(self, step: int, batch_size: int, seed: int, shuffle: bool = True) -> np.ndarray:
        """Row indices of the batch at `step` (see the class docstring)."""
        if step < 0 or batch_size <= 0:
            raise ValueError(f"need step >= 0 and batch_size > 0, got {step}, {batch_size}")
        if seed < 0:
            raise UserError(f"seed must be >= 0, got {seed} (set --config.train.seed)")
        positions = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
        if not shuffle:
            return positions % self._n
        epochs = positions // self._n
        out = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            where = epochs == epoch
            out[where] = self._permutation(seed, int(epoch))[positions[where] % self._n]
        return out

    def batch(
        self, step: int, batch_size: int, seed: int, shuffle: bool = True
    ) -> dict[str, np.ndarray]:
        """The training batch at `step`: a dict of arrays with `batch_size` rows each."""
        idx = self.indices(step, batch_size, seed, shuffle)
        return {k: v[idx] for k, v in self.arrays.items()}

    def num_eval_batches(self, batch_size: int) -> int:
        """How many batches `eval_batches` yields."""
        return self.steps_per_epoch(batch_size)

    def map_eval(self, fn: Callable[[dict[str, np.ndarray]], Any], batch_size: int) -> Any:
        """``fn(batch)`` (typically a jitted model) over every example in the fixed-size
        batches of ``eval_batches``, the padding rows dropped: its output, an array or a tuple
        of arrays with one row per example, concatenated in example order."""
        outs = []
        for batch in self.eval_batches(batch_size):
            valid = batch.pop(self.VALID)
            out = fn(batch)
            outs.append(tuple(np.asarray(o)[valid] for o in out) if isinstance(out, tuple)
                        else np.asarray(out)[valid])
        if outs and isinstance(outs[0], tuple):
            return tuple(np.concatenate(parts) for parts in zip(*outs))
        return np.concatenate(outs)

    def eval_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """All examples in order, in batches of exactly `batch_size` rows.

        Every batch carries a bool `"_valid"` array; the last batch is filled up with copies of
        the last example marked `False`. Copies rather than zeros keep every row a valid input
        (an all-zero attention mask would give NaNs), and fixed shapes keep eval jitted once.
        """
        for start in range(0, self._n, batch_size):
            idx = np.arange(start, start + batch_size)
            valid = idx < self._n
            idx = np.minimum(idx, self._n - 1)
            batch = {k: v[idx] for k, v in self.arrays.items()}
            batch[self.VALID] = valid
            yield batch
