"""Bad and unusual checkpoint files (issue 15): each is a clear, named CheckpointError or loads correctly;
never a traceback, a hang on a FIFO, or a silently corrupt model."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import stat
import tempfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from krakenlm.checkpoint import detect_format, load_config, load_model, save_checkpoint, write_manifest
from krakenlm.config import ModelConfig
from krakenlm.errors import CheckpointError, ConfigError, ResourceError
from krakenlm.source import build_model
from tests.conftest import tiny
from tests.reference_kraken import ReferenceKraken

AUTHORS_ARGS = {"n_layer": 2, "n_head": 4, "n_heads_in_split": 2, "n_embd": 32, "ffn_expansion": 2, "bias": False,
                "block_size": 64, "vocab_size": 100}


def authors_checkpoint(path: Path, **extra) -> ReferenceKraken:
    """What the Kraken authors' train.py writes (a DDP run: best_val_loss is a numpy scalar)."""
    ref = ReferenceKraken(n_layer=2, n_sub=2, d=32, heads_per_sub=2, vocab=100, block=64).eval()
    state = dict(ref.state_dict())
    state["lm_head.weight"] = state["transformer.wte.weight"]
    doc = {"model": state, "model_args": dict(AUTHORS_ARGS), "optimizer": {}, "iter_num": np.int64(5),
           "best_val_loss": np.float32(3.25), "config": {"learning_rate": np.float64(6e-4)}} | extra
    torch.save(doc, path)
    return ref


def native(tmp_path: Path, name: str = "ck") -> Path:
    model = build_model(config=tiny("gpt"), seed=0)
    return save_checkpoint(tmp_path / name, model, model.config)


def rewrite_weights(path: Path, change) -> None:
    """Edit a native checkpoint's tensors and re-seal its manifest (as a user editing it by hand would)."""
    from safetensors.torch import load_file

    state = load_file(str(path / "model.safetensors"))
    change(state)
    save_file(state, str(path / "model.safetensors"))
    write_manifest(path)


def finishes(fn, seconds: float = 20.0):
    """Run fn in a thread; fail (instead of hanging the suite) if it blocks."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001  (handed back to the test)
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"blocked for more than {seconds} s"
    if "error" in box:
        raise box["error"]
    return box.get("value")


# The authors' files -----------------------------------------------------------------------------------------
def test_authors_ddp_checkpoint_with_numpy_scalars_loads(tmp_path):
    ref = authors_checkpoint(tmp_path / "ckpt.pt")
    model = load_model(tmp_path / "ckpt.pt")
    idx = torch.randint(0, 100, (2, 20))
    with torch.no_grad():
        assert (model(idx) - ref(idx)).abs().max() < 1e-5


def _as_numpy1(src: Path, dst: Path) -> None:
    """The same file as numpy 1.x writes it (its scalar constructor lives at numpy.core.multiarray)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray\nscalar" in data
                data = data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
            zout.writestr(info.filename, data)


def test_numpy1_module_path_loads_too(tmp_path):
    authors_checkpoint(tmp_path / "v2.pt")
    _as_numpy1(tmp_path / "v2.pt", tmp_path / "v1.pt")
    assert load_config(tmp_path / "v1.pt") == load_config(tmp_path / "v2.pt")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_arbitrary_object_still_refused_naming_the_global(tmp_path, capfd):
    torch.save({"model": {}, "model_args": {}, "best_val_loss": np.float32(1), "payload": Evil()}, tmp_path / "e.pt")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "e.pt")
    message = str(err.value)
    assert "refused" in message and "system" in message and "\x1b" not in message and "\n" not in message
    assert "pwned" not in capfd.readouterr().out
    (tmp_path / "arr.pt").write_bytes(b"")
    torch.save({"model": {}, "model_args": {}, "array": np.zeros(3)}, tmp_path / "arr.pt")  # arrays: not scalars
    with pytest.raises(CheckpointError, match="refused"):
        load_model(tmp_path / "arr.pt")


