"""Nothing silent: files are untrusted input, a checkpoint write lands or raises, names are unambiguous.

Every fault is simulated under ``tmp_path`` (edited or flipped bytes, monkeypatched orbax, a second
process). Errors are checked by their exact message; results against an independent reference (the
arrays that were saved, PEFT on a torch twin, ``vera_projections``).
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lj
from lowrank_jax.io import _format as fmt
from lowrank_jax.io import load_adapter, save_adapter
from lowrank_jax.io import peft as lpeft
from lowrank_jax.io.checkpoint import (LOCK_FILE, RUN_FILE, CheckpointCorruptError, CheckpointLockedError,
                                       CheckpointRefusedError, CheckpointWarning, TrainCheckpointer)
from conftest import randomize

TESTS = Path(__file__).resolve().parent
HOST = socket.gethostname()


def raises_exactly(exc, message, fn, *args, **kwargs):
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    assert str(info.value) == message
    return info.value


def _state(seed=0):
    """A LoRA + DoRA adapter with distinct random arrays, and its Adam state."""
    params = {"fc1": {"kernel": jnp.ones((6, 8))}, "fc2": {"kernel": jnp.ones((8, 4))}}
    _, adapter = lj.init([lj.LoRA(rank=2, targets=r"fc1/kernel"), lj.DoRA(rank=2, targets=r"fc2/kernel")],
                         params, jax.random.key(0))
    adapter = randomize(adapter, seed)
    return adapter, optax.adam(1e-2).init(adapter)


def _same(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _python(code: str, wait: bool = True):
    """Run ``code`` in a fresh interpreter that can import this test module as ``T``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    args = [sys.executable, "-c", "import conftest, test_io_reliability as T\n" + code]
    proc = subprocess.Popen(args, cwd=TESTS, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=300)
    return proc, out, err


# =============================================================================================
# The examples of the issue
# =============================================================================================

def test_issue_restart_in_a_used_directory_raises(tmp_path):
    d = tmp_path / "ckpt"
    adapter, opt = _state(1)
    with TrainCheckpointer(d, run_id="run-A") as first:
        first.save(100, adapter, opt)
        first.save(200, adapter, opt)

    restarted = TrainCheckpointer(d)  # a new run in the same directory: used to write nothing, silently
    for step in (0, 300):  # below the old steps (orbax refused it) and above them (two runs mixed)
        raises_exactly(CheckpointRefusedError,
                       f"{d}: refusing to save step {step}: the directory already holds checkpoints of run 'run-A' "
                       f"(steps [100, 200]) that this TrainCheckpointer neither wrote nor restored, and saving would "
                       f"mix two runs. To continue that run, call restore() first or open the directory with "
                       f"run_id='run-A'; to start a new run, use a new directory (or delete the old steps)",
                       restarted.save, step, adapter, opt)
    assert restarted.all_steps() == [100, 200]
    restarted.close()

    raises_exactly(CheckpointRefusedError,
                   f"{d}: holds checkpoints (steps [100, 200]) of run 'run-A', not of run 'run-B'. Use a new "
                   f"directory for run 'run-B', or open this one with run_id='run-A' (or restore() from it) to "
                   f"continue run 'run-A'", TrainCheckpointer, d, run_id="run-B")
    with TrainCheckpointer(d, run_id="run-A") as same_run:  # continuing by name
        same_run.save(300, adapter, opt)
    with TrainCheckpointer(d) as resumed:  # continuing by restoring
        assert resumed.restore(adapter_like=adapter)[0] == 300 and resumed.run_id == "run-A"
        resumed.save(400, adapter, opt)
        assert resumed.all_steps() == [200, 300, 400]
    with TrainCheckpointer(tmp_path / "new", run_id="run-B") as other:  # a new run gets a new directory
        other.save(0, adapter, opt)
        assert json.loads((tmp_path / "new" / RUN_FILE).read_text())["run_id"] == "run-B"


def test_issue_existing_step_raises_and_overwrite_replaces(tmp_path):
    d = tmp_path / "ckpt"
    (a1, opt), (a2, _) = _state(1), _state(2)
    with TrainCheckpointer(d) as ck:
        ck.save(5, a1, opt)
        raises_exactly(CheckpointRefusedError,
                       f"{d}: step 5 already exists; pass overwrite=True to replace it, or save under a new step "
                       "(the latest is 5) or in a new directory", ck.save, 5, a2, opt)
        _same(ck.restore(adapter_like=a1)[1], a1)
        ck.save(5, a2, opt, overwrite=True)
        _same(ck.restore(adapter_like=a1)[1], a2)
        assert sorted(p.name for p in d.iterdir()) == ["5", LOCK_FILE, RUN_FILE]  # nothing moved aside remains
    assert not (d / LOCK_FILE).exists()


