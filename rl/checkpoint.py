"""Atomic, verifiable checkpoints: safetensors for tensors, JSON for everything else, a sha256 manifest.

Layout of one checkpoint::

    run_dir/checkpoints/
        step_00000100/
            lora_current.safetensors   one file per tensor group (lora_current, lora_old, optimizer, critic, ema…)
            state.json                 {"step", "rng" (captured at save), **state}: config, metrics, scheduler…
            manifest.json              sha256 + size of every file above; written last
        latest                         "step_00000100\\n", written atomically after the directory is complete

Crash safety: a checkpoint is assembled in ``step_00000100.tmp/`` (every file fsynced, the manifest last) and
renamed into place, then ``latest`` is replaced atomically. A kill at any moment leaves either a complete
checkpoint or a ``*.tmp`` directory that loading ignores (the next save deletes it). Older checkpoints are
rotated only after the new one is complete.

Loading verifies the manifest (missing file, size, sha256) and never falls back silently: if the checkpoint
asked for is broken, ``CheckpointError`` says what is wrong and names the newest earlier checkpoint that
verifies, so the user can resume from it explicitly. Only safetensors and JSON are read (no pickle).

Optimizer and LR-scheduler ``state_dict()``s round-trip bit-exactly through ``optimizer_state_to_tensors`` /
``optimizer_state_from_tensors`` (tensors to safetensors, the rest to JSON) and ``scheduler_state_to_json`` /
``scheduler_state_from_json``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "NonFiniteError",
    "assert_finite",
    "atomic_save_file",
    "atomic_write_bytes",
    "atomic_write_json",
    "capture_rng",
    "list_checkpoints",
    "load_checkpoint",
    "recover_resave",
    "optimizer_state_from_tensors",
    "optimizer_state_to_tensors",
    "resolve_checkpoint",
    "restore_rng",
    "save_checkpoint",
    "scheduler_state_from_json",
    "scheduler_state_to_json",
    "verify_checkpoint",
]

FORMAT = "stitchvm-checkpoint/1"
CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
STATE = "state.json"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_GROUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HASH_CHUNK = 1 << 20


class CheckpointError(Exception):
    """A checkpoint cannot be written or read; the message names the file and what to do."""


class NonFiniteError(RuntimeError):
    """A tensor that must be finite (a weight about to be saved, a loss) holds NaN or inf."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        step: the training step it was saved at.
        tensors: group name → {tensor name → tensor}, as passed to ``save_checkpoint``.
        state: the decoded ``state.json`` (``step``, ``rng`` and the caller's ``state``).
        path: the checkpoint directory.
    """

    step: int
    tensors: dict[str, dict[str, torch.Tensor]]
    state: dict[str, Any]
    path: Path


# ----------------------------------------------------------------------------------------------------------
# atomic files


def _fsync_dir(directory: Path) -> None:
    """Persist a rename/creation inside ``directory`` (POSIX: a rename is durable once its dir is fsynced)."""
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_path(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def _replace_durably(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        tmp.write_bytes(data)
        _replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save_file(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` through a fsynced temp file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path.name}: '{name}' is a {type(t).__name__}, not a tensor")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"{path.name}: safetensors metadata must map str to str, got {dict(metadata)!r}")
    tmp = _temp_path(path)
    try:
        # detach + contiguous: safetensors serialises raw storage and refuses strided views
        safetensors.torch.save_file(
            {k: v.detach().contiguous() for k, v in tensors.items()},
            tmp,
            metadata=dict(metadata) if metadata is not None else None,
        )
        _replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _sibling(path_dir: str, tag: str) -> str:
    """A fixed scratch name next to path_dir (.<name>.<tag>), so a killed save leaves one known directory behind."""
    parent, name = os.path.split(os.path.abspath(path_dir))
    return os.path.join(parent, f".{name}.{tag}")


def interrupted_swap(path_dir: str | os.PathLike) -> str | None:
    """The complete previous version `.<name>.old` when a swap into the missing `path_dir` was interrupted, else None.
    Read-only: readers load from it (and say so); the next write_dir_atomically of the writer moves it back."""
    path_dir = os.fspath(path_dir)
    old = _sibling(path_dir, "old")
    return old if not os.path.exists(path_dir) and os.path.isdir(old) else None


def recover_dir(path_dir: str | os.PathLike, clean: bool = True) -> bool:
    """Finish or undo a directory swap that a kill interrupted (see write_dir_atomically).

    A kill between the two renames leaves no `path_dir` but a complete previous version in `.<name>.old`: it is
    moved back (returns True and says so on stderr). A stale `.old` next to a present `path_dir`, or a half-written
    `.<name>.tmp`, is deleted (clean=True: only the one writer of `path_dir` may do that; readers pass False).
    """
    import sys

    path_dir = os.fspath(path_dir)
    old, tmp = _sibling(path_dir, "old"), _sibling(path_dir, "tmp")
    recovered = False
    if os.path.isdir(old):
        if os.path.exists(path_dir):
            if clean:
                shutil.rmtree(old)
        else:
            os.replace(old, path_dir)
            print(f"recovered {path_dir} from {old}: a save was interrupted between its renames; this is the last "
                  f"complete version", file=sys.stderr)
            recovered = True
    if clean and os.path.isdir(tmp):
        shutil.rmtree(tmp)
    return recovered


def write_manifest(directory: str | Path) -> None:
    """manifest.json of every file in `directory` (size + sha256), as checkpoints carry; verify_checkpoint reads it."""
    directory = Path(directory)
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    atomic_write_json(directory / MANIFEST, {
        "format": FORMAT, "files": {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}})


def verify_dir(directory: str | Path) -> None:
    """Check a directory written with manifest=True against its manifest.json: a truncated or corrupted file is a
    ValueError naming it, a missing one a FileNotFoundError. A directory without a manifest (written before manifests) passes unchecked."""
    directory = Path(directory)
    if (directory / MANIFEST).is_file():
        try:
            listed = json.loads((directory / MANIFEST).read_text()).get("files", {})
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{directory / MANIFEST} is not valid JSON: {e}") from None
        for name in listed:
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} is missing (listed in {MANIFEST})")
        try:
            verify_checkpoint(directory)
        except CheckpointError as e:
            raise ValueError(str(e)) from None


def write_dir_atomically(path_dir: str | os.PathLike, write, manifest: bool = False) -> None:
    """Call write(tmp_dir) on a fresh `.<name>.tmp` next to `path_dir`, then swap it into place (with
    `manifest=True`, a manifest.json of sizes and sha256 checksums is added last; see verify_dir).

    Readers see the old directory or the new one, never a half-written one. A directory cannot be os.replace'd onto
    a non-empty one, so the swap is two renames (path → .<name>.old, tmp → path); a kill between them leaves the
    previous version complete in `.old`, which `recover_dir` (called here first, and by the critic loaders) moves
    back. Only fixed scratch names are used, so killed saves never pile up copies.
    """
    path_dir = os.fspath(path_dir)
    if os.path.exists(path_dir) and not os.path.isdir(path_dir):  # never moved aside: it is not ours
        raise CheckpointError(f"{path_dir} is a file; a directory is written there: give another path")
    os.makedirs(os.path.dirname(os.path.abspath(path_dir)), exist_ok=True)
    recover_dir(path_dir)
    tmp, old = _sibling(path_dir, "tmp"), _sibling(path_dir, "old")
    os.makedirs(tmp)
    try:
        write(tmp)
        if manifest:
            write_manifest(tmp)
        for name in os.listdir(tmp):
            _fsync_file(os.path.join(tmp, name))
        _fsync_dir(Path(tmp))
        if os.path.exists(path_dir):
            os.replace(path_dir, old)
        os.replace(tmp, path_dir)
        _fsync_dir(Path(path_dir).resolve().parent)
        if os.path.exists(old):
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_file(path: str) -> None:
    if os.path.isfile(path):
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (NaN/inf are written as Python's json reads them back)."""
    try:
        text = json.dumps(obj, indent=2)
    except TypeError as e:
        raise CheckpointError(f"{Path(path).name}: not JSON-serialisable: {e}") from e
    atomic_write_bytes(path, (text + "\n").encode())


# ----------------------------------------------------------------------------------------------------------
# non-finite guard


def assert_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise ``NonFiniteError`` naming the first floating tensor in ``tensors`` with a NaN or inf."""
    for name, t in tensors.items():
        if not (t.is_floating_point() or t.is_complex()):
            continue
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            n_nan = int(torch.isnan(t).sum())
            n_bad = int((~finite).sum())
            raise NonFiniteError(
                f"{what}: tensor '{name}' {tuple(t.shape)} has {n_bad} non-finite values "
                f"({n_nan} NaN, {n_bad - n_nan} inf) out of {t.numel()}"
            )


# ----------------------------------------------------------------------------------------------------------
# state_dict <-> (tensors, JSON)
#
# A state_dict is a tree of dicts (int keys for optimizer param ids), lists, tuples, tensors and scalars.
# Tensors go to a flat {"state/0/exp_avg": tensor} dict for safetensors and are replaced in the tree by
# {"__tensor__": key}; tuples become {"__tuple__": [...]} and dicts with non-str keys {"__items__": [[k, v]...]}
# so that the decoded tree equals the original one, types included.


def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor] | None) -> Any:
    if isinstance(obj, torch.Tensor):
        if tensors is None:
            raise CheckpointError(f"'{key}' is a tensor; this state must be JSON only")
        tensors[key] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{key}/{k}" if key else k, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, key, None), _encode(v, f"{key}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    raise CheckpointError(f"'{key or '<root>'}' is a {type(obj).__name__}, which a checkpoint cannot store")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if obj.keys() == {"__tensor__"}:
            name = obj["__tensor__"]
            if name not in tensors:
                raise CheckpointError(f"state refers to tensor '{name}', which is missing from the tensor file")
            return tensors[name]
        if obj.keys() == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if obj.keys() == {"__items__"}:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def optimizer_state_to_tensors(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and a JSON-safe tree.

    Returns:
        (tensors, meta): ``tensors`` like ``{"state/0/exp_avg": ..., "state/0/step": ...}`` (CPU copies) and
        ``meta`` referencing them; ``optimizer_state_from_tensors(tensors, meta)`` rebuilds the state_dict.
    """
    tensors: dict[str, torch.Tensor] = {}
    meta = _encode(dict(state_dict), "", tensors)
    return tensors, meta


def optimizer_state_from_tensors(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of ``optimizer_state_to_tensors``: a state_dict for ``optimizer.load_state_dict``."""
    return _decode(dict(meta), tensors)


def scheduler_state_to_json(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``lr_scheduler.state_dict()`` as a JSON-safe tree (a scheduler holding tensors or callables is refused)."""
    return _encode(dict(state_dict), "", None)


def scheduler_state_from_json(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of ``scheduler_state_to_json``."""
    return _decode(dict(obj), {})


# ----------------------------------------------------------------------------------------------------------
# RNG states


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64_uint8(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def capture_rng() -> dict[str, Any]:
    """JSON-safe RNG states of Python ``random``, NumPy's global RNG, torch CPU and every CUDA device."""
    version, internal, gauss_next = random.getstate()
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": bit_generator,
            "keys": base64.b64encode(np.ascontiguousarray(keys, dtype=np.uint32).tobytes()).decode("ascii"),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch_cpu": _b64(torch.get_rng_state()),
        "torch_cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def restore_rng(state: Mapping[str, Any], cuda: bool = True) -> None:
    """Restore the states ``capture_rng`` returned.

    Args:
        state: ``capture_rng()`` output (e.g. ``checkpoint.state["rng"]``).
        cuda: restore the per-device CUDA states; a device-count mismatch is an error (resuming on a different
            number of GPUs cannot reproduce the run) — pass ``cuda=False`` to skip them knowingly.
    """
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    npst = state["numpy"]
    keys = np.frombuffer(base64.b64decode(npst["keys"]), dtype=np.uint32).copy()
    np.random.set_state((npst["bit_generator"], keys, npst["pos"], npst["has_gauss"], npst["cached_gaussian"]))
    torch.set_rng_state(_unb64_uint8(state["torch_cpu"]))
    saved_cuda = state["torch_cuda"]
    if not cuda or not saved_cuda:
        return
    n_now = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_now != len(saved_cuda):
        raise CheckpointError(
            f"the checkpoint holds RNG states for {len(saved_cuda)} CUDA device(s), this process sees {n_now}; "
            f"call restore_rng(state, cuda=False) to resume without reproducing the CUDA random streams"
        )
    torch.cuda.set_rng_state_all([_unb64_uint8(s) for s in saved_cuda])


# ----------------------------------------------------------------------------------------------------------
# save


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint dirs (a ``manifest.json`` present, not verified) of a run, oldest step first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / MANIFEST).is_file()
    ]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    state: Mapping[str, Any],
    keep: int | None = 3,
) -> Path:
    """Write ``run_dir/checkpoints/step_{step:08d}/`` atomically, update ``latest``, rotate old checkpoints.

    Args:
        run_dir: the run directory.
        step: the training step (the directory name; an existing checkpoint of the same step is replaced).
        tensors: group → {name → tensor}; one ``{group}.safetensors`` each. Every floating tensor must be finite.
            Use ``optimizer_state_to_tensors`` for optimizer state (its JSON half goes into ``state``).
        state: JSON-able values for ``state.json`` (config, metrics, scheduler, optimizer meta, data position…);
            tuples and int-keyed dicts round-trip. ``step`` and ``rng`` (``capture_rng()`` at this call) are
            added; a caller-provided ``rng`` wins.
        keep: how many checkpoints with ``step <= step`` to keep (``None`` keeps all). Checkpoints of later
            steps (left by a run that was resumed from an earlier step) are never deleted here.

    Returns:
        The checkpoint directory.

    Raises:
        NonFiniteError: a tensor holds NaN/inf (nothing is written).
        CheckpointError: bad group name, or state that JSON cannot hold.
    """
    if keep is not None and keep < 1:
        raise CheckpointError(f"keep must be >= 1 or None (keep all), got {keep}")
    if "step" in state:
        raise CheckpointError("state must not contain 'step'; save_checkpoint records it")
    for group, group_tensors in tensors.items():
        if not _GROUP_NAME.match(group) or group in ("state", "manifest"):
            raise CheckpointError(f"tensor group name '{group}' must be a plain file name other than state/manifest")
        assert_finite(group_tensors, f"checkpoint step {step}, group '{group}'")
    state_json = _encode({"step": step, "rng": capture_rng(), **state}, "", None)

    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    for p in root.glob("step_*.old.tmp"):  # before any leftover is deleted: a killed re-save's only copy
        _recover_resave(p.with_name(p.name.removesuffix(".old.tmp")))
    final = root / _step_dir_name(step)
    tmp = root / f"{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    files = {}
    for group, group_tensors in tensors.items():
        path = tmp / f"{group}.safetensors"
        atomic_save_file(group_tensors, path, metadata={"format": FORMAT, "step": str(step), "group": group})
        files[path.name] = path
    atomic_write_json(tmp / STATE, state_json)
    files[STATE] = tmp / STATE
    manifest = {
        "format": FORMAT,
        "step": step,
        "groups": list(tensors),
        "files": {name: {"size": p.stat().st_size, "sha256": _sha256(p)} for name, p in files.items()},
    }
    atomic_write_json(tmp / MANIFEST, manifest)  # last: its presence marks the directory complete
    _fsync_dir(tmp)

    if final.exists():
        # Re-saving a step (a run resumed from an earlier checkpoint): move the old one aside first, since a
        # directory cannot be os.replace'd onto a non-empty one.
        stale = root / f"{final.name}.old.tmp"
        if stale.exists():
            shutil.rmtree(stale)
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_bytes(root / LATEST, f"{final.name}\n".encode())

    _rotate(root, step, keep)
    return final


