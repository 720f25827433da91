"""The checkpoint file format: tensor encoding, checksums, RNG states, atomic writes, reading.

Private to `modelbatch.checkpoint`; nothing here knows about ModelBatch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import secrets
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
    "META_CRC_KEY",
    "META_KEY",
    "CheckpointFile",
    "atomic_write",
    "bad_file",
    "crc",
    "decode",
    "dtype_name",
    "encode",
    "read_all",
    "rng_state",
    "safetensors_module",
    "set_rng_state",
]

FORMAT = "modelbatch.checkpoint"
FORMAT_VERSION = 1
META_KEY, META_CRC_KEY = "modelbatch", "modelbatch_crc32"

# The dtypes a checkpoint may name, by name: the only way a name read from a file
# becomes a torch object (never getattr(torch, name)).
DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.uint16,
        torch.int32,
        torch.uint32,
        torch.int64,
        torch.uint64,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex32,
        torch.complex64,
        torch.complex128,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
    )
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------- encoding


def safetensors_module() -> Any:
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "modelbatch.checkpoint needs safetensors; install it with "
            '`pip install "torch-modelbatch[checkpoint]"` or `pip install safetensors`.'
        ) from e
    return st


def encode(
    obj: Any,
    prefix: str,
    tensors: dict[str, Tensor],
    where: str,
    paths: dict[str, str] | None = None,
) -> Any:
    """A JSON value for `obj`, its tensors moved into `tensors` under `prefix/<k>`.

    With `paths`, tensors are kept where they are (detached, not copied to the
    CPU) and `paths` gets where each one sits (`state['optimizer'][...]`).
    """
    if isinstance(obj, Tensor):
        name = f"{prefix}/{len(tensors)}"
        if paths is None:
            tensors[name] = obj.detach().to("cpu", copy=True).contiguous()
        else:
            tensors[name] = obj.detach()
            paths[name] = where
        return {"__tensor__": name}
    if isinstance(obj, Mapping):
        # Pairs, not a JSON object: optimizer states are keyed by int, which JSON cannot keep.
        items = [
            [
                encode(k, prefix, tensors, where, paths),
                encode(v, prefix, tensors, f"{where}[{k!r}]", paths),
            ]
            for k, v in obj.items()
        ]
        return {"__dict__": items}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, prefix, tensors, f"{where}[]", paths) for v in obj]}
    if isinstance(obj, list):
        return [encode(v, prefix, tensors, f"{where}[]", paths) for v in obj]
    if isinstance(obj, torch.dtype):
        return {"__dtype__": dtype_name(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(
        f"checkpoint.save: cannot store a {type(obj).__name__} at {where}; state dicts may "
        "hold tensors, numbers, strings, None, and lists, tuples and dicts of those."
    )


def decode(obj: Any, tensors: Mapping[str, Tensor]) -> Any:
    """The value `encode` stored; ValueError on a reference it cannot resolve."""
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            name = obj["__tensor__"]
            if not isinstance(name, str) or name not in tensors:
                raise ValueError(f"its metadata names a tensor {name!r} that it does not hold")
            return tensors[name]
        if "__dict__" in obj:
            pairs = obj["__dict__"]
            if not isinstance(pairs, list) or not all(
                isinstance(p, list) and len(p) == 2 for p in pairs
            ):
                raise ValueError("its metadata holds a malformed dict")
            return {decode(k, tensors): decode(v, tensors) for k, v in pairs}
        if "__tuple__" in obj:
            return tuple(decode(v, tensors) for v in obj["__tuple__"])
        if "__dtype__" in obj:
            name = obj["__dtype__"]
            if not isinstance(name, str) or name not in DTYPES:
                raise ValueError(
                    f"its metadata names an unknown dtype {name!r} (known: {sorted(DTYPES)})"
                )
            return DTYPES[name]
    return obj


def crc(t: Tensor) -> int:
    # zlib reads the array's buffer directly: no copy of the tensor's bytes.
    return zlib.crc32(_bytes(t))


def rng_state(tensors: dict[str, Tensor]) -> dict[str, Any]:
    tensors["rng/torch"] = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    for i, s in enumerate(cuda):
        tensors[f"rng/cuda/{i}"] = s.cpu()
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    tensors["rng/numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    tensors["rng/python"] = torch.tensor(internal, dtype=torch.int64)
    return {
        "cuda_devices": len(cuda),
        "numpy": [kind, int(pos), int(has_gauss), float(gauss)],
        "python": [version, gauss_next],
    }


def set_rng_state(meta: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    if meta["cuda_devices"] and torch.cuda.is_available():
        states = [tensors[f"rng/cuda/{i}"] for i in range(meta["cuda_devices"])]
        torch.cuda.set_rng_state_all(states[: torch.cuda.device_count()])
    kind, pos, has_gauss, gauss = meta["numpy"]
    keys = tensors["rng/numpy"].numpy().astype(np.uint32)
    np.random.set_state((kind, keys, pos, has_gauss, gauss))
    version, gauss_next = meta["python"]
    random.setstate((version, tuple(tensors["rng/python"].tolist()), gauss_next))


# ---------------------------------------------------------------------- writing


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _take_lock(path: Path) -> int | None:
    """Hold an exclusive advisory lock on `<path>.lock`: its descriptor, or None without fcntl.

    Refuses at once (no waiting) when another writer holds it.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks, no lock taken
        return None
    lock = _lock_path(path)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(
                f"checkpoint.save: another writer is saving {path} right now (it holds the "
                f"lock {lock}); wait for it to finish, or save to a different path."
            ) from None
        except OSError:  # pragma: no cover - a file system without flock: go on unlocked
            os.close(fd)
            return None
        # The holder before us removes the lock file as it lets go: if that happened
        # between our open and our flock, we hold a file nobody else sees; take the new one.
        try:
            current = os.stat(lock)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            return fd
        os.close(fd)