def _two_kernel_params(n_in=320, n_out=320):
    return {"proj": {"kernel": np.zeros((n_in, n_out), np.float32), "bias": np.zeros(n_out, np.float32)}}


def _vera_dir(path: Path, r: int, n_out: int, **config) -> Path:
    path.mkdir()
    config = {"peft_type": "VERA", "r": r, "projection_prng_key": 0, "save_projection": False, **config}
    (path / lpeft.CONFIG_NAME).write_text(json.dumps(config))
    (path / lpeft.WEIGHTS_NAME).write_bytes(fmt.safetensors_dumps(
        {"base_model.model.proj.vera_lambda_d": np.full(r, 0.1, np.float32),
         "base_model.model.proj.vera_lambda_b": np.zeros(n_out, np.float32)}, {"format": "pt"}))
    return path


def test_issue_vera_file_without_projections_cannot_demand_gigabytes(tmp_path, monkeypatch):
    r = 4 * 2**20  # vera_lambda_d alone is 16 MiB; the projections would be r·(320 + 320) floats = 10 GiB
    d = _vera_dir(tmp_path / "vera", r, 320)
    size = (d / lpeft.WEIGHTS_NAME).stat().st_size
    assert 16 * 2**20 < size < 17 * 2**20
    monkeypatch.setattr(lpeft, "vera_projections", lambda *a: pytest.fail("the projections were allocated"))
    budget = 64 * (size + 320 * 320 * 4 + 320 * 4)
    raises_exactly(ValueError,
                   f"{d / lpeft.CONFIG_NAME}: r={r} without saved projections needs vera_A ({r}, 320) and vera_B "
                   f"(320, {r}): 10240.0 MiB of float32, more than 64x the adapter file plus the model params "
                   f"({budget / 2**20:.1f} MiB); refusing to allocate it. If the rank is right, save the adapter "
                   "with save_projection=True", lpeft.load, d, _two_kernel_params())


def test_vera_file_with_a_sane_rank_still_regenerates_its_projections(tmp_path):
    d = _vera_dir(tmp_path / "vera", 256, 320)  # PEFT's default rank on a small model: allowed
    frozen, adapter = lpeft.load(d, _two_kernel_params())
    a, b = lj.vera_projections(256, 320, 320, 0)
    np.testing.assert_array_equal(np.asarray(frozen[lj.tree.SHARED_KEY]["vera_0"]["a"]), a)
    np.testing.assert_array_equal(np.asarray(frozen[lj.tree.SHARED_KEY]["vera_0"]["b"]), b)
    np.testing.assert_array_equal(np.asarray(adapter["proj"]["kernel"]["lambda_d"]), np.full(256, 0.1, np.float32))


# =============================================================================================
# 2. Files are untrusted input
# =============================================================================================

@pytest.fixture()
def peft_dir(tmp_path):
    params = {"enc": {"fc1": {"kernel": jnp.ones((4, 6))}, "fc2": {"kernel": jnp.ones((6, 3))}}}
    _, adapter = lj.init(lj.LoRA(rank=2, alpha=4.0, targets=r"enc/fc\d/kernel"), params, jax.random.key(0))
    return lpeft.save(tmp_path / "peft", randomize(adapter)), params


def _set_config(d: Path, text: str | None = None, **changes):
    cpath = d / lpeft.CONFIG_NAME
    if text is None:
        text = json.dumps({**json.loads(cpath.read_text()), **changes})
    cpath.write_text(text)
    return str(cpath)


@pytest.mark.parametrize("key, value, expected", [
    ("use_dora", "false", "use_dora must be true or false, got 'false' (str)"),
    ("use_rslora", 0, "use_rslora must be true or false, got 0 (int)"),
    ("r", "2", "r must be an integer >= 1, got '2' (str)"),
    ("r", 2.0, "r must be an integer >= 1, got 2.0 (float)"),
    ("lora_alpha", True, "lora_alpha must be a finite number > 0, got True (bool)"),
    ("lora_dropout", 1.5, "lora_dropout must be a finite number in [0, 1), got 1.5 (float)"),
    ("rank_pattern", {"^enc\\.fc1": 2.5}, "rank_pattern['^enc\\\\.fc1'] must be an integer >= 1, got 2.5 (float)"),
    ("alpha_pattern", ["fc1", 3], "alpha_pattern must be an object {module regex: value}, got ['fc1', 3] (list)"),
    ("peft_type", 5, "peft_type must be a string, got 5 (int)"),
    ("modules_to_save", "head", "modules_to_save must be a list of module names or null, got 'head' (str)"),
    ("lora_bias", "false", "lora_bias must be true or false, got 'false' (str)"),
])
def test_peft_config_values_are_type_and_range_checked(peft_dir, key, value, expected):
    d, params = peft_dir
    cname = _set_config(d, **{key: value})
    raises_exactly(ValueError, f"{cname}: {expected}", lpeft.load, d, params)


