"""The checkpoint file format: tensor encoding, checksums, RNG states, atomic writes, reading.

Private to `modelbatch.checkpoint`; nothing here knows about ModelBatch.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "META_CRC_KEY",
    "META_KEY",
    "atomic_write",
    "bad_file",
    "crc",
    "decode",
    "encode",
    "open_checkpoint",
    "read_all",
    "read_meta",
    "rng_state",
    "safetensors_module",
    "set_rng_state",
]

FORMAT = "modelbatch.checkpoint"
FORMAT_VERSION = 1
META_KEY, META_CRC_KEY = "modelbatch", "modelbatch_crc32"


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


def encode(obj: Any, prefix: str, tensors: dict[str, Tensor], where: str) -> Any:
    """A JSON value for `obj`, its tensors moved into `tensors` under `prefix/<k>`."""
    if isinstance(obj, Tensor):
        name = f"{prefix}/{len(tensors)}"
        tensors[name] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": name}
    if isinstance(obj, Mapping):
        # Pairs, not a JSON object: optimizer states are keyed by int, which JSON cannot keep.
        items = [
            [encode(k, prefix, tensors, where), encode(v, prefix, tensors, f"{where}[{k!r}]")]
            for k, v in obj.items()
        ]
        return {"__dict__": items}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, prefix, tensors, where) for v in obj]}
    if isinstance(obj, list):
        return [encode(v, prefix, tensors, where) for v in obj]
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(
        f"checkpoint.save: cannot store a {type(obj).__name__} at {where}; state dicts may "
        "hold tensors, numbers, strings, None, and lists, tuples and dicts of those."
    )


def decode(obj: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {decode(k, tensors): decode(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(decode(v, tensors) for v in obj["__tuple__"])
        if "__dtype__" in obj:
            return getattr(torch, obj["__dtype__"])
    return obj


def crc(t: Tensor) -> int:
    # zlib reads the array's buffer directly: no copy of the tensor's bytes.
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy().data)


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


def atomic_write(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    st = safetensors_module()
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"checkpoint.save: the directory {path.parent} does not exist; create it first."
        )
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


def bad_file(path: Path, problem: str, owner: str = "checkpoint.load") -> ValueError:
    return ValueError(f"{owner}: {path} {problem}")


def read_meta(path: Path, handle: Any, owner: str) -> dict[str, Any]:
    raw = handle.metadata() or {}
    if META_KEY not in raw:
        raise bad_file(
            path, "is a safetensors file but not a modelbatch checkpoint (no metadata).", owner
        )
    text = raw[META_KEY]
    if str(zlib.crc32(text.encode())) != raw.get(META_CRC_KEY):
        raise bad_file(path, "is corrupted: its metadata fails the checksum.", owner)
    meta = json.loads(text)
    if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise bad_file(
            path,
            f"has format {meta.get('format')!r} version {meta.get('format_version')}; this "
            f"modelbatch reads {FORMAT!r} up to version {FORMAT_VERSION}.",
            owner,
        )
    return meta


def open_checkpoint(path: Path, owner: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{owner}: no checkpoint file at {path}.")
    try:
        return safetensors_module().safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:
        problem = f"is not a readable checkpoint (truncated or corrupted): {e}"
        raise bad_file(path, problem, owner) from e


def read_all(path: Path, owner: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    with open_checkpoint(path, owner) as handle:
        meta = read_meta(path, handle, owner)
        missing = sorted(set(meta["checksums"]) - set(handle.keys()))
        if missing:
            raise bad_file(path, f"is incomplete: tensors {missing} are missing.", owner)
        tensors = {}
        for name in meta["checksums"]:
            try:
                tensors[name] = handle.get_tensor(name)
            except Exception as e:
                problem = f"is truncated or corrupted: cannot read {name!r} ({e})."
                raise bad_file(path, problem, owner) from e
    for name, t in tensors.items():
        if crc(t) != meta["checksums"][name]:
            raise bad_file(path, f"is corrupted: tensor {name!r} fails its checksum.", owner)
    return meta, tensors
