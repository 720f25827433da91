"""Checkpoints under concurrency and hostile files: one open per read, verified, locked writers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

from modelbatch import ModelBatch
from modelbatch.checkpoint import (
    export_best,
    export_model,
    load,
    load_model_state,
    read_checkpoint,
    save,
)

torch.set_num_threads(1)

N = 4
SRC = str(Path(__file__).resolve().parents[1] / "src")


def make_batch(seed: int = 0) -> ModelBatch:
    torch.manual_seed(seed)
    return ModelBatch([nn.Linear(6, 5) for _ in range(N)])


def weights(mb: ModelBatch) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in mb.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------- a reader racing a writer

WRITER = r"""
import os, random, sys, time
sys.path.insert(0, {src!r})
import torch
from modelbatch import ModelBatch
from modelbatch.checkpoint import save
torch.set_num_threads(1)
mb = ModelBatch([torch.nn.Linear(32, 32) for _ in range(4)])
rnd = random.Random(0)
count, end = 0, time.monotonic() + 120
while time.monotonic() < end and not os.path.exists({stop!r}):
    value = 1.0 + count % 2
    with torch.no_grad():
        for t in mb.parameters():
            t.fill_(value)
    # A header of a different length every time: a header of one file read with
    # the bytes of another would point into the wrong data.
    save({path!r}, mb, extra="x" * rnd.randrange(1, 4000), rng=False)
    count += 1