def test_peft_config_json_itself_is_checked(peft_dir):
    d, params = peft_dir
    good = (d / lpeft.CONFIG_NAME).read_text()
    cname = _set_config(d, good.replace('"r": 2', '"r": 2, "r": 4'))
    raises_exactly(ValueError, f"{cname}: key 'r' appears twice in one JSON object", lpeft.load, d, params)
    _set_config(d, good.replace('"lora_alpha": 4', '"lora_alpha": NaN'))
    raises_exactly(ValueError, f"{cname}: NaN is not a JSON number (non-finite values are refused)", lpeft.load, d, params)
    _set_config(d, good.replace('"lora_alpha": 4', '"lora_alpha": 1e999'))
    raises_exactly(ValueError, f"{cname}: number 1e999 overflows to infinity", lpeft.load, d, params)
    _set_config(d, good[:-2] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}")  # no RecursionError
    raises_exactly(ValueError, f"{cname}: JSON nested deeper than 64 levels; refusing it", lpeft.load, d, params)
    _set_config(d, good.replace('"rank_pattern": {}', '"rank_pattern": {"fc1(": 3}'))
    with pytest.raises(ValueError) as info:
        lpeft.load(d, params)
    assert str(info.value).startswith(f"{cname}: rank_pattern key 'fc1(' is not a valid regular expression (")


@pytest.mark.parametrize("key, value, expected", [
    ("projection_prng_key", -1, "projection_prng_key must be an integer in [0, 4294967295], got -1 (int)"),
    ("save_projection", "false", "save_projection must be true or false, got 'false' (str)"),
    ("d_initial", "0.1", "d_initial must be a finite number, got '0.1' (str)"),
    ("vera_dropout", -0.5, "vera_dropout must be a finite number in [0, 1), got -0.5 (float)"),
])
def test_peft_vera_config_values_are_checked(tmp_path, key, value, expected):
    d = _vera_dir(tmp_path / "vera", 8, 320, **{key: value})
    raises_exactly(ValueError, f"{d / lpeft.CONFIG_NAME}: {expected}", lpeft.load, d, _two_kernel_params())


def _header_blob(header: str, data: bytes = b"\0" * 24) -> bytes:
    head = header.encode()
    return len(head).to_bytes(8, "little") + head + data


@pytest.mark.parametrize("header, expected", [
    ('{"x": {"dtype": "F32", "shape": [2.0, 3], "data_offsets": [0, 24]}}',
     "f: tensor 'x' shape must be a list of integers >= 0 (a shape), got [2.0, 3] (list)"),
    ('{"x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, true]}}',
     "f: tensor 'x' data_offsets must be an integer >= 0, got True (bool)"),
    ('{"x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24, 48]}}',
     "f: tensor 'x' data_offsets must be a list [begin, end], got [0, 24, 48] (list)"),
    ('{"x": {"dtype": ["F32"], "shape": [2, 3], "data_offsets": [0, 24]}}',
     "f: tensor 'x' dtype must be one of ['BF16', 'BOOL', 'F16', 'F32', 'F64', 'I16', 'I32', 'I64', 'I8', 'U16', "
     "'U32', 'U64', 'U8'], got ['F32'] (list)"),
    ('{"__metadata__": {"format": 1}, "x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}',
     "f: __metadata__['format'] must be a string, got 1 (int)"),
    ('{"x": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}, "x": {"dtype": "F32", "shape": [6], '
     '"data_offsets": [0, 24]}}', "f (safetensors header): key 'x' appears twice in one JSON object"),
    ('{"x": ' + "[" * 5000 + "]" * 5000 + "}", "f (safetensors header): JSON nested deeper than 64 levels; refusing it"),
])
def test_safetensors_header_values_are_checked(header, expected):
    raises_exactly(ValueError, expected, fmt.safetensors_loads, _header_blob(header), "f")


@pytest.fixture()
def saved(tmp_path):
    params = {"enc": {"fc1": {"kernel": jnp.ones((4, 6))}, "fc2": {"kernel": jnp.ones((6, 3))}}}
    _, adapter = lj.init(lj.LoRA(rank=2, targets=r"enc/fc\d/kernel", quant=lj.NF4(block_size=2)), params,
                         jax.random.key(0))
    return save_adapter(tmp_path / "ad", randomize(adapter))


def _edit_doc(d: Path, edit) -> str:
    """Apply ``edit`` to adapter.json and re-sign it (a valid checksum over wrong content)."""
    jpath = d / "adapter.json"
    doc = json.loads(jpath.read_text())
    doc.pop("checksum")
    edit(doc)
    doc["checksum"] = fmt.canonical_sha256(doc)
    jpath.write_text(json.dumps(doc))
    return str(jpath)


