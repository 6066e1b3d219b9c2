"""The package as a Python user expects it (issue 12), in one process: the exception table (a
specific class per status that also inherits the builtin a user catches), close() and `with`
on every root object, no communicator in a single-process program, LoadReport's short repr,
`python -m dsd`, typed keyword arguments, py.typed and a docstring on every public name."""
from __future__ import annotations

import builtins
import dataclasses
import glob
import inspect
import os
import pickle
import subprocess
import sys

import pytest
import torch

import dsd
from dsd import _capi, _dist, _errors

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE_DIR = os.path.dirname(os.path.abspath(dsd.__file__))

# status -> (dsd class, the builtins it must also be)
TABLE = {
    "DSD_E_INVALID_ARGUMENT": ("InvalidArgumentError", (ValueError,)),
    "DSD_E_STALE_HANDLE": ("StaleHandleError", (ValueError,)),
    "DSD_E_WRONG_KIND": ("WrongKindError", (TypeError,)),
    "DSD_E_NOT_FOUND": ("NotFoundError", (FileNotFoundError, KeyError)),
    "DSD_E_UNEXPECTED_KEY": ("UnexpectedKeyError", (KeyError,)),
    "DSD_E_DTYPE_MISMATCH": ("DtypeMismatchError", (TypeError, ValueError)),
    "DSD_E_SHAPE_MISMATCH": ("ShapeMismatchError", (ValueError,)),
    "DSD_E_DEVICE": ("DeviceError", (ValueError,)),
    "DSD_E_IO": ("IOError", (OSError,)),
    "DSD_E_CORRUPT": ("CorruptError", (OSError,)),
    "DSD_E_EXISTS": ("ExistsError", (FileExistsError,)),
    "DSD_E_COMM": ("CommError", (RuntimeError,)),
    "DSD_E_TIMEOUT": ("TimeoutError", (builtins.TimeoutError,)),
    "DSD_E_NO_SPACE": ("NoSpaceError", (OSError,)),
    "DSD_E_UNSUPPORTED": ("UnsupportedError", (NotImplementedError,)),
    "DSD_E_OUT_OF_MEMORY": ("OutOfMemoryError", (MemoryError,)),
    "DSD_E_INTERNAL": ("InternalError", (RuntimeError,)),
    "DSD_E_BUFFER_TOO_SMALL": ("BufferTooSmallError", (ValueError,)),
    "DSD_E_ABI_MISMATCH": ("AbiMismatchError", (ImportError,)),
    "DSD_E_STATE": ("StateError", (RuntimeError,)),
    "DSD_E_CALLBACK": ("CallbackError", (RuntimeError,)),
    "DSD_E_READ_ONLY": ("ReadOnlyError", (ValueError,)),
}


# --- exceptions ------------------------------------------------------------------------------

def test_every_status_has_its_class_and_builtin():
    codes = sorted(name for name in dir(dsd.lib) if name.startswith("DSD_E_"))
    assert codes == sorted(TABLE) and len(codes) == 22, codes
    for name, (cls_name, bases) in TABLE.items():
        code = getattr(dsd.lib, name)
        cls = getattr(dsd, cls_name)
        e = _errors.error_for(code, f"message of {name}", "the/context")
        assert type(e) is cls, (name, type(e))
        for base in (dsd.Error, RuntimeError, *bases):
            assert isinstance(e, base), (name, base)
        # OSError and KeyError subclasses keep the dsd message as str(e), and code/context.
        assert str(e) == f"message of {name}" and e.message == str(e)
        assert (e.code, e.code_name, e.context) == (code, _capi.status_name(code), "the/context")
        assert e.args == (f"message of {name}",)
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is cls and str(back) == str(e) and back.context == e.context
        with pytest.raises(bases[0]):
            raise e
    assert type(_errors.error_for(999, "unknown")) is dsd.Error
    assert issubclass(dsd.StaleHandleError, dsd.HandleError) and issubclass(dsd.WrongKindError, dsd.HandleError)
    e = _errors.error_for(dsd.lib.DSD_E_NO_SPACE, "disk full", "/ck/x")
    assert (e.errno, e.strerror, e.filename) == (28, "disk full", "/ck/x")