def _rotate(root: Path, step: int, keep: int | None) -> None:
    """Delete leftovers of killed saves and all but the newest ``keep`` checkpoints with step <= ``step``."""
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step_") and p.name.endswith(".tmp"):
            shutil.rmtree(p)
        elif p.is_file() and p.name.startswith(".") and p.name.endswith(".tmp"):  # from atomic_write_bytes
            p.unlink()
    if keep is None:
        return
    older = [p for p in list_checkpoints(root.parent) if int(_STEP_DIR.match(p.name).group(1)) <= step]
    for p in older[:-keep]:
        shutil.rmtree(p)


# ----------------------------------------------------------------------------------------------------------
# load


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory meant by ``path``.

    ``path`` may be a checkpoint dir (``.../step_00000100``), a run dir or its ``checkpoints/`` dir (→ what
    ``latest`` names), or a ``latest`` file. ``run_dir/latest`` is read as ``run_dir/checkpoints/latest``.
    """
    path = Path(path)
    if path.name == LATEST and not path.exists() and (path.parent / CHECKPOINTS_DIR / LATEST).is_file():
        path = path.parent / CHECKPOINTS_DIR / LATEST
    if path.is_dir() and (path / CHECKPOINTS_DIR).is_dir():
        path = path / CHECKPOINTS_DIR
    if path.is_dir() and (path / LATEST).is_file():
        path = path / LATEST
    if path.is_file() and path.name == LATEST:
        name = path.read_text().strip()
        if not _STEP_DIR.match(name):
            raise CheckpointError(f"{path} should name a checkpoint directory like step_00000100, holds {name!r}")
        return path.parent / name
    if path.is_dir() and _STEP_DIR.match(path.name):
        return path
    if _STEP_DIR.match(path.name) and _resave_dirs(path)[1].is_dir():  # a re-save killed between its renames
        return path
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the path does not exist")
    raise CheckpointError(
        f"{path} is not a checkpoint: expected a step_XXXXXXXX directory, a run directory with "
        f"checkpoints/latest, or a 'latest' file"
    )


def verify_checkpoint(ckpt_dir: str | Path) -> dict[str, Any]:
    """Check every file against ``manifest.json``; return the manifest or raise ``CheckpointError``."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint {ckpt_dir} does not exist")
    manifest_path = ckpt_dir / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{manifest_path} is not valid JSON: {e}") from e
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path}: unknown format {manifest.get('format')!r}, expected {FORMAT!r}")
    for name, expected in manifest["files"].items():
        file = ckpt_dir / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (listed in {MANIFEST})")
        size = file.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(
                f"{file} has {size} bytes, the manifest says {expected['size']} (truncated or overwritten)"
            )
        digest = _sha256(file)
        if digest != expected["sha256"]:
            raise CheckpointError(
                f"{file} is corrupt: sha256 {digest[:16]}… does not match the manifest's {expected['sha256'][:16]}…"
            )
    return manifest