def _drop_lock(path: Path, fd: int | None) -> None:
    if fd is None:  # pragma: no cover - no fcntl
        return
    try:
        # Removed while still held: anyone who opened this file re-opens the path.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_lock_path(path))
    finally:
        os.close(fd)


def _temp_name(path: Path) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(path.name)}\.\d+\.[0-9a-f]{{8}}\.tmp")


def _remove_stale_temp_files(path: Path) -> None:
    """Remove the temporary files that killed saves of `path` left (called under the lock)."""
    pattern = _temp_name(path)
    with os.scandir(path.parent) as entries:
        stale = [e.path for e in entries if pattern.fullmatch(e.name)]
    for name in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def atomic_write(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    st = safetensors_module()
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"checkpoint.save: the directory {path.parent} does not exist; create it first."
        )
    lock = _take_lock(path)
    try:
        if lock is not None:
            # Only a writer holding the lock may write a temp file of this path, so
            # any other one belongs to a save that was killed.
            _remove_stale_temp_files(path)
        _write_and_rename(st, path, tensors, metadata)
    finally:
        _drop_lock(path, lock)


def _write_and_rename(
    st: Any, path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]
) -> None:
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    # The mode a new file gets here (0o666 less the umask); the writer may create
    # its file privately, and the checkpoint should have ordinary permissions.
    mode = os.stat(tmp).st_mode & 0o777
    try:
        st.save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    # The rename itself is durable only once the directory entry is synced.
    if hasattr(os, "O_DIRECTORY"):
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


# ---------------------------------------------------------------------- reading

# The safetensors dtype codes this reader accepts (an explicit table: a file names
# a dtype, it never names an attribute of torch).
_FILE_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_HEADER_LIMIT = 100_000_000  # bytes of JSON header, as safetensors itself allows
_CHUNK = 1 << 24  # bytes per read while streaming a checksum


