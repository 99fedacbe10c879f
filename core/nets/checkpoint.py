"""Atomic writes and safetensors + JSON checkpoints. Nothing here ever unpickles."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from core.errors import CheckpointError

SCHEMA_VERSION = 1


def _umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike):
    """A binary file to write ``path`` through: a temp file in the same folder, fsynced and renamed onto ``path``
    when the block ends, removed if it raises (``path`` is then untouched)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync, then rename."""
    with atomic_open(path) as f:
        f.write(data)


STALE_SECONDS = 120  # a temp file untouched this long is no write in progress (a write takes well under a second)


def clean_stale_temps(folder: str | os.PathLike, min_age: float = STALE_SECONDS) -> list[str]:
    """Remove what a killed run of ours left in ``folder``: atomic-write temp files (``.NAME.XXXXXXXX.tmp``)
    and pending weights that their JSON does not name (a pending file the JSON names is rolled forward by the
    loader, so it is kept), each untouched for ``min_age`` seconds (another process may be writing one now).
    Returns the names removed."""
    import re
    import time

    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for f in folder.iterdir():
        stale = False
        try:
            if not f.is_file() or now - f.stat().st_mtime < min_age:
                continue
        except OSError:
            continue
        if f.is_file() and re.fullmatch(r"\..+\.[A-Za-z0-9_]{8}\.tmp", f.name):
            stale = True
        elif f.is_file() and f.name.endswith(".pending.safetensors"):
            config = folder / (f.name[: -len(".pending.safetensors")] + ".json")
            try:
                named = read_json(config).get("weights_sha256") if config.is_file() else None
            except Exception:  # noqa: BLE001 - an unreadable config cannot name the pending file
                named = None
            stale = named is None or named != _sha256(f)
        if stale:
            try:
                f.unlink()
                removed.append(f.name)
            except OSError:
                pass
    return removed


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``): at every instant each name
    holds one complete folder. False where the system or file system cannot (then nothing moved)."""
    import ctypes
    import errno
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False  # a C library without renameat2 (glibc < 2.28)
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _keep_extras(out: Path, tmp: Path) -> None:
    """Hard-link (or copy) into ``tmp`` every entry of ``out`` that ``tmp`` does not hold, so a swap keeps them."""
    import shutil

    for f in out.iterdir():
        dst = tmp / f.name
        if os.path.lexists(dst):
            continue
        if f.is_dir() and not f.is_symlink():
            shutil.copytree(f, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(f, dst)


def _link_or_copy(src, dst) -> None:
    import shutil

    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def commit_folder(out: str | os.PathLike, write, last: str | None = None) -> Path:
    """Call ``write(tmp)`` on a temp folder beside ``out`` (beside its real path, so on its file system),
    then make it ``out``: one rename when ``out`` does not exist; otherwise the entries of ``out`` that the new
    folder does not hold are linked into it and the two folders are swapped in one atomic step
    (``exchange_paths``), so a kill at any instant leaves ``out`` the complete old folder or the complete new
    one; the old one is then removed (a kill before that leaves it as a ``.OUT.XXXXXXXX`` temp folder, which
    ``clean_stale_folders`` sweeps). Where the system cannot swap, ``last`` is removed from ``out`` first, every
    new file is moved in with ``os.replace`` and ``last`` goes in at the end, so ``out`` never holds a valid mix
    of old and new files (a bundle's manifest names every file's sha256), though a kill mid-way leaves no valid
    bundle until the next run. A failure inside ``write`` removes the temp folder and leaves ``out`` as it was.
    The folder gets the usual permissions (umask), not mkdtemp's 0700."""
    import shutil

    out = Path(os.path.realpath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        write(tmp)
        if not out.exists():
            os.replace(tmp, out)
            return out
        written = sorted((f.name for f in tmp.iterdir()), key=lambda name: name == last)
        if out.is_dir():
            _keep_extras(out, tmp)
            if exchange_paths(tmp, out):
                return out  # tmp now holds the old folder: removed below
        if last is not None:  # no swap here: file by file, ``last`` out first and in last
            (out / last).unlink(missing_ok=True)
        for name in written:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def clean_stale_folders(out: str | os.PathLike, min_age: float = STALE_SECONDS) -> list[str]:
    """Remove the temp folders (``.OUT.XXXXXXXX`` beside ``out``) that a killed ``commit_folder`` left, each
    untouched (itself and its files) for ``min_age`` seconds. Returns the names removed."""
    import re
    import shutil
    import time

    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    pattern = re.compile(re.escape(f".{out.name}.") + r"[A-Za-z0-9_]{8}")
    now = time.time()
    for d in out.parent.iterdir():
        try:
            if not (d.is_dir() and not d.is_symlink() and pattern.fullmatch(d.name)):
                continue
            newest = max([d.stat().st_mtime] + [f.stat().st_mtime for f in d.iterdir()])
        except OSError:
            continue
        if now - newest >= min_age:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d.name)
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON object, turning a missing or malformed file into a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file: {path}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return obj


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Save a flat dict of tensors as safetensors, atomically; returns the file's sha256."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = st_save(flat, metadata=metadata)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def save_tensors_streamed(path: str | os.PathLike, tensors: dict[str, torch.Tensor], streamed: dict[str, Path]) -> str:
    """``save_tensors`` for a file too large to assemble in memory: ``tensors`` as usual plus, for each name in
    ``streamed``, a uint8 (n,) tensor whose n bytes are a file's contents, copied into place in blocks (the
    safetensors layout: 8-byte header length, JSON header of dtypes, shapes and offsets, then the data). Atomic;
    returns the file's sha256."""
    import json as _json

    path = Path(path)
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    if sys.byteorder != "little":
        raise RuntimeError("save_tensors_streamed writes native bytes; safetensors is little-endian")
    order = sorted(flat, key=lambda k: (-flat[k].element_size(), k))  # widest first, as safetensors lays them out,
    # so every tensor starts aligned to its element size (the header ends 8-byte aligned)
    header, offset = {}, 0
    for k in order:
        t = flat[k]
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"{k}: dtype {t.dtype} is not one of {sorted(str(d) for d in _ST_DTYPES)}")
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    for k in sorted(streamed):
        if k in flat:
            raise ValueError(f"{k}: given both as a tensor and as a streamed file")
        n = os.path.getsize(streamed[k])
        header[k] = {"dtype": "U8", "shape": [n], "data_offsets": [offset, offset + n]}
        offset += n
    head = _json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    digest = hashlib.sha256()
    with atomic_open(path) as f:
        def put(b: bytes) -> None:
            f.write(b)
            digest.update(b)

        put(len(head).to_bytes(8, "little"))
        put(head)
        for k in order:
            if flat[k].numel():
                put(flat[k].reshape(-1).view(torch.uint8).numpy().tobytes())
        for k in sorted(streamed):
            with open(streamed[k], "rb") as src:
                while block := src.read(1 << 24):
                    put(block)
    return digest.hexdigest()