def test_errors_from_real_calls(tmp_path):
    sd = {"w": torch.ones(4), "n": 1}
    dsd.save(sd, tmp_path / "ck")
    with pytest.raises(FileExistsError) as e:
        dsd.save(sd, tmp_path / "ck")
    assert type(e.value) is dsd.ExistsError and "overwrite" in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        dsd.load(sd, tmp_path / "nothing")
    assert type(e.value) is dsd.NotFoundError and str(tmp_path / "nothing") in str(e.value)
    with pytest.raises(KeyError):  # a missing key under strict is a KeyError too
        dsd.load({"w": torch.zeros(4), "absent": torch.zeros(1)}, tmp_path / "ck")
    with pytest.raises(ValueError) as e:
        dsd.load({"w": torch.zeros(5)}, tmp_path / "ck")
    assert type(e.value) is dsd.ShapeMismatchError
    with pytest.raises(TypeError) as e:
        dsd.load({"w": torch.zeros(4, dtype=torch.int32)}, tmp_path / "ck")
    assert type(e.value) is dsd.DtypeMismatchError
    with pytest.raises(ValueError) as e:
        dsd.Communicator.file_store(tmp_path / "store", 3, 2)
    assert type(e.value) is dsd.InvalidArgumentError
    (path,) = glob.glob(str(tmp_path / "ck" / "*.safetensors"))
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 8)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(OSError) as e:
        dsd.verify(tmp_path / "ck")
    assert type(e.value) is dsd.CorruptError and os.path.basename(path) in str(e.value)
    model = torch.nn.Linear(2, 2)
    msd = dsd.get_model_state_dict(model)
    msd["extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        dsd.set_model_state_dict(model, msd)


def test_star_import_does_not_shadow_builtins():
    ns: dict = {}
    exec("from dsd import *", ns)
    assert "IOError" not in ns and "TimeoutError" not in ns
    exec("x = IOError; y = TimeoutError", ns)
    assert ns["x"] is builtins.OSError and ns["y"] is builtins.TimeoutError
    assert dsd.IOError is not builtins.IOError and issubclass(dsd.IOError, OSError)
    assert issubclass(dsd.TimeoutError, builtins.TimeoutError)
    for name, (cls_name, _) in TABLE.items():
        assert cls_name in dsd.__all__ or cls_name in ("IOError", "TimeoutError"), cls_name


# --- close() and with ------------------------------------------------------------------------

def _roots(tmp_path):
    """(name, a fresh root object, a call that uses it)."""
    sd = {"w": torch.ones(3)}
    yield "Communicator", dsd.Communicator.local(), lambda c: c.barrier()
    yield "StateDict", dsd.StateDict.from_python(sd), len
    yield ("CheckpointManager", dsd.CheckpointManager(tmp_path / "m", keep_last=1),
           lambda m: m.latest_step())
    yield "AsyncCheckpointer", dsd.AsyncCheckpointer(), lambda a: a.save(sd, tmp_path / "a2")
    with dsd.AsyncCheckpointer() as ckpt:
        future = ckpt.save(sd, tmp_path / "a1")
        future.result(timeout=60)
        yield "SaveFuture", future, lambda f: f.done()


def test_every_root_closes_and_is_a_context_manager(tmp_path):
    names = []
    for name, obj, use in _roots(tmp_path):
        names.append(name)
        assert not obj.closed
        use(obj)
        with obj as same:
            assert same is obj
        assert obj.closed
        obj.close()  # idempotent
        with pytest.raises(dsd.StaleHandleError, match=f"{name} is closed") as e:
            use(obj)
        assert isinstance(e.value, ValueError) and e.value.code == dsd.lib.DSD_E_STALE_HANDLE
    assert names == ["Communicator", "StateDict", "CheckpointManager", "AsyncCheckpointer", "SaveFuture"]


def test_a_future_leaving_with_waits_for_the_save(tmp_path):
    with dsd.async_save({"w": torch.full((256,), 2.0)}, tmp_path / "ck") as future:
        pass
    assert future.closed
    assert torch.equal(dsd.load_full(tmp_path / "ck")["w"], torch.full((256,), 2.0))


def test_communicator_close_closes_its_default_checkpointer(tmp_path):
    with dsd.Communicator.local() as comm:
        dsd.async_save({"w": torch.ones(2)}, tmp_path / "ck", comm=comm).result(timeout=60)
        ckpt = comm.async_checkpointer
        assert ckpt is not None and not ckpt.closed
    assert ckpt.closed and comm.async_checkpointer is None
    assert repr(comm) == "dsd.Communicator(closed)"


# --- the communicator rule -------------------------------------------------------------------

def test_a_single_process_makes_no_communicator(tmp_path, monkeypatch):
    import torch.distributed as dist

    assert not dist.is_initialized()

    def refuse(*args, **kwargs):
        raise AssertionError("a single-process call made a communicator")

    for ctor in ("from_env", "local", "file_store"):
        monkeypatch.setattr(dsd.Communicator, ctor, classmethod(refuse))
    _dist.close_process_communicator()
    sd = {"w": torch.arange(6.0), "nested": {"step": 3}}
    dsd.save(sd, tmp_path / "ck")
    dsd.load({"w": torch.zeros(6), "nested": {"step": 0}}, tmp_path / "ck")
    dsd.async_save(sd, tmp_path / "ak").result(timeout=60)
    with dsd.CheckpointManager(tmp_path / "m", keep_last=2) as manager:
        assert manager.comm is None
        manager.save(sd, 1)
        assert manager.load_latest({"w": torch.zeros(6), "nested": {"step": 0}}) == 1
    dsd.get_state_dict(torch.nn.Linear(2, 2), [])
    assert _dist._PROCESS_COMM is None


def test_an_explicit_comm_wins_and_reaches_the_manager(tmp_path, monkeypatch):
    seen = []
    real = _capi.checkpoint_manager_new
    monkeypatch.setattr(_capi, "checkpoint_manager_new",
                        lambda comm, root, keep_last: seen.append((comm, keep_last)) or real(comm, root, keep_last))
    with dsd.Communicator.local() as comm:
        with dsd.CheckpointManager(tmp_path / "m", keep_last=2, comm=comm) as manager:
            assert manager.comm is comm
            for step in (1, 2, 3):
                manager.save({"w": torch.full((2,), float(step))}, step)
            dst = {"w": torch.zeros(2)}
            assert manager.load_latest(dst) == 3 and torch.equal(dst["w"], torch.full((2,), 3.0))
        assert sorted(os.listdir(tmp_path / "m")) == ["latest", "step_2", "step_3"]
        assert seen == [(comm.ptr, 2)]
        with dsd.use_communicator(comm):
            assert _dist.communicator_for(None) is comm
            other = dsd.Communicator.local()
            assert _dist.communicator_for(other) is other
            other.close()
    assert _dist._PROCESS_COMM is None


# --- LoadReport ------------------------------------------------------------------------------

def test_load_report_repr_summarises():
    many = [f"layers.{i}.weight" for i in range(1000)]
    r = dsd.LoadReport(missing_keys=many, unexpected_keys=["x"], skipped_keys=[])
    text = repr(r)
    assert text == ("LoadReport(missing_keys=1000 ['layers.0.weight', 'layers.1.weight', "
                    "'layers.2.weight', ... 997 more], unexpected_keys=1 ['x'], skipped_keys=0)")
    assert len(text) < 200 and r.missing_keys == many  # the lists themselves are complete
    assert repr(dsd.LoadReport()) == "LoadReport(missing_keys=0, unexpected_keys=0, skipped_keys=0)"


# --- python -m dsd ---------------------------------------------------------------------------

def _python_m_dsd(*args, **env):
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(PACKAGE_DIR), e.get("PYTHONPATH")]))
    e.update(env)
    return subprocess.run([sys.executable, "-m", "dsd", *map(str, args)], capture_output=True,
                          text=True, timeout=120, env=e)