def bad_file(path: Path, problem: str, owner: str = "checkpoint.load") -> ValueError:
    return ValueError(f"{owner}: {path} {problem}")


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


class CheckpointFile:
    """A checkpoint opened once: the header, the metadata and every tensor come
    through one descriptor, so a writer renaming a new file over the path
    mid-read cannot pair one file's header with another file's bytes.

    Use as a context manager. Every tensor handed out is a fresh copy whose
    checksum has been verified.
    """

    def __init__(self, path: Path, owner: str) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"{owner}: no checkpoint file at {path}.")
        self.path, self.owner = path, owner
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()/__exit__
        try:
            self._parse_header()
            self.meta = self._verified_meta()
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> CheckpointFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    # -------------------------------------------------------------- structure

    def _unreadable(self, detail: str) -> ValueError:
        problem = f"is not a readable checkpoint (truncated or corrupted): {detail}"
        return bad_file(self.path, problem, self.owner)

    def _corrupted(self, detail: str) -> ValueError:
        return bad_file(self.path, f"is corrupted: {detail}", self.owner)

    def _read_into(self, buffer: memoryview, offset: int) -> None:
        self._file.seek(offset)
        done = 0
        while done < len(buffer):
            got = self._file.readinto(buffer[done:])
            if not got:
                raise self._unreadable(f"the file ends at byte {offset + done}.")
            done += got

    def _parse_header(self) -> None:
        size = os.fstat(self._file.fileno()).st_size
        if size < 8:
            raise self._unreadable(f"the file has {size} bytes.")
        head = bytearray(8)
        self._read_into(memoryview(head), 0)
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, _HEADER_LIMIT):
            raise self._unreadable(f"a header of {length} bytes in a file of {size}.")
        raw = bytearray(length)
        self._read_into(memoryview(raw), 8)
        try:
            header = json.loads(raw)
        except ValueError as e:
            raise self._unreadable(f"its header is not JSON ({e}).") from e
        if not isinstance(header, dict):
            raise self._unreadable("its header is not a JSON object.")
        self._data_start, data_size = 8 + length, size - 8 - length
        meta = header.pop("__metadata__", None)
        self.raw_meta: dict[str, Any] = meta if isinstance(meta, dict) else {}
        self.entries: dict[str, _Entry] = {}
        for name, spec in header.items():
            self.entries[name] = self._entry(name, spec, data_size)

    def _entry(self, name: str, spec: Any, data_size: int) -> _Entry:
        ok = isinstance(spec, dict)
        dtype = _FILE_DTYPES.get(spec.get("dtype")) if ok else None
        shape, offsets = (spec.get("shape"), spec.get("data_offsets")) if ok else (None, None)
        ok = (
            dtype is not None
            and isinstance(shape, list)
            and all(type(d) is int and d >= 0 for d in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
        )
        if not ok:
            raise self._unreadable(f"tensor {name!r} has a malformed entry {spec!r}.")
        assert dtype is not None and isinstance(shape, list) and isinstance(offsets, list)
        begin, end = offsets
        nbytes = math.prod(shape) * dtype.itemsize
        if not 0 <= begin <= end or end - begin != nbytes:
            raise self._unreadable(f"tensor {name!r} has offsets {offsets} for {nbytes} bytes.")
        if end > data_size:
            raise self._unreadable(
                f"tensor {name!r} ends at byte {end} of a data section of {data_size}."
            )
        return _Entry(dtype, tuple(shape), self._data_start + begin, self._data_start + end)

    def _verified_meta(self) -> dict[str, Any]:
        if META_KEY not in self.raw_meta:
            raise bad_file(
                self.path,
                "is a safetensors file but not a modelbatch checkpoint (no metadata).",
                self.owner,
            )
        text = self.raw_meta[META_KEY]
        if not isinstance(text, str) or str(zlib.crc32(text.encode())) != self.raw_meta.get(
            META_CRC_KEY
        ):
            raise self._corrupted("its metadata fails the checksum.")
        try:
            meta = json.loads(text)
        except ValueError as e:
            raise self._corrupted(f"its metadata is not JSON ({e}).") from e
        if not isinstance(meta, dict):
            raise self._corrupted("its metadata is not a JSON object.")
        if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
            raise bad_file(
                self.path,
                f"has format {meta.get('format')!r} version {meta.get('format_version')}; this "
                f"modelbatch reads {FORMAT!r} up to version {FORMAT_VERSION}.",
                self.owner,
            )
        for key, kind in _META_FIELDS.items():
            if not isinstance(meta.get(key), kind):
                raise self._corrupted(f"its metadata has no valid {key!r}.")
        missing = sorted(set(meta["checksums"]) - set(self.entries))
        if missing:
            raise bad_file(self.path, f"is incomplete: tensors {missing} are missing.", self.owner)
        # The checksums cover the bytes; the layout (written since format 1's
        # "layout" key) covers what the header says those bytes are.
        layout = meta.get("layout", {})
        if not isinstance(layout, dict):
            raise self._corrupted("its metadata has no valid 'layout'.")
        for name, spec in layout.items():
            entry = self.entries.get(name)
            if entry is None or [dtype_name(entry.dtype), list(entry.shape)] != spec:
                raise self._corrupted(f"its header disagrees with its metadata on {name!r}.")
        return meta

    # -------------------------------------------------------------- tensors

    def _checked(self, name: str, value: int) -> None:
        if value != self.meta["checksums"].get(name):
            raise self._corrupted(f"tensor {name!r} fails its checksum.")

    def entry(self, name: str) -> _Entry:
        """A checksummed tensor's dtype, shape and place in the file."""
        if name not in self.meta["checksums"]:
            raise self._corrupted(f"it has no checksummed tensor {name!r}.")
        return self.entries[name]

    def tensor(self, name: str) -> Tensor:
        """The whole tensor `name`, read and verified."""
        entry = self.entry(name)
        t = torch.empty(entry.shape, dtype=entry.dtype)
        if t.numel():
            self._read_into(_bytes(t), entry.begin)
        self._checked(name, crc(t))
        return t

    def verify(self, name: str) -> None:
        """Check tensor `name`'s checksum, streaming its bytes (no copy of it is kept)."""
        entry = self.entry(name)
        buffer = memoryview(bytearray(min(_CHUNK, entry.end - entry.begin)))
        value, at = 0, entry.begin
        while at < entry.end:
            part = buffer[: min(len(buffer), entry.end - at)]
            self._read_into(part, at)
            value = zlib.crc32(part, value)
            at += len(part)
        self._checked(name, value)

    def row(self, name: str, index: int) -> Tensor:
        """Slice `index` of the stacked tensor `name` `[N, ...]`; `verify(name)` first."""
        entry = self.entry(name)
        if not entry.shape or not 0 <= index < entry.shape[0]:
            raise self._corrupted(
                f"tensor {name!r} of shape {list(entry.shape)} has no row {index}."
            )
        t = torch.empty(entry.shape[1:], dtype=entry.dtype)
        if t.numel():
            self._read_into(_bytes(t), entry.begin + index * t.numel() * t.element_size())
        return t

    def read_all(self) -> dict[str, Tensor]:
        """Every checksummed tensor, read and verified."""
        return {name: self.tensor(name) for name in self.meta["checksums"]}


_META_FIELDS: dict[str, type | tuple[type, ...]] = {
    "num_models": int,
    "model_class": str,
    "tensors": dict,
    "export_keys": dict,
    "checksums": dict,
    "components": dict,
    "step": int,
}


def _bytes(t: Tensor) -> memoryview:
    """A byte view of a contiguous CPU tensor (writable for a fresh one)."""
    return t.reshape(-1).view(torch.uint8).numpy().data


def read_all(path: Path, owner: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    with CheckpointFile(path, owner) as f:
        return f.meta, f.read_all()
