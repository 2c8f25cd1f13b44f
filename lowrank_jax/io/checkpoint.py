"""Training checkpoints of adapter + optimizer state + PRNG state, with orbax-checkpoint.

:class:`TrainCheckpointer` wraps an ``orbax.checkpoint.CheckpointManager``. Each step directory holds
two orbax items:

* ``state`` (``StandardSave``): a *plain* dict of arrays —
  ``{"adapter": {"node_0000": {"a": …, "b": …}, …}, "opt_state": {"leaf_00000": …, …}, "rng": uint32[…]}``.
  ``AdapterParams`` and optax's named tuples are custom pytree nodes, so they are flattened to
  index-named dicts that any orbax version stores;
* ``meta`` (``JsonSave``): the step's description — the adapter nodes exactly as in ``adapter.json``
  (method class and fields, layout, kernel shape/dtype, shared name, array shapes), the
  ``/``-joined path, shape and dtype of every optimizer-state leaf, the PRNG kind (typed key with its
  implementation name, or raw ``uint32`` key data), the user's JSON ``extra``, the sha256 of every
  saved array's bytes (``checksums``) and the sha256 of the description itself (``checksum``).

The frozen base is never saved. Restoring needs ``*_like`` trees (concrete arrays or
``jax.ShapeDtypeStruct`` with ``sharding``) and restores each array straight onto the sharding of its
counterpart (orbax ``StandardRestore`` with abstract arrays), then rebuilds the original tree
structures from the ``*_like`` tree definitions. Structure, shape and dtype mismatches are reported with
the offending path before any array is read.

**A save lands or raises.** :meth:`TrainCheckpointer.save` never drops a step silently:

* a step that already exists raises :class:`CheckpointRefusedError` unless ``overwrite=True``;
* a step lower than the latest raises unless ``discard_newer=True`` (a later :meth:`restore` would
  otherwise resume from the newer step, not from this one);
* a directory that holds committed steps of another run (its run id is in ``_lowrank_jax_run.json``)
  is refused until this checkpointer continues that run: :meth:`restore` from it first, or open it
  with its ``run_id``;
* orbax options that skip saves on their own (``save_interval_steps``, ``save_decision_policy``, …)
  are not accepted: decide in the training loop when to call :meth:`save`.

Replacing steps is crash-safe: the steps being replaced are renamed aside (and a
``_lowrank_jax_pending.json`` record written) before the new step is saved, and deleted only once it
has landed; a checkpointer opened after a crash finishes or undoes the replacement.

**One writer per directory.** An open writing checkpointer holds ``_lowrank_jax.lock`` (created with
``O_CREAT | O_EXCL``, holding pid, host and process start time). A second writer — another process,
or another open checkpointer in this process — gets :class:`CheckpointLockedError`. A lock whose
process is dead on this host (or whose pid now belongs to another process) is stale and taken over
with a :class:`CheckpointWarning`; a lock from another host cannot be checked and must be deleted by
hand. Readers open with ``read_only=True`` (no lock, never write or delete anything).

**Integrity.** Every restored array's sha256 is compared with the one recorded at save, and the
description's own checksum and the shapes orbax stored are checked before any array is read; a
damaged step raises :class:`CheckpointCorruptError` naming the step and the array.
``restore(..., fallback=True)`` instead goes to the newest intact older step, with a warning.

**Leftovers of a killed save** (orbax ``*.orbax-checkpoint-tmp*`` directories, moved-aside stale
locks, temporary files) are never listed by :meth:`TrainCheckpointer.all_steps` nor restored; a writer
deletes them when it opens the directory and names them in a :class:`CheckpointWarning`;
:meth:`TrainCheckpointer.leftovers` lists them for readers.

Multi-process (multi-host) jobs: only process 0 takes the lock and writes the run and pending
records; arrays that are not fully addressable are saved without checksum (not verified on restore).

Example::

    ckpt = lowrank_jax.io.TrainCheckpointer("/tmp/run1", max_to_keep=3)
    ckpt.save(step, adapter, opt_state, rng=key, extra={"epoch": 2})
    …
    step, adapter, opt_state, key, extra = ckpt.restore(adapter_like=adapter0, opt_state_like=opt_state0)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
import warnings
import weakref
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from lowrank_jax.adapter import AdapterParams
from lowrank_jax.io import _format as fmt
from lowrank_jax.tree import path_str

__all__ = ["TrainCheckpointer", "CheckpointRefusedError", "CheckpointLockedError", "CheckpointCorruptError",
           "CheckpointWarning", "RUN_FILE", "LOCK_FILE"]

_META_FORMAT = "lowrank_jax.train_checkpoint"
_META_VERSION = 2  # 2: per-array sha256 "checksums" and the description's own "checksum"
_RUN_FORMAT = "lowrank_jax.train_run"
_LOCK_FORMAT = "lowrank_jax.lock"

RUN_FILE = "_lowrank_jax_run.json"
"""Name of the file in a checkpoint directory that records which run its steps belong to."""
LOCK_FILE = "_lowrank_jax.lock"
"""Name of the lock file an open writing :class:`TrainCheckpointer` holds in its directory."""
_PENDING_FILE = "_lowrank_jax_pending.json"
_ASIDE_PREFIX = "_lowrank_jax_aside-"
_STALE_PREFIX = LOCK_FILE + ".stale-"
_ORBAX_TMP = ".orbax-checkpoint-tmp"
_UNREADABLE_LOCK_GRACE_S = 10.0

# Options that make orbax skip a save by itself, or rename step directories, or that this class sets.
_REFUSED_OPTIONS = {
    "save_interval_steps": "orbax would skip steps silently; call save() only on the steps to keep",
    "save_on_steps": "orbax would skip steps silently; call save() only on the steps to keep",
    "save_decision_policy": "orbax would skip steps silently; call save() only on the steps to keep",
    "should_save_fn": "orbax would skip steps silently; call save() only on the steps to keep",
    "step_prefix": "step directories must be named by their number",
    "step_format_fixed_length": "step directories must be named by their number",
    "step_name_format": "step directories must be named by their number",
    "read_only": "use TrainCheckpointer(..., read_only=True)",
    "create": "the directory is always created for writing",
    "cleanup_tmp_directories": "leftovers are always removed by a writer (and named in a warning)",
    "enable_async_checkpointing": "use TrainCheckpointer(..., async_save=True)",
}


class CheckpointRefusedError(RuntimeError):
    """A save that cannot land as asked (existing or older step, another run's directory, read-only).

    The message names the directory and step and says what to do instead.
    """


class CheckpointLockedError(CheckpointRefusedError):
    """Another writer holds the directory's :data:`LOCK_FILE` (message: its pid, host and the file)."""


class CheckpointCorruptError(ValueError):
    """A step failed verification (checksum, description or stored shapes) or could not be read.

    The message names the step directory and the array or file. ``restore(..., fallback=True)``
    falls back to the newest intact older step instead of raising.
    """


class CheckpointWarning(UserWarning):
    """Something was repaired or skipped: a stale lock taken over, leftovers of a killed save
    removed, an interrupted step replacement finished or undone, a corrupted step skipped by
    ``restore(..., fallback=True)``."""


# ------------------------------------------------------------------------------------- lock file

_HELD: set[str] = set()  # tokens of the locks held by open TrainCheckpointers of this process


def _start_time(pid: int) -> str | None:
    """Start time of process ``pid`` (``/proc/<pid>/stat`` field 22), to tell a reused pid; ``None`` if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _lock_info(raw: bytes, where: str) -> dict[str, Any]:
    info = fmt.load_json(raw, where)
    if not isinstance(info, dict) or info.get("format") != _LOCK_FORMAT:
        raise ValueError(f"{where}: not a lowrank_jax lock file")
    fmt.json_int(info.get("pid"), where, "pid", lo=1)
    fmt.json_str(info.get("host"), where, "host")
    fmt.json_str(info.get("token"), where, "token")
    return info


def _holder_alive(info: Mapping[str, Any]) -> bool | None:
    """``True``/``False`` for a lock of this host, ``None`` when it comes from another host."""
    if info["host"] != socket.gethostname():
        return None
    pid = info["pid"]
    if pid == os.getpid():
        return info["token"] in _HELD
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    start = info.get("start")
    now = _start_time(pid)
    return not (start is not None and now is not None and now != start)


def _describe_holder(info: Mapping[str, Any]) -> str:
    return f"pid {info['pid']} on host {info['host']!r} (since {info.get('since', '?')})"


def _break_if_stale(path: Path) -> None:
    """Raise :class:`CheckpointLockedError` if the lock at ``path`` is live; remove it if it is stale."""
    try:
        raw, mtime = path.read_bytes(), path.stat().st_mtime
    except FileNotFoundError:
        return
    directory = path.parent
    try:
        info: dict[str, Any] | None = _lock_info(raw, str(path))
    except ValueError:
        if time.time() - mtime < _UNREADABLE_LOCK_GRACE_S:
            raise CheckpointLockedError(f"{directory}: another TrainCheckpointer is taking the lock {path} right "
                                        "now; only one writer may use a directory") from None
        info = None
    if info is not None:
        alive = _holder_alive(info)
        if alive is None:
            raise CheckpointLockedError(
                f"{directory}: locked by a TrainCheckpointer of {_describe_holder(info)}, which cannot be checked "
                f"from this host; only one writer may use a directory. Close that one (or open this one with "
                f"read_only=True); if it is no longer running, delete {path}")
        if alive:
            where = "this process" if info["pid"] == os.getpid() else _describe_holder(info)
            raise CheckpointLockedError(
                f"{directory}: already open for writing by a TrainCheckpointer of {where} (lock file {path}); only "
                "one writer may use a directory. Close that one first, open this one with read_only=True to "
                "read, or use another directory")
    aside = path.with_name(f"{_STALE_PREFIX}{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if aside.read_bytes() != raw:  # replaced by a new writer between our read and the rename: put it back
        try:
            os.link(aside, path)
        except FileExistsError:  # pragma: no cover - a third writer won the race
            pass
        aside.unlink()
        return
    aside.unlink()
    who = _describe_holder(info) if info is not None else "an unreadable lock file"
    warnings.warn(f"{directory}: took over the stale lock of {who}, which is no longer running; a save it had "
                  "in progress was interrupted (its leftovers are cleaned up next)", CheckpointWarning, stacklevel=4)


def _acquire_lock(directory: Path) -> str:
    path = directory / LOCK_FILE
    token = uuid.uuid4().hex
    me = {"format": _LOCK_FORMAT, "pid": os.getpid(), "host": socket.gethostname(),
          "start": _start_time(os.getpid()), "token": token, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _break_if_stale(path)
            continue
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(me).encode())
            f.flush()
            os.fsync(f.fileno())
        _HELD.add(token)
        return token
    raise CheckpointLockedError(f"{directory}: could not take the lock {path}: other writers keep taking it")


def _release_lock(path: str, token: str) -> None:
    """Delete the lock file at ``path`` if it still holds ``token`` (runs at close, GC or interpreter exit)."""
    _HELD.discard(token)
    try:
        info = json.loads(Path(path).read_bytes())
    except (OSError, ValueError):
        return
    if isinstance(info, dict) and info.get("token") == token:
        try:
            os.unlink(path)
        except FileNotFoundError:  # pragma: no cover
            pass


# ------------------------------------------------------------------------------------- arrays

def _leaf_abstract(x: Any, default_sharding: jax.sharding.Sharding) -> jax.ShapeDtypeStruct:
    if isinstance(x, jax.ShapeDtypeStruct):
        if getattr(x, "sharding", None) is None:
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default_sharding)
        return x
    if isinstance(x, jax.Array):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            raise TypeError("typed PRNG keys inside the optimizer state are not supported")
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    arr = np.asarray(x)
    return jax.ShapeDtypeStruct(arr.shape, arr.dtype, sharding=default_sharding)


def _describe_leaves(tree: Any) -> tuple[list[dict[str, Any]], list[Any], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    desc = [{"path": path_str(p), "shape": [int(s) for s in np.shape(v)],
             "dtype": fmt.dtype_name(v.dtype if hasattr(v, "dtype") else np.asarray(v).dtype)} for p, v in leaves]
    return desc, [v for _, v in leaves], treedef


def _flat(state: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"adapter/node_0000/a": x, "opt_state/leaf_00000": y, "rng": z}`` of the nested state dict."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _sha256(x: Any) -> str | None:
    """sha256 of the array's bytes (C order); ``None`` for arrays spread over several processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    arr = np.ascontiguousarray(np.asarray(x)).reshape(-1)
    return hashlib.sha256(arr.view(np.uint8)).hexdigest()


def _np_dtype(name: str) -> Any:
    import jax.numpy as jnp
    return jnp.dtype(name)


# ------------------------------------------------------------------------------------- checkpointer

class TrainCheckpointer:
    """Save/restore ``(step, adapter, opt_state, rng, extra)`` under ``directory`` with orbax.

    See the module docstring for the guarantees (a save lands or raises, one writer per directory,
    verified restores, cleanup after a crash).

    Args:
      directory: root of the step directories (created if missing, unless ``read_only``).
      max_to_keep: keep only the newest this-many steps (``None``: keep all).
      run_id: name of the run this checkpointer writes. A new directory records it in
        :data:`RUN_FILE` (default: a random id); a directory with committed steps of another run id
        is refused at once with :class:`CheckpointRefusedError`; passing the directory's own run id
        continues that run. Otherwise (``run_id=None``, or a directory without :data:`RUN_FILE`)
        a directory holding steps is continued once :meth:`restore` has read from it, and
        :meth:`save` refuses until then.
      async_save: let orbax write in a background thread (call :meth:`wait_until_finished` before
        reading the files); default ``False``: :meth:`save` returns when the step is committed.
      read_only: open for reading only: no lock, nothing is ever written, renamed or deleted, and
        :meth:`save` raises. Use it to read a directory another process is writing.
      options: extra keyword arguments for ``ocp.CheckpointManagerOptions`` (those that would skip
        saves or rename step directories are refused with a ``TypeError``).

    Raises:
      CheckpointLockedError: another writer holds the directory.
      CheckpointRefusedError: ``run_id`` differs from the run whose steps the directory holds.
      FileNotFoundError: ``read_only`` and no such directory.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3, *, run_id: str | None = None,
                 async_save: bool = False, read_only: bool = False, **options: Any):
        self.directory = Path(directory).absolute()
        self._async = bool(async_save)
        self._read_only = bool(read_only)
        self._closed = False
        self._primary = jax.process_index() == 0
        self._lock: weakref.finalize | None = None
        for k in options:
            if k in _REFUSED_OPTIONS:
                raise TypeError(f"TrainCheckpointer: option {k}= is not supported: {_REFUSED_OPTIONS[k]}")
        if run_id is not None and (not isinstance(run_id, str) or not run_id.strip()):
            raise TypeError(f"TrainCheckpointer: run_id must be a non-empty string or None, got {run_id!r}")
        if self._read_only:
            if not self.directory.is_dir():
                raise FileNotFoundError(f"{self.directory}: no such checkpoint directory")
            opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, read_only=True, create=False,
                                                cleanup_tmp_directories=False, **options)
            self._manager = ocp.CheckpointManager(self.directory, item_handlers=_handlers(), options=opts)
            self._dir_run_id = _read_run_file(self.directory)
            self._run_id = run_id or self._dir_run_id
            self._adopted = False
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._primary:
            token = _acquire_lock(self.directory)
            self._lock = weakref.finalize(self, _release_lock, str(self.directory / LOCK_FILE), token)
        try:
            self._open_for_writing(max_to_keep, run_id, options)
        except BaseException:
            self.close()
            raise

    def _open_for_writing(self, max_to_keep: int | None, run_id: str | None, options: dict) -> None:
        notes = self._recover_pending() if self._primary else []
        removed, kept = self._clean_leftovers() if self._primary else ([], [])
        if removed:
            notes.append(f"removed leftovers of an interrupted save: {removed}")
        if kept:
            notes.append(f"left in place (steps moved aside by an interrupted replacement without a record, "
                         f"or files that could not be deleted; a moved-aside step can be renamed back to its "
                         f"step number, anything else deleted by hand): {kept}")
        if notes:
            warnings.warn(f"{self.directory}: " + "; ".join(notes), CheckpointWarning, stacklevel=3)
        opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                            enable_async_checkpointing=self._async,
                                            cleanup_tmp_directories=False, **options)
        self._manager = ocp.CheckpointManager(self.directory, item_handlers=_handlers(), options=opts)
        self._dir_run_id = _read_run_file(self.directory)
        steps = self.all_steps()
        if steps and run_id is not None and self._dir_run_id is not None and run_id != self._dir_run_id:
            raise CheckpointRefusedError(
                f"{self.directory}: holds checkpoints (steps {steps}) of run {self._dir_run_id!r}, not of run "
                f"{run_id!r}. Use a new directory for run {run_id!r}, or open this one with "
                f"run_id={self._dir_run_id!r} (or restore() from it) to continue run {self._dir_run_id!r}")
        self._adopted = not steps or (run_id is not None and run_id == self._dir_run_id)
        self._run_id = (run_id or self._dir_run_id or uuid.uuid4().hex) if steps else (run_id or uuid.uuid4().hex)
        if self._adopted and self._primary and self._dir_run_id != self._run_id:
            _write_run_file(self.directory, self._run_id)
            self._dir_run_id = self._run_id

    @property
    def run_id(self) -> str | None:
        """The run id this checkpointer saves under (the directory's own once it continues that run)."""
        return self._run_id

    # ----------------------------------------------------------------------------------- listing
    def all_steps(self) -> list[int]:
        """Committed steps, ascending (unfinished temporary directories are ignored)."""
        self._manager.reload()
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        """Newest committed step, or ``None``."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def leftovers(self) -> list[Path]:
        """Paths in the directory left by interrupted saves: orbax temporary step directories, moved-aside
        stale locks and steps, temporary files. A writer removes them (except moved-aside steps) when it
        opens the directory; a ``read_only`` checkpointer only lists them."""
        return sorted(p for p in self.directory.iterdir() if _leftover_kind(p.name) is not None)

    # ----------------------------------------------------------------------------------- save
    def save(self, step: int, adapter: Any, opt_state: Any, *, rng: jax.Array | None = None,
             extra: Mapping[str, Any] | None = None, overwrite: bool = False, discard_newer: bool = False) -> None:
        """Write step ``step``: adapter arrays + description, optimizer state, ``rng`` and ``extra``.

        ``rng`` may be a typed key (``jax.random.key``) or raw ``uint32`` key data
        (``jax.random.PRNGKey``); it is restored in the same form. ``extra`` must be JSON-serializable
        (data-loader position, epoch, metrics …). The sha256 of every array is recorded.

        The step lands (is committed; with ``async_save``, once :meth:`wait_until_finished` returns)
        or this raises — never a silent no-op:

        Args:
          overwrite: replace step ``step`` if it already exists (default: refuse).
          discard_newer: allow ``step`` below the latest step; the newer steps are deleted once this
            one has landed (default: refuse, since :meth:`restore` resumes from the latest step).

        Replacements are crash-safe (old steps are moved aside first and only deleted once the new
        one has landed) and always synchronous.

        Raises:
          CheckpointRefusedError: the step exists, is below the latest, the directory holds another
            run's steps (see the class docstring), or the checkpointer is read-only or closed. The
            message says what to do.
        """
        if self._read_only:
            raise CheckpointRefusedError(f"{self.directory}: opened with read_only=True; saving needs a "
                                         "TrainCheckpointer opened without read_only (the only writer)")
        if self._closed:
            raise CheckpointRefusedError(f"{self.directory}: this TrainCheckpointer is closed; open a new one")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"TrainCheckpointer.save: step must be an integer >= 0, got {step!r}")
        step = int(step)
        state, meta = _build_step(step, adapter, opt_state, rng, extra)
        self._manager.wait_until_finished()  # orbax waits for a previous async save anyway; list it
        steps = self.all_steps()
        self._check_may_save(step, steps, overwrite, discard_newer)
        aside = [s for s in steps if s >= step]
        if aside:
            self._move_aside(step, aside)
        try:
            landed = self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
            if not landed:
                raise CheckpointRefusedError(f"{self.directory}: orbax declined to save step {step} (its "
                                             "CheckpointManager.save returned False); nothing was written")
            if not self._async or aside:
                self._manager.wait_until_finished()
        except BaseException:
            try:  # let orbax's writer threads of the failed save stop before anything is moved back
                self._manager.wait_until_finished()
            except Exception:
                pass
            if aside:
                self._undo_aside()
            raise
        if aside:
            self._finish_aside()
        self._adopt()

    def _check_may_save(self, step: int, steps: list[int], overwrite: bool, discard_newer: bool) -> None:
        where = self.directory
        if steps and not self._adopted:
            owner = f"run {self._dir_run_id!r}" if self._dir_run_id else f"an earlier run (no {RUN_FILE})"
            cont = (f"call restore() first or open the directory with run_id={self._dir_run_id!r}"
                    if self._dir_run_id else "call restore() first")
            raise CheckpointRefusedError(
                f"{where}: refusing to save step {step}: the directory already holds checkpoints of {owner} "
                f"(steps {steps}) that this TrainCheckpointer neither wrote nor restored, and saving would mix two "
                f"runs. To continue that run, {cont}; to start a new run, use a new directory (or delete the "
                "old steps)")
        if step in steps and not overwrite:
            raise CheckpointRefusedError(
                f"{where}: step {step} already exists; pass overwrite=True to replace it, or save under a new step "
                f"(the latest is {steps[-1]}) or in a new directory")
        newer = [s for s in steps if s > step]
        if newer and not discard_newer:
            raise CheckpointRefusedError(
                f"{where}: step {step} is lower than the latest step {steps[-1]}: a later restore() would resume "
                f"from step {steps[-1]}, not from this one. Save under a step above {steps[-1]}, use a new "
                f"directory, or pass discard_newer=True to delete steps {newer} once this one has landed")

    def _adopt(self) -> None:
        """This checkpointer now continues the directory's run (after its own save or a restore)."""
        if self._adopted or self._read_only:
            return
        self._adopted = True
        if self._dir_run_id is not None:
            self._run_id = self._dir_run_id
        elif self._primary:
            _write_run_file(self.directory, self._run_id)
            self._dir_run_id = self._run_id

    # --------------------------------------------------------------------- crash-safe replacement
    def _move_aside(self, step: int, steps: list[int]) -> None:
        if not self._primary:  # pragma: no cover - multi-process replacement is not supported
            raise CheckpointRefusedError(f"{self.directory}: replacing steps is only supported in single-process jobs")
        self._manager.wait_until_finished()
        record = {"step": step, "aside": {str(s): f"{_ASIDE_PREFIX}{s}-{uuid.uuid4().hex}" for s in steps}}
        fmt.atomic_write_bytes(self.directory / _PENDING_FILE, json.dumps(record).encode())
        self._pending = record
        for s, name in record["aside"].items():
            os.rename(self.directory / s, self.directory / name)
        fmt._fsync_dir(self.directory)
        self._manager.reload()

    def _undo_aside(self) -> None:
        _settle(self.directory, self._pending, landed=False)
        self._manager.reload()

    def _finish_aside(self) -> None:
        _settle(self.directory, self._pending, landed=True)
        self._manager.reload()

    def _recover_pending(self) -> list[str]:
        path = self.directory / _PENDING_FILE
        if not path.exists():
            return []
        record = _read_pending(path)
        step = record["step"]
        landed = (self.directory / str(step)).is_dir()
        _settle(self.directory, record, landed=landed)
        moved = sorted(int(s) for s in record["aside"])
        if landed:
            return [f"finished the interrupted replacement by step {step}: deleted the replaced steps {moved}"]
        return [f"undid the interrupted replacement by step {step}, which never landed: restored steps {moved}"]

    def _clean_leftovers(self) -> tuple[list[str], list[str]]:
        """``(removed, kept)`` names: leftovers are deleted, except moved-aside steps (and what resists deletion)."""
        removed, kept = [], []
        for p in sorted(self.directory.iterdir()):
            kind = _leftover_kind(p.name)
            if kind is None:
                continue
            (removed if kind != "aside" and _remove(p) else kept).append(p.name)
        return removed, kept

    def wait_until_finished(self) -> None:
        """Block until an asynchronous save has been committed (raises what the save raised)."""
        self._manager.wait_until_finished()

    # ----------------------------------------------------------------------------------- restore
    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The verified JSON description of ``step`` (default: latest).

        Raises:
          FileNotFoundError: no such committed step.
          CheckpointCorruptError: the description is unreadable, fails its checksum or is malformed.
        """
        step = self._resolve(step)
        where = f"{self.directory}/{step}/meta"
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = out["meta"]
        except Exception as e:
            raise CheckpointCorruptError(f"{where}: the step's description could not be read ({_exc(e)})") from e
        try:
            fmt.check_json_depth(meta, where)
            _check_meta(meta, step, where)
        except CheckpointCorruptError:
            raise
        except ValueError as e:
            raise CheckpointCorruptError(str(e)) from None
        return meta

    def _resolve(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"{self.directory}: no committed checkpoint")
            return steps[-1]
        if int(step) not in steps:
            raise FileNotFoundError(f"{self.directory}: no committed checkpoint for step {step} (have {steps})")
        return int(step)

    def restore(self, step: int | None = None, *, adapter_like: Any = None, opt_state_like: Any = None,
                fallback: bool = False) -> tuple[int, Any, Any, jax.Array | None, dict[str, Any]]:
        """Load ``(step, adapter, opt_state, rng, extra)`` (``step=None``: the latest committed one).

        Every array is verified against the sha256 recorded at save. A writing checkpointer that
        restores from its directory continues the run stored there (later saves are allowed).

        Args:
          adapter_like: an adapter of the same structure (arrays or ``jax.ShapeDtypeStruct`` with
            ``sharding``): each restored array is placed on its counterpart's sharding, and the saved
            description must equal this one's (method, layout, shapes, dtypes). ``None``: rebuild the
            adapter from the saved description on the default device.
          opt_state_like: the optimizer state's structure (e.g. ``tx.init(adapter_like)`` or its
            ``jax.eval_shape``); ``None`` skips the optimizer state (returned as ``None``).
          fallback: when the requested step is corrupted (:class:`CheckpointCorruptError`), restore
            the newest intact older step instead and warn (:class:`CheckpointWarning`) naming the
            skipped steps and why. Mismatches with ``*_like`` still raise. Default ``False``: raise.

        Returns:
          ``(step, adapter, opt_state, rng, extra)``; ``rng`` in the form it was saved (typed key or
          ``uint32`` data), ``None`` if none was saved.

        Raises:
          FileNotFoundError: no such committed step.
          CheckpointCorruptError: the step (with ``fallback``, every step at or below it) is damaged;
            the message names the step and the array.
          ValueError: the checkpoint does not match ``adapter_like`` / ``opt_state_like``.
        """
        first = self._resolve(step)
        if not fallback:
            out = self._restore_step(first, adapter_like, opt_state_like)
        else:
            failures: list[tuple[int, CheckpointCorruptError]] = []
            for s in sorted((s for s in self.all_steps() if s <= first), reverse=True):
                try:
                    out = self._restore_step(s, adapter_like, opt_state_like)
                    break
                except CheckpointCorruptError as e:
                    failures.append((s, e))
            else:
                raise CheckpointCorruptError(f"{self.directory}: no intact step at or below {first}: "
                                             + "; ".join(f"step {s}: {e}" for s, e in failures))
            if failures:
                warnings.warn(f"{self.directory}: restored step {out[0]} instead of {first}: step(s) "
                              f"{[s for s, _ in failures]} failed verification ({failures[0][1]}). They stay on disk: "
                              "delete them, or save with discard_newer=True to replace them",
                              CheckpointWarning, stacklevel=2)
        self._adopt()
        return out

    def _restore_step(self, step: int, adapter_like: Any, opt_state_like: Any):
        meta = self.read_meta(step)
        where = f"{self.directory}/{step}"
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

        # ---- adapter: validate against adapter_like, build abstract targets.
        saved_nodes = meta["adapter_nodes"]
        if adapter_like is not None:
            like_nodes, _ = fmt.describe_adapter(adapter_like, with_arrays=False)
            _compare_nodes(saved_nodes, like_nodes, where)
            like_arrays = _adapter_arrays(adapter_like)
            abstract_adapter = jax.tree_util.tree_map(lambda x: _leaf_abstract(x, default), like_arrays)
        else:
            abstract_adapter = {}
            for i, d in enumerate(saved_nodes):
                abstract_adapter[f"node_{i:04d}"] = {
                    name: jax.ShapeDtypeStruct(tuple(spec["shape"]), np.dtype(_np_dtype(spec["dtype"])),
                                               sharding=default)
                    for name, spec in d["arrays"].items()}
        target: dict[str, Any] = {"adapter": abstract_adapter}

        # ---- optimizer state.
        opt_treedef = None
        if opt_state_like is not None:
            like_desc, like_leaves, opt_treedef = _describe_leaves(opt_state_like)
            saved_desc = meta["opt_state"]
            if len(like_desc) != len(saved_desc):
                raise ValueError(f"{where}: the saved optimizer state has {len(saved_desc)} arrays, "
                                 f"opt_state_like has {len(like_desc)}")
            for s, l in zip(saved_desc, like_desc):
                if s != l:
                    raise ValueError(f"{where}: optimizer state leaf {s['path']!r} was saved as "
                                     f"{s['dtype']}{s['shape']}, opt_state_like has {l['path']!r} "
                                     f"{l['dtype']}{l['shape']}")
            if like_leaves:
                target["opt_state"] = {f"leaf_{i:05d}": _leaf_abstract(v, default)
                                       for i, v in enumerate(like_leaves)}
        elif meta["opt_state"]:
            # orbax restores whole items: read the optimizer state onto the default device and drop it.
            target["opt_state"] = {
                f"leaf_{i:05d}": jax.ShapeDtypeStruct(tuple(d["shape"]), _np_dtype(d["dtype"]), sharding=default)
                for i, d in enumerate(meta["opt_state"])}
        rng_desc = meta.get("rng")
        if rng_desc is not None:
            target["rng"] = jax.ShapeDtypeStruct(tuple(rng_desc["data_shape"]), np.uint32, sharding=default)

        self._check_stored_shapes(step, target, meta)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        except Exception as e:
            raise CheckpointCorruptError(f"{where}: the arrays could not be read ({_exc(e)}); the step is damaged") from e
        state = out["state"]
        _verify_checksums(state, meta, where)

        # ---- rebuild trees.
        arrays = state["adapter"]
        if adapter_like is not None:
            adapter = _fill_like(adapter_like, arrays)
        else:
            def fetch(tname, spec, pstr, name, _idx={d["arrays"][n]["tensor"]: (i, n)
                                                     for i, d in enumerate(saved_nodes) for n in d["arrays"]}):
                i, n = _idx[tname]
                return arrays[f"node_{i:04d}"][n]
            adapter = fmt.build_adapter(saved_nodes, fetch, where)
        opt_state = None
        if opt_treedef is not None:
            leaves = [state["opt_state"][f"leaf_{i:05d}"] for i in range(opt_treedef.num_leaves)] \
                if opt_treedef.num_leaves else []
            opt_state = jax.tree_util.tree_unflatten(opt_treedef, leaves)
        rng = None
        if rng_desc is not None:
            rng = state["rng"]
            if rng_desc["typed"]:
                rng = jax.random.wrap_key_data(rng, impl=rng_desc["impl"])
        return step, adapter, opt_state, rng, meta.get("extra", {})

    def _check_stored_shapes(self, step: int, target: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
        """The shapes/dtypes orbax recorded for the state item must be the ones about to be restored
        (checked before any array is allocated or read)."""
        where = f"{self.directory}/{step}/state"
        try:
            md = self._manager.item_metadata(step)["state"]
            stored = _flat(getattr(md, "tree", md))
        except Exception as e:
            raise CheckpointCorruptError(f"{where}: orbax's array metadata could not be read ({_exc(e)}); the step "
                                         "is damaged") from e
        want = _flat(target)
        if set(stored) != set(want):
            raise CheckpointCorruptError(f"{where}: holds arrays {sorted(stored)[:6]}, the description lists "
                                         f"{sorted(want)[:6]}")
        for k, spec in want.items():
            got = stored[k]
            if tuple(getattr(got, "shape", ())) != tuple(spec.shape) or np.dtype(got.dtype) != np.dtype(spec.dtype):
                raise CheckpointCorruptError(
                    f"{where}: array {_label(meta, k)} is stored as {np.dtype(got.dtype).name}{list(got.shape)}, the "
                    f"description says {np.dtype(spec.dtype).name}{list(spec.shape)}")

    # ----------------------------------------------------------------------------------- misc
    def close(self) -> None:
        """Wait for a pending save, close orbax and release the directory's lock. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            manager = getattr(self, "_manager", None)
            if manager is not None:
                manager.close()
        finally:
            if self._lock is not None:
                self._lock()

    def __enter__(self) -> "TrainCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------- helpers

def _handlers() -> dict[str, Any]:
    """The items of a step, declared so orbax can read their metadata in a fresh process."""
    return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


def _exc(e: BaseException, limit: int = 300) -> str:
    """``"Type: message"`` of an exception, cut to ``limit`` characters (tensorstore errors carry pages of spec)."""
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= limit else text[:limit] + " …"


def _remove(path: Path, attempts: int = 5) -> bool:
    """Delete a leftover file or directory; ``False`` if it keeps failing (e.g. a writer thread of a
    failed save still adds files to it)."""
    for i in range(attempts):
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
            return True
        except OSError:
            time.sleep(0.05 * (i + 1))
    return False


def _leftover_kind(name: str) -> str | None:
    if _ORBAX_TMP in name:
        return "orbax"
    if name.startswith(_STALE_PREFIX):
        return "stale lock"
    if name.startswith(_ASIDE_PREFIX):
        return "aside"
    if name.startswith("._lowrank_jax") and ".tmp-" in name:
        return "temporary file"
    return None


def _read_run_file(directory: Path) -> str | None:
    path = directory / RUN_FILE
    if not path.exists():
        return None
    doc = fmt.load_json(path.read_bytes(), str(path))
    if not isinstance(doc, dict) or doc.get("format") != _RUN_FORMAT:
        raise ValueError(f"{path}: not a lowrank_jax run file (expected format {_RUN_FORMAT!r})")
    run_id = fmt.json_str(doc.get("run_id"), str(path), "run_id")
    if not run_id.strip():
        raise fmt.json_error(str(path), "run_id", "a non-empty string", run_id)
    return run_id


def _write_run_file(directory: Path, run_id: str) -> None:
    doc = {"format": _RUN_FORMAT, "run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "host": socket.gethostname(), "pid": os.getpid()}
    fmt.atomic_write_bytes(directory / RUN_FILE, json.dumps(doc, indent=1).encode())


def _read_pending(path: Path) -> dict[str, Any]:
    where = str(path)
    record = fmt.load_json(path.read_bytes(), where)
    if not isinstance(record, dict):
        raise fmt.json_error(where, "record", "an object", record)
    fmt.json_int(record.get("step"), where, "step", lo=0)
    aside = record.get("aside")
    if not isinstance(aside, dict) or not aside:
        raise fmt.json_error(where, "aside", "a non-empty object", aside)
    for s, name in aside.items():
        if not s.isdigit() or not isinstance(name, str) or not name.startswith(_ASIDE_PREFIX) or "/" in name:
            raise fmt.json_error(where, f"aside[{s!r}]", f"a step number mapped to a {_ASIDE_PREFIX}* name", name)
    return record


def _settle(directory: Path, record: Mapping[str, Any], *, landed: bool) -> None:
    """Finish (``landed``: delete the moved-aside steps) or undo (rename them back) a replacement."""
    for s, name in record["aside"].items():
        aside, final = directory / name, directory / s
        if not aside.exists():
            continue
        if landed or final.exists():
            shutil.rmtree(aside)
        else:
            os.rename(aside, final)
    fmt._fsync_dir(directory)
    (directory / _PENDING_FILE).unlink(missing_ok=True)


def _build_step(step: int, adapter: Any, opt_state: Any, rng: Any,
                extra: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, meta)`` for one step: the arrays to save and their verified description."""
    nodes, _ = fmt.describe_adapter(adapter, with_arrays=False)
    opt_desc, opt_leaves, _ = _describe_leaves(opt_state)
    state: dict[str, Any] = {
        "adapter": _adapter_arrays(adapter),
        "opt_state": {f"leaf_{i:05d}": v for i, v in enumerate(opt_leaves)},
    }
    rng_desc: dict[str, Any] | None = None
    if rng is not None:
        if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
            state["rng"] = jax.random.key_data(rng)
            rng_desc = {"typed": True, "impl": str(jax.random.key_impl(rng)),
                        "data_shape": list(state["rng"].shape)}
        else:
            arr = rng if isinstance(rng, jax.Array) else np.asarray(rng)
            if arr.dtype != np.uint32:
                raise TypeError(f"TrainCheckpointer.save: rng must be a typed key or uint32 key data, "
                                f"got dtype {arr.dtype}")
            rng_desc = {"typed": False, "data_shape": list(arr.shape)}
            state["rng"] = arr
    try:
        extra_json = json.loads(json.dumps(dict(extra or {}), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TypeError(f"TrainCheckpointer.save: extra must be JSON-serializable: {e}") from None
    fmt.check_json_depth(extra_json, "TrainCheckpointer.save: extra")
    # Empty dicts are dropped by some orbax versions; keep the tree non-degenerate.
    if not state["opt_state"]:
        state.pop("opt_state")
    meta: dict[str, Any] = {
        "format": _META_FORMAT,
        "version": _META_VERSION,
        "step": step,
        "adapter_nodes": nodes,
        "opt_state": opt_desc,
        "rng": rng_desc,
        "extra": extra_json,
        "checksums": {k: _sha256(v) for k, v in _flat(state).items()},
    }
    meta["checksum"] = fmt.canonical_sha256(meta)
    return state, meta


def _check_meta(meta: Any, step: int, where: str) -> None:
    """Validate a step's description as untrusted input (``ValueError`` naming ``where`` and the key)."""
    if not isinstance(meta, dict) or meta.get("format") != _META_FORMAT:
        raise ValueError(f"{where}: not a lowrank_jax training checkpoint")
    version = fmt.json_int(meta.get("version"), where, "version", lo=1, hi=_META_VERSION)
    if version >= 2:
        stored = meta.get("checksum")
        body = {k: v for k, v in meta.items() if k != "checksum"}
        if stored != fmt.canonical_sha256(body):
            raise CheckpointCorruptError(f"{where}: checksum mismatch: the step's description was modified or "
                                         f"corrupted (stored {stored!r})")
    else:
        warnings.warn(f"{where}: written by an older lowrank_jax without checksums; its arrays cannot be verified",
                      CheckpointWarning, stacklevel=4)
    if fmt.json_int(meta.get("step"), where, "step", lo=0) != step:
        raise ValueError(f"{where}: describes step {meta['step']}, but lies in the directory of step {step}")
    nodes = meta.get("adapter_nodes")
    if not isinstance(nodes, list) or not nodes:
        raise fmt.json_error(where, "adapter_nodes", "a non-empty list", nodes)
    for d in nodes:  # types, method, layout and array shapes implied by the method (no arrays yet)
        parts, empty, specs = fmt.node_from_json(d, where)
        abstract = {n: jax.ShapeDtypeStruct(tuple(s["shape"]), _np_dtype(s["dtype"])) for n, s in specs.items()}
        fmt.check_node_arrays("/".join(map(str, parts)),
                              AdapterParams(abstract, empty.method, empty.layout, empty.shape, empty.dtype), where)
    opt = meta.get("opt_state")
    if not isinstance(opt, list):
        raise fmt.json_error(where, "opt_state", "a list", opt)
    for i, d in enumerate(opt):
        if not isinstance(d, dict):
            raise fmt.json_error(where, f"opt_state[{i}]", "an object", d)
        fmt.json_str(d.get("path"), where, f"opt_state[{i}].path")
        fmt.json_shape(d.get("shape"), where, f"opt_state[{i}].shape")
        _check_dtype(d.get("dtype"), where, f"opt_state[{i}].dtype")
    rng = meta.get("rng")
    if rng is not None:
        if not isinstance(rng, dict):
            raise fmt.json_error(where, "rng", "an object or null", rng)
        if fmt.json_bool(rng.get("typed"), where, "rng.typed"):
            fmt.json_str(rng.get("impl"), where, "rng.impl")
        fmt.json_shape(rng.get("data_shape"), where, "rng.data_shape")
    if not isinstance(meta.get("extra", {}), dict):
        raise fmt.json_error(where, "extra", "an object", meta.get("extra"))
    sums = meta.get("checksums")
    if version >= 2:
        if not isinstance(sums, dict):
            raise fmt.json_error(where, "checksums", "an object", sums)
        for k, v in sums.items():
            if v is not None and (not isinstance(v, str) or len(v) != 64):
                raise fmt.json_error(where, f"checksums[{k!r}]", "a sha256 hex digest or null", v)


def _check_dtype(v: Any, where: str, key: str) -> None:
    fmt.json_str(v, where, key)
    try:
        _np_dtype(v)
    except TypeError:
        raise fmt.json_error(where, key, "a dtype name", v) from None


def _label(meta: Mapping[str, Any], key: str) -> str:
    """A readable name for a state key: ``adapter/node_0001/a`` → ``'adapter/node_0001/a' (fc2/kernel/a)``."""
    parts = key.split("/")
    try:
        if parts[0] == "adapter":
            node = meta["adapter_nodes"][int(parts[1][len("node_"):])]
            return f"{key!r} ({'/'.join(map(str, node['path']))}/{parts[2]})"
        if parts[0] == "opt_state":
            return f"{key!r} (optimizer state {meta['opt_state'][int(parts[1][len('leaf_'):])]['path']})"
    except (KeyError, IndexError, ValueError, TypeError):
        pass
    return repr(key)


def _verify_checksums(state: Mapping[str, Any], meta: Mapping[str, Any], where: str) -> None:
    sums = meta.get("checksums")
    if sums is None:  # version 1 (warned about in _check_meta)
        return
    flat = _flat(state)
    missing = sorted(set(flat) - set(sums))
    if missing:
        raise CheckpointCorruptError(f"{where}: no checksum recorded for arrays {missing[:5]}")
    for k, v in flat.items():
        want = sums[k]
        if want is not None and _sha256(v) != want:
            raise CheckpointCorruptError(
                f"{where}: array {_label(meta, k)} does not match the sha256 recorded at save: the step is corrupted. "
                "Restore an older step (restore(step=...)), or pass fallback=True to use the newest intact one")


def _adapter_arrays(adapter: Any) -> dict[str, dict[str, Any]]:
    """``{"node_0000": {"a": …, "b": …}, …}`` in :func:`describe_adapter`'s node order."""
    out: dict[str, dict[str, Any]] = {}

    def walk(tree: Any) -> None:
        if isinstance(tree, AdapterParams):
            out[f"node_{len(out):04d}"] = dict(tree.params)
        elif isinstance(tree, dict):
            for k in tree:
                walk(tree[k])
        else:
            raise TypeError(f"adapter: expected nested dicts of AdapterParams, found {type(tree).__name__}")

    walk(adapter)
    return out


def _fill_like(adapter_like: Any, arrays: Mapping[str, Mapping[str, Any]]) -> Any:
    """``adapter_like`` with its arrays replaced by ``arrays`` (same node numbering as :func:`_adapter_arrays`)."""
    counter = [0]

    def walk(tree: Any) -> Any:
        if isinstance(tree, AdapterParams):
            got = arrays[f"node_{counter[0]:04d}"]
            counter[0] += 1
            return tree.replace(**{k: got[k] for k in tree.params})
        return {k: walk(v) for k, v in tree.items()}

    return walk(adapter_like)


def _compare_nodes(saved: list[dict], like: list[dict], where: str) -> None:
    if len(saved) != len(like):
        raise ValueError(f"{where}: the checkpoint has {len(saved)} adapter nodes, adapter_like has {len(like)}")
    for s, l in zip(saved, like):
        if s != l:
            p = "/".join(map(str, s.get("path", [])))
            diff = sorted(k for k in set(s) | set(l) if s.get(k) != l.get(k))
            raise ValueError(f"{where}: adapter node {p!r} differs from adapter_like in {diff}: saved "
                             f"{ {k: s.get(k) for k in diff} } vs { {k: l.get(k) for k in diff} }")