print(count)
"""


def test_a_reader_racing_a_writer_sees_one_whole_file_every_time(tmp_path):
    path, stop = tmp_path / "c.safetensors", tmp_path / "stop"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER.format(src=SRC, stop=str(stop), path=str(path))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not path.exists():
            assert writer.poll() is None and time.monotonic() < deadline, writer.stderr
            time.sleep(0.01)
        mb = ModelBatch([nn.Linear(32, 32) for _ in range(N)])
        seen = []
        for it in range(400):
            kind = it % 5
            if kind == 0:
                _, tensors = read_checkpoint(path)
                got = [tensors["model/weight"], tensors["model/bias"]]
            elif kind == 1:
                got = list(load_model_state(path, it % N).values())
            elif kind == 2:
                load(path, mb, strict=False, restore_rng=False)
                got = [p.detach() for p in mb.parameters()]
            elif kind == 3:
                out = export_model(path, it % N, tmp_path / "m.pt")
                got = list(torch.load(out, weights_only=True).values())
            else:
                (_, out), *_ = export_best(path, torch.arange(N), 2, tmp_path / "best")
                got = list(torch.load(out, weights_only=True).values())
            values = torch.cat([t.reshape(-1) for t in got]).unique().tolist()
            # One file's values, whole: every weight 1.0 or every weight 2.0.
            assert values in ([1.0], [2.0]), (kind, values[:5])
            seen.append(values[0])
    finally:
        stop.touch()
        stdout, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err.decode()
    # The race really ran: the file was replaced many times while it was read.
    assert int(stdout) >= 20 and len(set(seen)) == 2


# ---------------------------------------------------------------------- damaged and crafted files


def flip_a_weight_bit(path: Path) -> None:
    import struct

    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    start = json.loads(data[8 : 8 + header_len])["model/weight"]["data_offsets"][0]
    data[8 + header_len + start + 5] ^= 0x04
    path.write_bytes(bytes(data))


def test_every_export_path_refuses_a_bit_flipped_weight(tmp_path):
    path = tmp_path / "c.safetensors"
    mb = make_batch()
    save(path, mb)
    flip_a_weight_bit(path)
    message = "is corrupted: tensor 'model/weight' fails its checksum"
    with pytest.raises(ValueError, match=r"^checkpoint\.load_model_state: .*" + message):
        load_model_state(path, 0)
    with pytest.raises(ValueError, match=r"^checkpoint\.export_model: .*" + message):
        export_model(path, 1, tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"^checkpoint\.export_best: .*" + message):
        export_best(path, [0.1, 0.2, 0.3, 0.4], 2, tmp_path / "best")
    # Nothing was written from the damaged file.
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "best").exists()


def craft(path: Path, change) -> None:
    """Rewrite a checkpoint as an attacker would: consistent checksums, altered content."""
    import safetensors.torch as st

    meta, tensors = read_checkpoint(path)
    change(meta, tensors)
    meta["checksums"] = {
        k: zlib.crc32(t.reshape(-1).view(torch.uint8).numpy().data) for k, t in tensors.items()
    }
    meta.pop("layout", None)  # what an older writer leaves out
    text = json.dumps(meta)
    metadata = {"modelbatch": text, "modelbatch_crc32": str(zlib.crc32(text.encode()))}
    st.save_file(tensors, str(path), metadata=metadata)


def set_tensor(name, value):
    def change(meta, tensors):
        tensors[name] = value(tensors[name])

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            set_tensor("model/weight", lambda t: t[:1].clone()),
            "stores float32[1, 5, 6] as 'model/weight', where its metadata and the ModelBatch "
            "need float32[4, 5, 6]",
        ),
        (
            set_tensor("model/bias", lambda t: t.double()),
            "stores float64[4, 5] as 'model/bias'",
        ),
        (set_tensor("active", lambda t: t[:1].clone()), "stores bool[1] as 'active'"),
        (set_tensor("active", lambda t: t.to(torch.uint8)), "stores uint8[4] as 'active'"),
    ],
)
def test_load_refuses_stored_tensors_that_do_not_fit_without_broadcast_or_cast(
    tmp_path, change, message
):
    path = tmp_path / "c.safetensors"
    save(path, make_batch(0))
    craft(path, change)
    mb = make_batch(1)
    mb.retire(3)
    before = weights(mb)
    with pytest.raises(ValueError, match=r"^checkpoint\.load: .* is corrupted: ") as info:
        load(path, mb)
    assert message in str(info.value)
    assert_same(before, weights(mb))


class Holder:
    """A component whose state names a dtype."""

    def __init__(self) -> None:
        self.dtype = torch.float32

    def state_dict(self):
        return {"dtype": self.dtype, "value": torch.ones(2)}

    def load_state_dict(self, state):
        self.dtype = state["dtype"]


def test_a_dtype_name_is_decoded_from_the_table_only(tmp_path):
    path = tmp_path / "c.safetensors"
    mb = make_batch()
    holder = Holder()
    holder.dtype = torch.bfloat16
    save(path, mb, states={"holder": holder})
    fresh = Holder()
    load(path, make_batch(1), states={"holder": fresh})
    assert fresh.dtype is torch.bfloat16

    def name_torch_save(meta, tensors):
        state = meta["components"]["states/holder"]["state"]["__dict__"]
        for pair in state:
            if pair[0] == "dtype":
                pair[1] = {"__dtype__": "save"}

    craft(path, name_torch_save)
    fresh = Holder()
    with pytest.raises(ValueError, match=r"checkpoint\.load: .* unknown dtype 'save'"):
        load(path, make_batch(1), states={"holder": fresh})
    assert fresh.dtype is torch.float32


def test_a_header_that_disagrees_with_the_metadata_is_refused(tmp_path):
    import struct

    path = tmp_path / "c.safetensors"
    save(path, make_batch())
    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + header_len]
    # [4, 5, 6] float32 read as [4, 5, 3] float64: the same bytes, the same checksum.
    at = header.index(b'"model/weight":{"dtype":"F32","shape":[4,5,6]')
    new = b'"model/weight":{"dtype":"F64","shape":[4,5,3]'
    data[8 + at : 8 + at + len(new)] = new
    path.write_bytes(bytes(data))
    with pytest.raises(
        ValueError, match="its header disagrees with its metadata on 'model/weight'"
    ):
        load_model_state(path, 0)


# ---------------------------------------------------------------------- writers


def test_a_save_removes_only_the_stale_temp_files_of_its_own_target(tmp_path):
    path = tmp_path / "c.safetensors"
    stale = [
        tmp_path / ".c.safetensors.123.0badf00d.tmp",
        tmp_path / ".c.safetensors.9.12345678.tmp",
    ]
    others = [
        tmp_path / ".d.safetensors.123.0badf00d.tmp",  # another target's
        tmp_path / "c.safetensors.tmp",  # not a name save uses
        tmp_path / ".c.safetensors.x.0badf00d.tmp",
    ]
    for p in stale + others:
        p.write_bytes(b"partial")
    save(path, make_batch())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["c.safetensors", *(p.name for p in others)]
    )


SLOW_WRITER = r"""
import os, sys, time
sys.path.insert(0, {src!r})
import torch
import safetensors.torch as st
from modelbatch import ModelBatch
from modelbatch.checkpoint import save
mb = ModelBatch([torch.nn.Linear(6, 5) for _ in range(4)])
real = st.save_file
def slow(*args, **kwargs):
    open({ready!r}, "w").close()
    end = time.monotonic() + 120
    while not os.path.exists({go!r}) and time.monotonic() < end:
        time.sleep(0.01)
    real(*args, **kwargs)