def test_python_m_dsd_runs_the_cli(tmp_path):
    p = _python_m_dsd("--help")
    assert p.returncode == 0, p.stderr
    for sub in ("inspect", "verify", "convert", "diff"):
        assert sub in p.stdout
    dsd.save({"w": torch.randn(1000)}, tmp_path / "ck")
    p = _python_m_dsd("verify", tmp_path / "ck")
    assert p.returncode == 0 and "intact" in p.stdout, p.stdout + p.stderr
    p = _python_m_dsd("inspect", tmp_path / "ck")
    assert p.returncode == 0 and "w" in p.stdout, p.stderr
    assert _python_m_dsd("verify", tmp_path / "missing").returncode == 3
    (path,) = glob.glob(str(tmp_path / "ck" / "*.safetensors"))
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 100)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))
    assert _python_m_dsd("verify", tmp_path / "ck").returncode == 1
    assert _python_m_dsd("no-such-subcommand").returncode == 2
    p = _python_m_dsd("--help", DSD_CLI=str(tmp_path / "nope"))
    assert p.returncode == 127 and "DSD_CLI" in p.stderr
    assert dsd.cli_main(["verify", str(tmp_path / "missing")]) == 3


# --- typing and docstrings -------------------------------------------------------------------

def test_py_typed_is_shipped():
    assert os.path.isfile(os.path.join(PACKAGE_DIR, "py.typed"))


