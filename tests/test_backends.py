"""The backend registry: one entry makes a backend a --backend choice, a [backend] name and a factory."""

import pytest
from click.testing import CliRunner

from explainer import backends
from explainer.backends import BackendKind, BackendSettings, default_backend_name, make_backend
from explainer.cli import main
from explainer.errors import UserError

ECHO = BackendKind("echo", "answers with the prompt's last line", "echo_backend:from_settings")


@pytest.fixture
def echo_registered(monkeypatch):
    monkeypatch.setitem(backends.BACKENDS, "echo", ECHO)


def test_a_registered_backend_runs_explain_from_the_command_line(echo_registered, tmp_path):
    source = tmp_path / "add.py"
    source.write_text("def add(a, b):\n    return a + b\n")
    result = CliRunner().invoke(
        main, ["explain", str(source), "--backend", "echo", "--model", "e2", "--cache-dir", str(tmp_path / "cache")]
    )
    assert result.exit_code == 0, result.output
    # the post holds the echo backend's answers, and names the model it was given
    assert result.stdout.count("Echo: Answer in English.") == 2
    assert "e2 explained this code" in result.stdout
    # its help lists it with the built-in ones
    help_text = CliRunner().invoke(main, ["explain", "--help"]).stdout
    assert "echo: answers with the prompt's last line" in " ".join(help_text.split())


def test_an_unknown_backend_is_one_line_naming_the_registered_ones(tmp_path):
    result = CliRunner().invoke(main, ["explain", str(tmp_path / "x.py"), "--backend", "claude"])
    assert result.exit_code == 2
    assert "unknown backend 'claude'; use one of openai, local" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "environment, base_url, expected",
    [
        ({}, None, "local"),
        ({"OPENAI_API_KEY": "sk-test"}, None, "openai"),
        ({"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}, None, "openai"),
        ({}, "http://127.0.0.1:9/v1", "openai"),
    ],
)
def test_the_default_is_local_unless_a_key_or_a_server_is_set(monkeypatch, environment, base_url, expected):
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert default_backend_name(base_url) == expected


def test_a_setting_another_backend_takes_is_refused_with_the_way_out():
    with pytest.raises(
        UserError, match="--base-url / base_url is for the openai backend; leave it out with the local backend"
    ):
        make_backend(BackendSettings(name="local", base_url="http://127.0.0.1:9/v1"))
    with pytest.raises(UserError, match="batch_size is for the local backend"):
        make_backend(BackendSettings(name="openai", batch_size=4, base_url="http://127.0.0.1:9/v1"))


def test_making_the_local_backend_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys; from explainer.backends import BackendSettings, make_backend; "
        "b = make_backend(BackendSettings(name='local')); print(b.name, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["local", "False"]