st.save_file = slow
save({path!r}, mb)
print("saved")
"""


def test_a_second_writer_of_the_same_path_is_refused(tmp_path):
    path, ready, go = tmp_path / "c.safetensors", tmp_path / "ready", tmp_path / "go"
    script = SLOW_WRITER.format(src=SRC, ready=str(ready), go=str(go), path=str(path))
    first = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        mb = make_batch()
        with pytest.raises(RuntimeError, match="another writer is saving") as info:
            save(path, mb)
        assert str(path) in str(info.value) and f"{path}.lock" in str(info.value)
        save(tmp_path / "other.safetensors", mb)  # another path is free
    finally:
        go.touch()
        out, err = first.communicate(timeout=120)
    assert out.decode().strip() == "saved", err.decode()
    # The first writer's file is whole, and the path is free again.
    assert not (tmp_path / "c.safetensors.lock").exists()
    read_checkpoint(path)
    save(path, mb)
    load(path, make_batch(2))


def tensor_name(encoded, *path):
    """The stored tensor's name at `path` inside an encoded component state."""
    node = encoded
    for key in path:
        if isinstance(node, dict) and "__dict__" in node:
            node = next(v for k, v in node["__dict__"] if k == key)
        else:
            node = node[key]
    return node["__tensor__"]


@pytest.mark.parametrize(
    ("component", "path", "change", "message"),
    [
        ("scaler", ("scale",), lambda t: t.double(), "['scale'] is float64[4] in the checkpoint"),
        ("scaler", ("scale",), lambda t: t[0].clone(), "['scale'] is float32[] in the checkpoint"),
        (
            "optimizer",
            ("param_groups", 0, "hparams", "lr"),
            lambda t: t.float(),
            "['param_groups'][0]['hparams']['lr'] is float32[4] in the checkpoint, float64[4] here",
        ),
    ],
)
def test_load_refuses_component_state_it_would_cast_or_broadcast(
    tmp_path, component, path, change, message
):
    from modelbatch.amp import BatchGradScaler
    from modelbatch.optim import BatchAdam

    def build(seed):
        mb = make_batch(seed)
        opt = BatchAdam(list(mb.parameters()), [{"lr": 0.01 * (i + 1)} for i in range(N)])
        return mb, opt, BatchGradScaler(mb, init_scale=torch.tensor([2.0**k for k in range(N)]))

    mb, opt, _ = build(0)
    path_ = tmp_path / "c.safetensors"
    save(path_, mb, optimizer=opt)

    def alter(meta, tensors):
        name = tensor_name(meta["components"][component]["state"], *path)
        tensors[name] = change(tensors[name])

    craft(path_, alter)
    mb2, opt2, scaler2 = build(1)
    before, scale, lr = weights(mb2), scaler2.get_scale(), opt2.hparams["lr"].clone()
    with pytest.raises(
        ValueError, match=rf"^checkpoint\.load: .* does not match the {component}"
    ) as info:
        load(path_, mb2, optimizer=opt2)
    assert message in str(info.value)
    assert_same(before, weights(mb2))
    assert torch.equal(scaler2.get_scale(), scale) and torch.equal(opt2.hparams["lr"], lr)


def test_a_tied_model_exports_from_a_file_to_safetensors(tmp_path):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.out = nn.Linear(4, 7, bias=False)
            self.out.weight = self.emb.weight

    torch.manual_seed(0)
    models = [Tied() for _ in range(3)]
    path = tmp_path / "tied.safetensors"
    save(path, ModelBatch(models))
    from safetensors.torch import load_file

    out = export_model(path, 1, tmp_path / "m.safetensors")
    state = load_file(str(out))
    assert set(state) == {"emb.weight", "out.weight"}
    assert torch.equal(state["out.weight"], models[1].emb.weight.detach())
    assert torch.equal(state["emb.weight"], models[1].emb.weight.detach())