def _field(doc, name, value, node=0):
    doc["nodes"][node]["method"]["fields"][name] = value


@pytest.mark.parametrize("edit, expected", [
    (lambda doc: _field(doc, "rslora", "false"), "enc/fc1/kernel: LoRA: field 'rslora' must be bool, got 'false' (str)"),
    (lambda doc: _field(doc, "rank", 2.0), "enc/fc1/kernel: LoRA: field 'rank' must be int, got 2.0 (float)"),
    (lambda doc: doc["nodes"][0]["method"]["fields"]["quant"]["fields"].update(double_quant="false"),
     "enc/fc1/kernel: NF4: field 'double_quant' must be bool, got 'false' (str)"),
    (lambda doc: doc["nodes"][0].update(shape=[4, "6"]), "enc/fc1/kernel: shape must be a list of integers >= 0 "
                                                         "(a shape), got [4, '6'] (list)"),
    (lambda doc: doc["nodes"][0].update(path=["enc", True]), "node path must be a non-empty list of string or "
                                                             "integer keys, got ['enc', True] (list)"),
    (lambda doc: doc.update(version=True), "format version True is not supported by this library (reads versions 1..1)"),
    (lambda doc: doc["tensors"].update(bytes="1"), "tensors.bytes must be an integer >= 0, got '1' (str)"),
])
def test_adapter_json_values_are_checked_even_with_a_valid_checksum(saved, edit, expected):
    jpath = _edit_doc(saved, edit)
    raises_exactly(ValueError, f"{jpath}: {expected}", load_adapter, saved)


def test_adapter_json_layout_and_nesting(saved):
    adapter = load_adapter(saved)
    with pytest.raises(ValueError, match="^save_adapter: metadata: JSON nested deeper than 64 levels; refusing it$"):
        save_adapter(saved.parent / "deep", adapter, metadata={"x": json.loads("[" * 70 + "]" * 70)})
    jpath = _edit_doc(saved, lambda doc: doc["nodes"][0]["layout"].update(stack=0.0))
    raises_exactly(ValueError, f"{jpath}: enc/fc1/kernel: invalid layout description {{'in_axes': [0], 'out_axes': "
                               "[1], 'stack': 0.0}: layout: stack must be an integer >= 0, got 0.0 (float)",
                   load_adapter, saved)
    jpath = _edit_doc(saved, lambda doc: doc.update(metadata=json.loads("[" * 70 + "]" * 70)))
    raises_exactly(ValueError, f"{jpath}: JSON nested deeper than 64 levels; refusing it", load_adapter, saved)


def test_an_oversized_tensor_file_is_refused_before_it_is_read(saved, monkeypatch):
    jpath, tpath = saved / "adapter.json", saved / "adapter.safetensors"
    want = json.loads(jpath.read_text())["tensors"]["bytes"]
    os.truncate(tpath, 2**40)  # a sparse 1 TiB file: reading it would exhaust memory
    monkeypatch.setattr(Path, "read_bytes", lambda self, _orig=Path.read_bytes: (
        pytest.fail("read the oversized file") if self == tpath else _orig(self)))
    raises_exactly(ValueError, f"{tpath}: truncated or extended: {2**40} bytes, adapter.json says {want}",
                   load_adapter, saved)


# =============================================================================================
# 3. A checkpoint write either lands or raises
# =============================================================================================

def test_a_lower_step_needs_discard_newer(tmp_path):
    d = tmp_path / "ckpt"
    (a1, opt), (a2, _) = _state(1), _state(2)
    with TrainCheckpointer(d, max_to_keep=None) as ck:
        for s in (10, 20, 30):
            ck.save(s, a1, opt)
        raises_exactly(CheckpointRefusedError,
                       f"{d}: step 15 is lower than the latest step 30: a later restore() would resume from step 30, "
                       "not from this one. Save under a step above 30, use a new directory, or pass "
                       "discard_newer=True to delete steps [20, 30] once this one has landed", ck.save, 15, a2, opt)
        raises_exactly(CheckpointRefusedError,
                       f"{d}: step 20 already exists; pass overwrite=True to replace it, or save under a new step "
                       "(the latest is 30) or in a new directory", ck.save, 20, a2, opt, discard_newer=True)
        ck.save(15, a2, opt, discard_newer=True)
        assert ck.all_steps() == [10, 15]
        step, adapter, *_ = ck.restore(adapter_like=a1)
        assert step == 15
        _same(adapter, a2)