def save_weights_and_config(folder: str | os.PathLike, stem: str, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Commit a weights + config pair so that a crash at any moment leaves a loadable pair:
    STEM.pending.safetensors, then STEM.json (carrying the new weights' sha256), then the rename of the
    pending file to STEM.safetensors. A crash before the JSON keeps the old pair; a crash between the JSON
    and the rename is rolled forward by the loader (the pending file is the one the JSON names)."""
    folder = Path(folder)
    pending = folder / f"{stem}.pending.safetensors"
    digest = save_tensors(pending, tensors)
    atomic_write_json(folder / f"{stem}.json", {**config, "weights_sha256": digest})
    os.replace(pending, folder / f"{stem}.safetensors")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_weights_for(module: torch.nn.Module, folder: str | os.PathLike, stem: str, config: dict) -> torch.nn.Module:
    """Load STEM.safetensors into ``module`` after checking it is the file STEM.json was written with."""
    path = Path(folder) / f"{stem}.safetensors"
    expected = config.get("weights_sha256")
    pending = Path(folder) / f"{stem}.pending.safetensors"
    if expected is not None and pending.is_file() and (not path.is_file() or _sha256(path) != expected) \
            and _sha256(pending) == expected:
        try:  # a save interrupted between its JSON and its rename: finish it
            os.replace(pending, path)
        except OSError:
            path = pending  # a read-only folder: load the committed weights where they are
    state = load_tensors(path)
    check_state_dict(module, state, str(path))  # first, so a damaged file names its bad key
    if expected is not None and _sha256(path) != expected:
        raise CheckpointError(f"{path} does not match {stem}.json (an interrupted save?); save again or restore both files")
    module.load_state_dict(state, strict=True)
    return module


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file on the CPU; any damage becomes a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file: {path}")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: only .safetensors weights are loaded (pickle-based files are refused)")
    try:
        return st_load(path.read_bytes())
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from None


def check_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped key."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing:
        raise CheckpointError(f"{source}: missing key {missing[0]!r} ({len(missing)} missing)")
    if extra:
        raise CheckpointError(f"{source}: unexpected key {extra[0]!r} ({len(extra)} unexpected)")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: key {k!r} has shape {tuple(state[k].shape)}, model expects {tuple(v.shape)}")
        if not torch.isfinite(state[k]).all() and state[k].is_floating_point():
            raise CheckpointError(f"{source}: key {k!r} holds non-finite values")


def load_into(module: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Validate every key of a safetensors file against ``module`` first, then load it (never half-loaded)."""
    state = load_tensors(path)
    check_state_dict(module, state, str(path))
    module.load_state_dict(state, strict=True)
    return module


def check_schema(config: dict, source: str, kind: str) -> None:
    """Refuse configs of another schema version or kind, naming the file."""
    version = config.get("schema")
    if version != SCHEMA_VERSION:
        raise CheckpointError(f"{source}: schema version {version!r} is not supported (this version reads {SCHEMA_VERSION})")
    if config.get("kind") != kind:
        raise CheckpointError(f"{source}: holds a {config.get('kind')!r} checkpoint, expected {kind!r}")