def _complete(directory: Path) -> bool:
    """Whether ``directory`` is a checkpoint that verifies against its manifest."""
    try:
        verify_checkpoint(directory)
        return True
    except CheckpointError:
        return False


def _previous_good(ckpt_dir: Path) -> Path | None:
    step = int(_STEP_DIR.match(ckpt_dir.name).group(1))
    for p in reversed(list_checkpoints(ckpt_dir.parent.parent)):
        if int(_STEP_DIR.match(p.name).group(1)) < step and _complete(p):
            return p
    return None


def _resave_dirs(ckpt_dir: Path) -> tuple[Path, Path]:
    """(new, old): where save_checkpoint writes a step's new directory and moves its old one during a re-save."""
    return ckpt_dir.with_name(f"{ckpt_dir.name}.tmp"), ckpt_dir.with_name(f"{ckpt_dir.name}.old.tmp")


def _resave_source(ckpt_dir: Path) -> Path:
    """The directory that holds ``ckpt_dir``'s step: itself, or -- a re-save killed between its two renames (the
    old directory moved to ``.old.tmp``, the new one not yet moved in) -- the new one if complete, else the old."""
    new, old = _resave_dirs(ckpt_dir)
    if ckpt_dir.exists() or not _STEP_DIR.match(ckpt_dir.name) or not old.is_dir():
        return ckpt_dir
    return new if _complete(new) else old