def _public_callables():
    """(qualified name, object) of every public function, class, method and property."""
    for name in dsd.__all__:
        obj = getattr(dsd, name)
        if inspect.isfunction(obj):
            yield name, obj
        elif inspect.isclass(obj):
            yield name, obj
            for attr, member in vars(obj).items():
                if attr.startswith("_") and attr != "__init__":
                    continue
                if attr == "__init__" and (not inspect.isfunction(member) or dataclasses.is_dataclass(obj)):
                    continue  # a dataclass's generated __init__: its class documents the fields
                if isinstance(member, (classmethod, staticmethod)):
                    member = member.__func__
                if inspect.isfunction(member) or isinstance(member, property):
                    yield f"{name}.{attr}", member


def test_every_public_name_has_a_docstring():
    missing = [qual for qual, obj in _public_callables()
               if (obj.__module__ if not isinstance(obj, property) else obj.fget.__module__).startswith("dsd")
               and not (obj.__doc__ or "").strip()]
    assert not missing, "public names without a docstring:\n" + "\n".join(missing)


def test_no_public_function_takes_var_keywords():
    offenders = []
    for qual, obj in _public_callables():
        if isinstance(obj, property) or inspect.isclass(obj):
            continue
        if any(p.kind is p.VAR_KEYWORD for p in inspect.signature(obj).parameters.values()):
            offenders.append(qual)
    assert not offenders, offenders
    sd = {"w": torch.ones(1)}
    for call in (lambda: dsd.save(sd, "/nonexistent/x", no_such_option=True),
                 lambda: dsd.async_save(sd, "/nonexistent/x", no_such_option=True),
                 lambda: dsd.load(sd, "/nonexistent/x", no_such_option=True)):
        with pytest.raises(TypeError, match="no_such_option"):
            call()
    sig = inspect.signature(dsd.save).parameters
    assert (sig["overwrite"].default, sig["thread_count"].default, sig["sync_files"].default,
            sig["block_size"].default, sig["format"].default) == (False, 0, True, None, "dsd")
    assert sig["overwrite"].kind is inspect.Parameter.KEYWORD_ONLY