def test_run_directory_with_one_ckpt_pt_is_accepted(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    authors_checkpoint(out / "ckpt.pt")
    assert detect_format(out) == "kraken-authors"
    assert load_model(out).config.n_sub == 2
    authors_checkpoint(out / "ckpt_best.pt")
    with pytest.raises(CheckpointError, match="several .pt files.*ckpt.pt"):
        load_model(out)


@pytest.mark.parametrize("change,field", [({"n_heads_in_split": 0}, "n_heads_in_split"),
                                          ({"n_heads_in_split": 3}, "n_heads_in_split"),
                                          ({"n_layer": 2.7}, "n_layer"), ({"n_embd": "32"}, "n_embd"),
                                          ({"bias": "no"}, "bias")])
def test_bad_model_args_name_the_field(tmp_path, change, field):
    authors_checkpoint(tmp_path / "k.pt", model_args=AUTHORS_ARGS | change)
    with pytest.raises(CheckpointError, match=field):
        load_model(tmp_path / "k.pt")


@pytest.mark.parametrize("content", [b"hello world\n" * 20, b"", b"\x80\x02}q\x00.", b"PK\x03\x04garbage"])
def test_not_a_torch_file_is_named(tmp_path, content):
    (tmp_path / "x.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"x\.pt: .*(not a readable|corrupt|unreadable)"):
        load_model(tmp_path / "x.pt")


def test_corrupted_zip_records_are_detected(tmp_path):
    authors_checkpoint(tmp_path / "k.pt", best_val_loss=3.25, iter_num=5, config={})
    load_model(tmp_path / "k.pt")
    data = (tmp_path / "k.pt").read_bytes()
    rng = np.random.default_rng(0)
    refused = 0
    for _ in range(15):
        flipped = bytearray(data)
        pos = int(rng.integers(len(data)))
        flipped[pos] ^= 1 << int(rng.integers(8))
        (tmp_path / "f.pt").write_bytes(bytes(flipped))
        try:
            load_model(tmp_path / "f.pt")
        except CheckpointError:
            refused += 1
    assert refused == 15


# Native files --------------------------------------------------------------------------------------------------
def test_every_saved_checkpoint_carries_checksums_and_bit_flips_are_refused(tmp_path):
    path = native(tmp_path)
    assert (path / "manifest.json").is_file()
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) - 5] ^= 0x10  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors does not match its checksum"):
        load_model(path)
    path = native(tmp_path, "ck2")
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        load_model(path)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_and_bool_tensors_are_refused_by_name(tmp_path, dtype):
    path = native(tmp_path)
    rewrite_weights(path, lambda s: s.__setitem__("wte.weight", s["wte.weight"].to(dtype)))
    with pytest.raises(CheckpointError, match=f"wte.weight has dtype {dtype}"):
        load_model(path)


def test_bf16_tensor_in_fp32_file_loads_as_fp32(tmp_path):
    path = native(tmp_path)
    rewrite_weights(path, lambda s: s.__setitem__("ln_f.weight", s["ln_f.weight"].bfloat16()))
    model = load_model(path)
    assert {p.dtype for p in model.state_dict().values()} == {torch.float32}
    assert torch.isfinite(model(torch.randint(0, 257, (1, 9)))).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, bad):
    path = native(tmp_path)
    rewrite_weights(path, lambda s: s["layers.1.mlp.up_weight"].view(-1).__setitem__(7, bad))
    with pytest.raises(CheckpointError, match="layers.1.mlp.up_weight holds NaN or Inf"):
        load_model(path)
    state = {"transformer.wte.weight": torch.full((100, 32), bad)}
    torch.save({"model": state, "model_args": AUTHORS_ARGS}, tmp_path / "k.pt")
    with pytest.raises(CheckpointError, match="wte.weight holds NaN or Inf"):
        load_model(tmp_path / "k.pt")


@pytest.mark.parametrize("field", ["n_layer", "n_embd", "vocab_size", "block_size", "bias", "norm_eps"])
def test_native_config_must_state_every_field(tmp_path, field):
    path = native(tmp_path)
    doc = json.loads((path / "config.json").read_text())
    del doc["config"][field]
    (path / "config.json").write_text(json.dumps(doc))
    write_manifest(path)
    with pytest.raises(CheckpointError, match=f"missing field.*{field}"):
        load_model(path)