def _recover_resave(ckpt_dir: Path) -> None:
    """Finish an interrupted re-save of ``ckpt_dir``'s step (see :func:`_resave_source`) by moving the surviving
    directory into place. Renames: only the process that writes checkpoints may call it."""
    source = _resave_source(ckpt_dir)
    if source == ckpt_dir:
        return
    os.replace(source, ckpt_dir)
    for leftover in _resave_dirs(ckpt_dir):
        shutil.rmtree(leftover, ignore_errors=True)
    _fsync_dir(ckpt_dir.parent)


def recover_resave(path: str | Path) -> None:
    """:func:`_recover_resave` for whatever ``path`` names (see :func:`resolve_checkpoint`); nothing if it names no
    checkpoint. For the main process before a resume: ``load_checkpoint`` itself only reads (every process of a run
    and ``rl.evaluate`` may load at once), from the surviving directory."""
    try:
        _recover_resave(resolve_checkpoint(path))
    except CheckpointError:
        return


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Verify and load a checkpoint (see ``resolve_checkpoint`` for what ``path`` may be).

    Raises:
        CheckpointError: nothing there, or a file missing/truncated/corrupt — naming the file and the newest
            earlier checkpoint that verifies, to resume from explicitly. There is no silent fallback.
    """
    ckpt_dir = _resave_source(resolve_checkpoint(path))
    try:
        manifest = verify_checkpoint(ckpt_dir)
    except CheckpointError as e:
        previous = _previous_good(ckpt_dir) if _STEP_DIR.match(ckpt_dir.name) else None
        hint = (
            f"; the previous good checkpoint is {previous} — resume from it explicitly by passing that path"
            if previous is not None
            else "; no earlier checkpoint of this run verifies"
        )
        raise CheckpointError(f"{e}{hint}") from e
    device = str(map_location)
    tensors = {
        group: safetensors.torch.load_file(ckpt_dir / f"{group}.safetensors", device=device)
        for group in manifest["groups"]
    }
    state = _decode(json.loads((ckpt_dir / STATE).read_text()), {})
    return Checkpoint(step=state["step"], tensors=tensors, state=state, path=ckpt_dir)