def test_a_failed_replacement_keeps_every_old_step(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp
    d = tmp_path / "ckpt"
    states = {s: _state(s) for s in (1, 2, 3)}
    ck = TrainCheckpointer(d)
    for s, (a, o) in states.items():
        ck.save(s, a, o)

    def boom(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", boom)
    with pytest.raises(OSError, match=r"^disk full \(injected\)$"):
        ck.save(2, *_state(9), overwrite=True, discard_newer=True)
    monkeypatch.undo()
    assert ck.all_steps() == [1, 2, 3]
    for s, (a, o) in states.items():
        _same(ck.restore(s, adapter_like=a, opt_state_like=o)[1], a)
    assert not [p for p in d.iterdir() if p.name.startswith("_lowrank_jax_aside") or "pending" in p.name]
    ck.close()


def _child_killed_during_overwrite(ckpt_dir: str) -> None:
    """Open the run, then die with SIGKILL while overwriting step 2."""
    import orbax.checkpoint as ocp
    ck = TrainCheckpointer(ckpt_dir, run_id="r")

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    ocp.handlers.JsonCheckpointHandler._save_fn = die
    ck.save(2, *_state(9), overwrite=True)


def test_a_killed_replacement_is_undone_when_the_directory_is_reopened(tmp_path):
    d = tmp_path / "ckpt"
    (a1, o1), (a2, o2) = _state(1), _state(2)
    with TrainCheckpointer(d, run_id="r") as ck:
        ck.save(1, a1, o1)
        ck.save(2, a2, o2)
    proc, _, err = _python(f"T._child_killed_during_overwrite({str(d)!r})")
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    assert "2" not in os.listdir(d)  # step 2 is moved aside, its replacement a temporary directory
    with pytest.warns(CheckpointWarning) as record:
        ck = TrainCheckpointer(d)
    messages = [str(w.message) for w in record]
    assert messages[0] == (f"{d}: took over the stale lock of pid {proc.pid} on host {HOST!r} (since "
                           f"{messages[0].split('(since ')[1].split(')')[0]}), which is no longer running; a save it "
                           "had in progress was interrupted (its leftovers are cleaned up next)")
    assert messages[1] == (f"{d}: undid the interrupted replacement by step 2, which never landed: restored steps [2]; "
                           "removed leftovers of an interrupted save: ['2.orbax-checkpoint-tmp']")
    assert ck.all_steps() == [1, 2] and ck.leftovers() == []
    _same(ck.restore(2, adapter_like=a2)[1], a2)
    ck.close()


def test_second_writer_is_refused_readers_are_not(tmp_path):
    d = tmp_path / "ckpt"
    adapter, opt = _state(1)
    ck = TrainCheckpointer(d)
    ck.save(1, adapter, opt)
    lock = d / LOCK_FILE
    raises_exactly(CheckpointLockedError,
                   f"{d}: already open for writing by a TrainCheckpointer of this process (lock file {lock}); only "
                   "one writer may use a directory. Close that one first, open this one with read_only=True to "
                   "read, or use another directory", TrainCheckpointer, d)
    since = json.loads(lock.read_text())["since"]
    code = ("import sys\nfrom lowrank_jax.io.checkpoint import TrainCheckpointer, CheckpointLockedError\n"
            f"try:\n    TrainCheckpointer({str(d)!r}).close()\nexcept CheckpointLockedError as e:\n"
            "    print(e)\n    sys.exit(3)\nprint('opened')")
    proc, out, err = _python(code)
    assert proc.returncode == 3, err[-3000:]
    assert out.strip() == (f"{d}: already open for writing by a TrainCheckpointer of pid {os.getpid()} on host "
                           f"{HOST!r} (since {since}) (lock file {lock}); only one writer may use a directory. Close "
                           "that one first, open this one with read_only=True to read, or use another directory")

    reader = TrainCheckpointer(d, read_only=True)  # reading alongside the writer is fine
    assert reader.all_steps() == [1]
    _same(reader.restore(adapter_like=adapter)[1], adapter)
    raises_exactly(CheckpointRefusedError, f"{d}: opened with read_only=True; saving needs a TrainCheckpointer "
                                           "opened without read_only (the only writer)", reader.save, 2, adapter, opt)
    ck.close()
    assert not lock.exists()
    proc, out, err = _python(code)
    assert proc.returncode == 0 and out.strip() == "opened", err[-3000:]
    raises_exactly(CheckpointRefusedError, f"{d}: this TrainCheckpointer is closed; open a new one",
                   ck.save, 2, adapter, opt)


def _write_lock(d: Path, **info):
    d.mkdir(exist_ok=True)
    (d / LOCK_FILE).write_text(json.dumps({"format": "lowrank_jax.lock", "token": "t", "since": "then", **info}))


def test_stale_and_foreign_locks(tmp_path):
    d = tmp_path / "ckpt"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _write_lock(d, pid=gone.pid, host=HOST)
    with pytest.warns(CheckpointWarning) as record:
        TrainCheckpointer(d).close()
    assert [str(w.message) for w in record] == [
        f"{d}: took over the stale lock of pid {gone.pid} on host {HOST!r} (since then), which is no longer running; "
        "a save it had in progress was interrupted (its leftovers are cleaned up next)"]

    if Path(f"/proc/{os.getppid()}/stat").exists():  # a live pid with another start time: the pid was reused
        _write_lock(d, pid=os.getppid(), host=HOST, start="1")
        with pytest.warns(CheckpointWarning, match="took over the stale lock"):
            TrainCheckpointer(d).close()

    _write_lock(d, pid=1, host="elsewhere.example")
    raises_exactly(CheckpointLockedError,
                   f"{d}: locked by a TrainCheckpointer of pid 1 on host 'elsewhere.example' (since then), which "
                   "cannot be checked from this host; only one writer may use a directory. Close that one (or open "
                   f"this one with read_only=True); if it is no longer running, delete {d / LOCK_FILE}",
                   TrainCheckpointer, d)
    assert json.loads((d / LOCK_FILE).read_text())["host"] == "elsewhere.example"  # left alone


def test_options_that_would_skip_saves_are_refused(tmp_path):
    raises_exactly(TypeError, "TrainCheckpointer: option save_interval_steps= is not supported: orbax would skip "
                              "steps silently; call save() only on the steps to keep",
                   TrainCheckpointer, tmp_path / "ckpt", save_interval_steps=10)
    assert not (tmp_path / "ckpt").exists()


@pytest.fixture()
def two_steps(tmp_path):
    d = tmp_path / "ckpt"
    (a1, opt), (a2, _) = _state(1), _state(2)
    with TrainCheckpointer(d) as ck:
        ck.save(1, a1, opt)
        ck.save(2, a2, opt)
    return d, a1, a2, opt


def test_swapped_array_data_fails_the_checksum_and_fallback_uses_the_older_step(two_steps):
    d, a1, a2, opt = two_steps
    shutil.rmtree(d / "2" / "state")  # well-formed orbax data, but not what step 2 saved
    shutil.copytree(d / "1" / "state", d / "2" / "state")
    ck = TrainCheckpointer(d)
    error = (f"{d}/2: array 'adapter/node_0000/a' (fc1/kernel/a) does not match the sha256 recorded at save: the "
             "step is corrupted. Restore an older step (restore(step=...)), or pass fallback=True to use the newest "
             "intact one")
    raises_exactly(CheckpointCorruptError, error, ck.restore, adapter_like=a1, opt_state_like=opt)
    with pytest.warns(CheckpointWarning) as record:
        step, adapter, *_ = ck.restore(adapter_like=a1, opt_state_like=opt, fallback=True)
    assert step == 1
    _same(adapter, a1)
    assert [str(w.message) for w in record] == [
        f"{d}: restored step 1 instead of 2: step(s) [2] failed verification ({error}). They stay on disk: delete "
        "them, or save with discard_newer=True to replace them"]
    ck.save(2, a2, opt, overwrite=True)  # the restore continued the run; the bad step can be replaced
    _same(ck.restore(adapter_like=a1)[1], a2)
    ck.close()


def test_flipped_bytes_are_reported_with_the_step(two_steps):
    d, a1, a2, opt = two_steps
    for f in (d / "2" / "state" / "d").iterdir():
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x10
        f.write_bytes(bytes(data))
    ck = TrainCheckpointer(d, read_only=True)
    with pytest.raises(CheckpointCorruptError) as info:
        ck.restore()
    assert str(info.value).startswith(f"{d}/2/state: orbax's array metadata could not be read (")
    assert str(info.value).endswith("; the step is damaged")
    with pytest.warns(CheckpointWarning, match=r"restored step 1 instead of 2"):
        _same(ck.restore(adapter_like=a1, fallback=True)[1], a1)
    shutil.rmtree(d / "1" / "state")
    with pytest.raises(CheckpointCorruptError, match=rf"^{re.escape(str(d))}: no intact step at or below 2: step 2: "):
        ck.restore(fallback=True)


def _edit_meta(d: Path, step: int, edit, resign: bool = True) -> None:
    path = d / str(step) / "meta" / "metadata"
    meta = json.loads(path.read_text())
    edit(meta)
    if resign:
        meta.pop("checksum")
        meta["checksum"] = fmt.canonical_sha256(meta)
    path.write_text(json.dumps(meta))


def test_the_step_description_is_verified_and_checked(two_steps):
    d, a1, a2, opt = two_steps
    ck = TrainCheckpointer(d, read_only=True)
    stored = json.loads((d / "2" / "meta" / "metadata").read_text())["checksum"]
    _edit_meta(d, 2, lambda m: m["extra"].update(epoch=3), resign=False)
    raises_exactly(CheckpointCorruptError, f"{d}/2/meta: checksum mismatch: the step's description was modified or "
                                           f"corrupted (stored {stored!r})", ck.restore)
    _edit_meta(d, 2, lambda m: m["opt_state"][1].update(dtype="float33"))
    raises_exactly(CheckpointCorruptError, f"{d}/2/meta: opt_state[1].dtype must be a dtype name, got 'float33' (str)",
                   ck.read_meta, 2)
    # A description asking for a 4 TiB array is refused before anything is allocated: orbax stored (2,).
    path1 = json.loads((d / "1" / "meta" / "metadata").read_text())["opt_state"][1]
    _edit_meta(d, 2, lambda m: m["opt_state"][1].update(dtype="float32", shape=[2**40]))
    raises_exactly(CheckpointCorruptError,
                   f"{d}/2/state: array 'opt_state/leaf_00001' (optimizer state {path1['path']}) is stored as "
                   f"float32{path1['shape']}, the description says float32[{2**40}]", ck.restore)
    (d / "2" / "meta" / "metadata").write_text('{"format": "lowrank_jax.train_checkpoint", "vers')
    with pytest.raises(CheckpointCorruptError, match=rf"^{re.escape(str(d))}/2/meta: the step's description could "
                                                     r"not be read \("):
        ck.read_meta(2)


def test_leftovers_are_named_and_cleaned(two_steps):
    d, a1, a2, opt = two_steps
    (d / "3.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
    (d / f"{LOCK_FILE}.stale-abc").write_text("{}")
    (d / "_lowrank_jax_aside-7-abc").mkdir()  # a moved-aside step without its record: kept, named
    reader = TrainCheckpointer(d, read_only=True)
    assert [p.name for p in reader.leftovers()] == ["3.orbax-checkpoint-tmp", "_lowrank_jax.lock.stale-abc",
                                                    "_lowrank_jax_aside-7-abc"]
    assert reader.all_steps() == [1, 2]
    with pytest.warns(CheckpointWarning) as record:
        writer = TrainCheckpointer(d)
    assert [str(w.message) for w in record] == [
        f"{d}: removed leftovers of an interrupted save: ['3.orbax-checkpoint-tmp', '_lowrank_jax.lock.stale-abc']; "
        "left in place (steps moved aside by an interrupted replacement without a record, or files that could not "
        "be deleted; a moved-aside step can be renamed back to its step number, anything else deleted by hand): "
        "['_lowrank_jax_aside-7-abc']"]
    assert [p.name for p in writer.leftovers()] == ["_lowrank_jax_aside-7-abc"]
    assert writer.all_steps() == [1, 2]
    writer.close()


# =============================================================================================
# 5. Names are unambiguous
# =============================================================================================

def _node():
    _, adapter = lj.init(lj.LoRA(rank=2, targets=r"k/kernel"), {"k": {"kernel": jnp.ones((4, 6))}}, jax.random.key(0))
    return adapter["k"]["kernel"]


@pytest.mark.parametrize("adapter, first, second, name", [
    (lambda n: {"a/b": {"kernel": n}, "a": {"b": {"kernel": n}}}, ["a/b", "kernel"], ["a", "b", "kernel"], "a/b/kernel/a"),
    (lambda n: {"layers": {0: {"kernel": n}, "0": {"kernel": n}}}, ["layers", 0, "kernel"], ["layers", "0", "kernel"],
     "layers/0/kernel/a"),
])
def test_two_node_paths_never_share_a_tensor_name(tmp_path, adapter, first, second, name):
    raises_exactly(ValueError, f"adapter: array 'a' of node {first!r} and array 'a' of node {second!r} both map to the "
                               f"tensor name {name!r} (a key holding '/', or an int and a str key that print alike); "
                               "rename one of the keys", save_adapter, tmp_path / "ad", adapter(_node()))
    assert not (tmp_path / "ad").exists()


def test_adapter_json_names_must_be_unambiguous(saved):
    jpath = _edit_doc(saved, lambda doc: doc["nodes"][1]["arrays"]["a"].update(tensor="enc/fc1/kernel/a"))
    raises_exactly(ValueError, f"{jpath}: tensor 'enc/fc1/kernel/a' is named by both enc/fc1/kernel/a and "
                               "enc/fc2/kernel/a; every array needs its own tensor", load_adapter, saved)

    def alike(doc):
        doc["nodes"][1]["arrays"]["a"]["tensor"] = "enc/fc2/kernel/a"
        doc["nodes"][0]["path"] = ["enc", 0]
        doc["nodes"][1]["path"] = ["enc", "0"]
    jpath = _edit_doc(saved, alike)
    raises_exactly(ValueError, f"{jpath}: node paths ['enc', 0] and ['enc', '0'] both read as 'enc/0'; two adapter "
                               "nodes cannot share a path", load_adapter, saved)


def test_every_tensor_in_the_file_must_be_named(saved):
    tpath = saved / "adapter.safetensors"
    tensors, meta = fmt.read_safetensors(tpath)
    blob = fmt.safetensors_dumps({**tensors, "enc/fc1/kernel/extra": np.zeros(3, np.float32)}, meta)
    tpath.write_bytes(blob)
    _edit_doc(saved, lambda doc: doc["tensors"].update(bytes=len(blob), sha256=__import__("hashlib").sha256(blob).hexdigest()))
    raises_exactly(ValueError, f"{tpath}: holds tensors no node of adapter.json names: ['enc/fc1/kernel/extra']",
                   load_adapter, saved)


def test_peft_names_must_be_unambiguous(peft_dir, tmp_path):
    d, params = peft_dir
    wpath = d / lpeft.WEIGHTS_NAME
    raises_exactly(ValueError, f"{wpath}: PEFT module 'enc.fc1' is ambiguous: under this name_map it is the torch "
                               "module of enc/fc1/kernel, enc/fc2/kernel; make name_map give each kernel its own "
                               "module name", lpeft.load, d, params, name_map=lambda p: "enc.fc1.weight")
    tensors, meta = fmt.read_safetensors(wpath)
    m = np.ones(6, np.float32)
    wpath.write_bytes(fmt.safetensors_dumps({**tensors, "base_model.model.enc.fc1.lora_magnitude_vector": m,
                                             "base_model.model.enc.fc1.lora_magnitude_vector.weight": m}, meta))
    raises_exactly(ValueError, f"{wpath}: module 'enc.fc1' has two 'm' tensors (e.g. '.lora_magnitude_vector' and "
                               "'.lora_magnitude_vector.weight'); which one is meant is ambiguous", lpeft.load, d, params)
    dotted = {"a.b": {"kernel": jnp.ones((4, 6))}, "a": {"b": {"kernel": jnp.ones((4, 6))}}}
    _, adapter = lj.init(lj.LoRA(rank=2, targets=r".*kernel"), dotted, jax.random.key(0))
    raises_exactly(ValueError, "peft.save: several kernels map to the same torch module(s) ['a.b']",
                   lpeft.save, tmp_path / "dotted", adapter)


def test_peft_rank_pattern_of_a_module_does_not_leak_into_a_longer_name(tmp_path):
    """PEFT matches pattern keys against module-name *suffixes*: ``fc``'s rank must not reach ``enc.fc``."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    rng = np.random.default_rng(0)
    params = {"fc": {"kernel": rng.normal(size=(4, 6)).astype(np.float32)},
              "enc": {"fc": {"kernel": rng.normal(size=(6, 5)).astype(np.float32)}},
              "out": {"kernel": rng.normal(size=(5, 3)).astype(np.float32)}}
    frozen, adapter = lj.init([lj.LoRA(rank=2, alpha=4.0, targets=r"fc/kernel"),
                               lj.LoRA(rank=3, alpha=4.0, targets=r"(enc/fc|out)/kernel")], params, jax.random.key(1))
    adapter = randomize(adapter, 3)
    lpeft.save(tmp_path / "ad", adapter)
    assert json.loads((tmp_path / "ad" / lpeft.CONFIG_NAME).read_text())["rank_pattern"] == {"^fc": 2}

    class Enc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(6, 5, bias=False)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.enc, self.out = torch.nn.Linear(4, 6, bias=False), Enc(), torch.nn.Linear(5, 3, bias=False)

        def forward(self, x):
            return self.out(torch.tanh(self.enc.fc(torch.tanh(self.fc(x)))))

    net = Net()
    net.load_state_dict({"fc.weight": torch.from_numpy(params["fc"]["kernel"].T.copy()),
                         "enc.fc.weight": torch.from_numpy(params["enc"]["fc"]["kernel"].T.copy()),
                         "out.weight": torch.from_numpy(params["out"]["kernel"].T.copy())})
    pm = peft.PeftModel.from_pretrained(net.eval(), str(tmp_path / "ad")).eval()
    x = rng.normal(size=(2, 4)).astype(np.float32)
    with torch.no_grad():
        got = pm(torch.from_numpy(x)).numpy()
    m = jax.tree_util.tree_map(np.asarray, lj.merge(frozen, adapter))
    want = np.tanh(np.tanh(x @ m["fc"]["kernel"]) @ m["enc"]["fc"]["kernel"]) @ m["out"]["kernel"]
    np.testing.assert_allclose(got, want, atol=1e-5)
    _, back = lpeft.load(tmp_path / "ad", params)
    assert {p: n.method.rank for p, n in lj.tree.adapter_nodes(back)} == {"fc/kernel": 2, "enc/fc/kernel": 3,
                                                                          "out/kernel": 3}
