"""Live demos: blocks marked `demo` run at build time and their real output is published below them."""

import os
import select
import sys

import pytest
from markdown_it import MarkdownIt
from mdit_py_plugins.front_matter import front_matter_plugin

from explainer.demos import DemoRunner, expand_demos
from explainer.errors import UserError


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


def test_timeout_kills_the_demo_and_its_children(project):
    # The background sleep keeps the output pipe open: only killing the whole group ends it.
    post = "```sh demo timeout=0.5\nsleep 60 &\necho $! > child.pid\nwait\n```\n"
    with pytest.raises(UserError, match="timed out after 0.5 s"):
        expand_demos(post, runner_for(project), "p.md")
    child = int((project / "child.pid").read_text())
    try:
        handle = os.pidfd_open(child)
    except ProcessLookupError:
        return  # already gone
    # A pidfd turns readable when its process exits; the killed child must exit long before its 60 s.
    # (It may still be finishing its exit right after the pipe closed, so wait for that event.)
    try:
        readable, _, _ = select.select([handle], [], [], 20)
    finally:
        os.close(handle)
    assert readable, "the demo's background child outlived the timeout"


def test_output_with_backticks_gets_a_longer_fence_and_containers_keep_it(project):
    post = "> quoted demo:\n>\n> ```sh demo\n> printf 'a\\n```\\n\\nb\\n'\n> ```\n"
    published = expand_demos(post, runner_for(project), "p.md")
    assert fences(published)[1] == ("", "a\n```\n\nb\n")
    tokens = MarkdownIt("commonmark").parse(published)
    assert [token.type for token in tokens].count("blockquote_open") == 1


def test_unknown_demo_language_is_one_clear_error(project):
    with pytest.raises(UserError, match=r"p.md:1: can't run a ```ruby demo"):
        expand_demos("```ruby demo\nputs 1\n```\n", runner_for(project), "p.md")


def test_without_a_cache_folder_demos_always_run(project):
    runner = DemoRunner(project, None)
    expand_demos(POST, runner, "p.md")
    expand_demos(POST, runner, "p.md")
    assert runner.runs == 2
