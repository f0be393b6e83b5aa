"""Live demos: blocks marked `demo` run at build time and their real output is published below them."""

import os
import secrets
import select
import sys
import threading
import time
from pathlib import Path

import pytest
from markdown_it import MarkdownIt
from mdit_py_plugins.front_matter import front_matter_plugin

from explainer.demos import DemoRunner, expand_demos
from explainer.errors import UserError

needs_proc = pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds processes in /proc")


def fences(markdown: str) -> list[tuple[str, str]]:
    """(info, content) of every fenced block, as a CommonMark parser sees them."""
    tokens = MarkdownIt("commonmark").use(front_matter_plugin).parse(markdown)
    return [(token.info, token.content) for token in tokens if token.type == "fence"]


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    (root / "notes.txt").write_text("first version\n")
    (root / "unrelated.txt").write_text("nobody reads me\n")
    return root


def runner_for(project, **options):
    return DemoRunner(project, project.parent / "cache", **options)


def unique_sleep() -> str:
    """A sleep's length no other process has as an argument, to find the sleep by."""
    return f"30.{secrets.randbelow(10**9):09d}"


def running(argument: str) -> bool:
    """Whether any process has `argument` as one of its command-line arguments."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                arguments = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:  # it ended meanwhile
                continue
            if argument.encode() in arguments:
                return True
    return False


POST = """---
title: Demo
---

Read the notes:

```sh demo
cat notes.txt
echo "done {{ page.title }}"
```

A plain block stays as it is:

```python
print("not run")
```
"""


def test_demo_runs_from_project_root_and_output_goes_below_it(project):
    published = expand_demos(POST, runner_for(project), "post.md")
    assert fences(published) == [
        ("sh", 'cat notes.txt\necho "done {{ page.title }}"\n'),
        ("", "first version\ndone {{ page.title }}\n"),
        ("python", 'print("not run")\n'),
    ]
    assert published.startswith("---\ntitle: Demo\n---\n\nRead the notes:\n")


def test_unchanged_demo_comes_from_cache_and_named_files_invalidate_it(project):
    runner = runner_for(project)
    first = expand_demos(POST, runner, "post.md")
    assert (runner.runs, runner.cache_hits) == (1, 0)

    (project / "unrelated.txt").write_text("edited, but the demo doesn't name it\n")
    again = expand_demos(POST, runner_for(project), "post.md")  # a new build, same cache folder
    assert again == first

    runner = runner_for(project)
    (project / "notes.txt").write_text("second version\n")
    changed = expand_demos(POST, runner, "post.md")
    assert (runner.runs, runner.cache_hits) == (1, 0)
    assert ("", "second version\ndone {{ page.title }}\n") in fences(changed)


def test_rerun_forces_a_fresh_run(project):
    expand_demos(POST, runner_for(project), "post.md")
    runner = runner_for(project, rerun=True)
    expand_demos(POST, runner, "post.md")
    assert (runner.runs, runner.cache_hits) == (1, 0)


def test_python_module_demo_is_rerun_when_the_package_changes(project):
    package = project / "toy"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text("print('toy says hi')\n")
    post = "```sh demo\npython -m toy\n```\n"
    assert fences(expand_demos(post, runner_for(project), "p.md"))[1] == ("", "toy says hi\n")

    (package / "__main__.py").write_text("print('toy says bye')\n")
    runner = runner_for(project)
    assert fences(expand_demos(post, runner, "p.md"))[1] == ("", "toy says bye\n")
    assert runner.runs == 1


def test_python_in_a_shell_demo_is_the_interpreter_running_the_build(project, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # as in CI, where the venv isn't on PATH
    post = "```sh demo\npython -c 'import sys; print(sys.prefix)'\n```\n"
    assert fences(expand_demos(post, runner_for(project), "p.md"))[1] == ("", sys.prefix + "\n")


def test_python_demo_block(project):
    post = "```python demo\nprint(open('notes.txt').read().upper(), end='')\n```\n"
    assert fences(expand_demos(post, runner_for(project), "p.md")) == [
        ("python", "print(open('notes.txt').read().upper(), end='')\n"),
        ("", "FIRST VERSION\n"),
    ]


def test_failing_demo_fails_with_the_tail_of_its_output_and_is_not_cached(project):
    post = "intro\n\n```sh demo\nfor i in $(seq 1 50); do echo line $i; done\nexit 3\n```\n"
    runner = runner_for(project)
    with pytest.raises(UserError) as error:
        expand_demos(post, runner, "p.md")
    message = str(error.value)
    assert "p.md:3" in message and "exit code 3" in message and "allow-errors" in message
    assert "line 50" in message and "line 1\n" not in message
    retry = runner_for(project)
    with pytest.raises(UserError):
        expand_demos(post, retry, "p.md")
    assert retry.runs == 1


def test_allow_errors_publishes_the_failure(project):
    post = "```python demo allow-errors\nraise SystemExit('bad input')\n```\n"
    assert fences(expand_demos(post, runner_for(project), "p.md")) == [
        ("python", "raise SystemExit('bad input')\n"),
        ("", "bad input\n"),
    ]


@needs_proc
def test_timeout_kills_the_demo_and_its_children(project):
    child = unique_sleep()
    post = f"```sh demo timeout=0.5\nsleep {child} &\nwait\n```\n"
    with pytest.raises(UserError, match="timed out after 0.5 s"):
        expand_demos(post, runner_for(project), "p.md")
    assert not running(child)


def test_a_demo_that_never_ends_times_out_though_it_holds_the_output_pipe(project):
    started = time.monotonic()
    with pytest.raises(UserError, match="timed out after 2 s"):
        expand_demos("```sh demo timeout=2\nsleep infinity\n```\n", runner_for(project), "p.md")
    assert time.monotonic() - started < 10  # the deadline, not the sleep, ended it


@needs_proc
def test_a_child_that_leaves_the_session_is_killed_when_the_demo_ends(project):
    # The child keeps the output pipe open; waiting for the pipe to close would time the demo out.
    child = unique_sleep()
    post = f"```sh demo timeout=10\nsetsid sleep {child} &\necho done\n```\n"
    assert fences(expand_demos(post, runner_for(project), "p.md"))[1] == ("", "done\n")
    assert not running(child)


@needs_proc
def test_no_background_child_outlives_its_demo(project):
    child = unique_sleep()
    post = f"```sh demo\nsleep {child} > /dev/null 2>&1 &\necho started\n```\n"  # not holding the pipe
    assert fences(expand_demos(post, runner_for(project), "p.md"))[1] == ("", "started\n")
    assert not running(child)


@needs_proc
def test_stop_ends_a_running_demo_and_every_child_it_started(project):
    left_session, in_group = unique_sleep(), unique_sleep()
    os.mkfifo(project / "started")
    signal_read = os.open(project / "started", os.O_RDONLY | os.O_NONBLOCK)
    post = (
        f"```sh demo timeout=60\nsetsid sleep {left_session} &\nsleep {in_group} &\necho started > started\nwait\n```\n"
    )
    runner, outcome = runner_for(project), []

    def build():
        try:
            expand_demos(post, runner, "p.md")
        except KeyboardInterrupt as error:  # anything else: outcome stays empty, and the test fails
            outcome.append(error)

    thread = threading.Thread(target=build)
    thread.start()
    try:
        readable, _, _ = select.select([signal_read], [], [], 30)  # the demo is running
        assert readable, outcome
    finally:
        os.close(signal_read)
        runner.stop()  # what Ctrl-C in `explainer build` does
        thread.join(30)
    assert [type(error) for error in outcome] == [KeyboardInterrupt]  # stopped, not finished
    assert not running(left_session) and not running(in_group)


def test_a_demo_sees_no_key_or_token_of_the_build(project, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-build-secret")
    monkeypatch.setenv("MY_TOKEN", "build-secret-token")
    monkeypatch.setenv("LC_DEPLOY_KEY", "build-secret-lc")  # looks like a locale name, is a key
    # the review's finding: a pattern LC_* let these through, and a demo printed them
    monkeypatch.setenv("LC_GITHUB_PAT", "build-secret-pat")
    monkeypatch.setenv("LC_DB_PASSWORD", "build-secret-password")
    monkeypatch.setenv("TZ", "UTC")
    monkeypatch.setenv("LC_TIME", "C")  # a real locale category passes
    post = "```sh demo\necho key=$OPENAI_API_KEY\necho token=$MY_TOKEN\nenv\n```\n"
    published = expand_demos(post, runner_for(project), "p.md")

    output = fences(published)[1][1].splitlines()
    assert output[:2] == ["key=", "token="]
    assert "build-secret" not in published
    assert {"TZ=UTC", "LC_TIME=C", "TERM=dumb", "NO_COLOR=1"} <= set(output)
    assert not any(line.startswith(("LC_DEPLOY_KEY=", "LC_GITHUB_PAT=", "LC_DB_PASSWORD=")) for line in output)
    for stored in (project.parent / "cache").rglob("*"):
        assert stored.is_dir() or b"build-secret" not in stored.read_bytes()


def test_output_over_the_limit_is_cut_with_a_visible_marker(project):
    post = (
        "```python demo\nimport sys\nmebibyte = ('x' * 1023 + '\\n') * 1024\n"
        "for _ in range(200):\n    sys.stdout.write(mebibyte)\n```\n"
    )
    published = expand_demos(post, runner_for(project), "p.md")
    assert len(published.encode()) < 1.1 * (1 << 20)
    assert published.endswith("x\n… output truncated: 1 MiB shown of 200 MiB\n```\n")


def test_a_character_cut_by_the_limit_is_left_out_and_the_limit_is_part_of_the_cache_key(project):
    post = "```sh demo\nprintf 'ééééé'\n```\n"  # 10 bytes
    published = expand_demos(post, runner_for(project, output_limit=5), "p.md")
    assert fences(published)[1] == ("", "éé\n… output truncated: 5 bytes shown of 10 bytes\n")
    runner = runner_for(project)
    assert fences(expand_demos(post, runner, "p.md"))[1] == ("", "ééééé\n")
    assert runner.runs == 1


def test_without_a_runner_demos_are_published_as_plain_code_and_nothing_runs(project):
    post = "```sh demo allow-errors\ntouch ran.txt\n```\n\nafter\n"
    assert expand_demos(post, None, "p.md") == "```sh\ntouch ran.txt\n```\n\nafter\n"
    assert not (project / "ran.txt").exists()


def test_output_with_backticks_gets_a_longer_fence_and_containers_keep_it(project):
    post = "> quoted demo:\n>\n> ```sh demo\n> printf 'a\\n```\\n\\nb\\n'\n> ```\n"
    published = expand_demos(post, runner_for(project), "p.md")
    assert fences(published)[1] == ("", "a\n```\n\nb\n")
    tokens = MarkdownIt("commonmark").parse(published)
    assert [token.type for token in tokens].count("blockquote_open") == 1


def test_unknown_demo_language_is_one_clear_error(project):
    with pytest.raises(UserError, match=r"p.md:1: can't run a ```ruby demo"):
        expand_demos("```ruby demo\nputs 1\n```\n", runner_for(project), "p.md")


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e308", "0", "-5", "soon", "86401"])
def test_a_demo_timeout_that_is_not_a_sane_number_of_seconds_is_one_clear_error(project, value):
    # timeout=inf crashed the supervisor with an OverflowError; no demo may run with such a deadline
    with pytest.raises(UserError) as error:
        expand_demos(f"```sh demo timeout={value}\ntouch ran\n```\n", runner_for(project), "p.md")
    message = str(error.value)
    assert message.startswith(f"p.md:1: demo fence has 'timeout={value}'") and "\n" not in message
    assert "at most 86400" in message
    assert not (project / "ran").exists()


def test_without_a_cache_folder_demos_always_run(project):
    runner = DemoRunner(project, None)
    expand_demos(POST, runner, "p.md")
    expand_demos(POST, runner, "p.md")
    assert runner.runs == 2
