"""tokscale.native: C kernels compiled for this machine at first use, cached, and None (the PyTorch path) whenever
they cannot or should not be used, with the reason logged."""

import ctypes
import logging
import shutil

import pytest

from tokscale import native

ADD = "int add(int a, int b) { return a + b + OFFSET; }\n"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(native.NATIVE_DIR_ENV, str(tmp_path / "cache"))
    for key in (native.NATIVE_ENV, "ATEN_CPU_CAPABILITY", "CC"):
        monkeypatch.delenv(key, raising=False)
    native._build_and_load.cache_clear()
    yield tmp_path / "cache"
    native._build_and_load.cache_clear()


def _add(lib: ctypes.CDLL, a: int, b: int) -> int:
    lib.add.argtypes, lib.add.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return lib.add(a, b)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")
def test_a_kernel_compiles_once_per_source_and_defines_and_loads(tmp_path, cache):
    src = tmp_path / "add.c"
    src.write_text(ADD)
    lib = native.load_kernel(src, "add", (("OFFSET", 10),))
    assert _add(lib, 1, 2) == 13
    built = sorted(cache.glob("add-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    native._build_and_load.cache_clear()  # a new process: the library on disk is reused, not rebuilt
    assert _add(native.load_kernel(src, "add", (("OFFSET", 10),)), 1, 2) == 13
    assert built[0].stat().st_mtime_ns == mtime
    assert _add(native.load_kernel(src, "add", (("OFFSET", 0),)), 1, 2) == 3  # other defines: another library
    src.write_text(ADD.replace("a + b", "a * b"))  # an edited source is rebuilt
    assert _add(native.load_kernel(src, "add", (("OFFSET", 0),)), 2, 3) == 6
    assert len(list(cache.glob("add-*.so"))) == 3
    assert len(list(cache.iterdir())) == 3  # the three libraries and no temporary file left behind


@pytest.mark.parametrize(
    "env, reason",
    [
        ({native.NATIVE_ENV: "0"}, "TOKSCALE_NATIVE=0"),
        ({"ATEN_CPU_CAPABILITY": "default"}, "ATEN_CPU_CAPABILITY=default"),
    ],
)
def test_the_environment_turns_kernels_off(tmp_path, cache, monkeypatch, caplog, env, reason):
    src = tmp_path / "add.c"
    src.write_text(ADD)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    native._log_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="tokscale.native"):
        assert native.load_kernel(src, "add", (("OFFSET", 0),)) is None
    assert reason in caplog.text
    assert not cache.exists()  # nothing was compiled


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")
def test_a_source_that_does_not_compile_falls_back_and_names_the_file(tmp_path, cache, caplog):
    src = tmp_path / "broken.c"
    src.write_text("int add(int a, int b) { return a + ; }\n")
    with caplog.at_level(logging.WARNING, logger="tokscale.native"):
        assert native.load_kernel(src, "broken") is None
    assert "broken.c" in caplog.text and "PyTorch path runs" in caplog.text
    assert not list(cache.glob("*"))  # the failed build's temporary file is removed


def test_no_compiler_falls_back_with_a_warning(tmp_path, cache, monkeypatch, caplog):
    src = tmp_path / "add.c"
    src.write_text(ADD)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with caplog.at_level(logging.WARNING, logger="tokscale.native"):
        assert native.load_kernel(src, "add", (("OFFSET", 0),)) is None
    assert "no C compiler" in caplog.text


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")
def test_an_unwritable_cache_falls_back_with_a_warning(tmp_path, monkeypatch, caplog):
    src = tmp_path / "add.c"
    src.write_text(ADD)
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(
        native.NATIVE_DIR_ENV, str(blocker / "cache")
    )  # a directory under a file: cannot exist
    for key in (native.NATIVE_ENV, "ATEN_CPU_CAPABILITY", "CC"):
        monkeypatch.delenv(key, raising=False)
    native._build_and_load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="tokscale.native"):
            assert native.load_kernel(src, "add", (("OFFSET", 0),)) is None
    finally:
        native._build_and_load.cache_clear()
    assert "PyTorch path runs" in caplog.text