def test_absurd_config_refused_with_the_numbers_before_building(tmp_path):
    with pytest.raises(ResourceError, match=r"needs at least [\d,.]+ GiB but .* has [\d,.]+ GiB available"):
        finishes(lambda: build_model(config=tiny("gpt", n_layer=10**12)))
    path = native(tmp_path)
    doc = json.loads((path / "config.json").read_text())
    doc["config"]["n_layer"] = 10**12
    (path / "config.json").write_text(json.dumps(doc))
    write_manifest(path)
    with pytest.raises(ResourceError, match="GiB"):
        finishes(lambda: load_model(path))


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1e-5, "1e-5", True])
def test_norm_eps_must_be_a_finite_positive_number(value):
    with pytest.raises(ConfigError, match="norm_eps"):
        tiny("gpt", norm_eps=value)


def test_user_config_json_must_state_the_size_fields(tmp_path):
    fields = tiny("gpt").to_dict()
    del fields["n_layer"]
    (tmp_path / "c.json").write_text(json.dumps(fields))
    with pytest.raises(ConfigError, match="missing field.*n_layer"):
        ModelConfig.from_json(tmp_path / "c.json")


# Files that are not what they claim to be -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "manifest.json"])
def test_fifo_in_a_checkpoint_is_refused_without_blocking(tmp_path, name):
    path = native(tmp_path)
    (path / name).unlink()
    os.mkfifo(path / name)
    with pytest.raises(CheckpointError, match=f"{name}: is a FIFO, not a regular file"):
        finishes(lambda: load_model(path))


def test_fifo_or_directory_as_pt_file_is_refused(tmp_path):
    os.mkfifo(tmp_path / "k.pt")
    with pytest.raises(CheckpointError, match="is a FIFO"):
        finishes(lambda: load_model(tmp_path / "k.pt"))
    with pytest.raises(CheckpointError, match="is a device"):
        finishes(lambda: load_model("/dev/zero"))


def test_safetensors_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = native(tmp_path)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()}
    assert modes == {"config.json": 0o644, "model.safetensors": 0o644, "manifest.json": 0o644}


class unprivileged:
    """Run the block as user nobody when root (root reads everything, so permissions would not apply)."""

    def __enter__(self):
        self.root = os.geteuid() == 0
        if self.root:
            os.setegid(65534)
            os.seteuid(65534)

    def __exit__(self, *exc):
        if self.root:
            os.seteuid(0)
            os.setegid(0)


def test_unreadable_files_and_folders_say_permission_denied():
    base = Path(tempfile.mkdtemp(prefix="krakenlm-perm-"))
    try:
        base.chmod(0o755)
        model = build_model(config=tiny("gpt"), seed=0)
        locked_dir = save_checkpoint(base / "locked", model, model.config)
        locked_file = save_checkpoint(base / "file", model, model.config)
        torch.save({"model": {}, "model_args": AUTHORS_ARGS}, base / "k.pt")
        (locked_file / "model.safetensors").chmod(0o000)
        (base / "k.pt").chmod(0o000)
        locked_dir.chmod(0o000)
        for path in (locked_dir, locked_file, base / "k.pt", locked_dir / "model.safetensors"):
            with unprivileged(), pytest.raises(CheckpointError, match=f"{re.escape(str(path))}.*: permission denied"):
                load_model(path)
    finally:
        locked_dir.chmod(0o755)
        shutil.rmtree(base)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_refusal_is_one_line_through_the_cli(tmp_path, capsys):
    from krakenlm.cli import main

    (tmp_path / "x.pt").write_bytes(pickle.dumps(Evil()))
    assert main(["generate", "--checkpoint", str(tmp_path / "x.pt"), "--prompt", "a"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "x.pt" in err and "\x1b" not in err


def test_format_1_checkpoint_without_manifest_loads_with_a_warning(tmp_path):
    """Checkpoints written before manifests were part of the format still load, saying they cannot be verified."""
    path = native(tmp_path)
    doc = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(doc | {"format_version": 1}))
    (path / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="without checksums"):
        assert load_model(path).config == tiny("gpt")
