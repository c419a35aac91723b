"""The block-end tree picture, drawn by a child process (`engine.tree_picture`): a real PNG
from a real journal, an environment without the API key, a loop that never waits for it,
and a child that never outlives its engine."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import unprivileged
from git_project import make_git_project
from scripted_agent import ScriptedAgent, run_scripted
from test_report import assert_png, write_journal
from waiting import wait_for

from engine import tree_picture
from engine.runner.isolation import environment_without_secrets
from engine.tree_picture import draw_tree_picture

FAKE_KEY = "sk-ant-api03-not-a-real-key-0123456789"

# Test drawers: each is the child's command; they get the real drawer's arguments.
ENV_DUMP = ("import json, os, sys\n"
            "open(sys.argv[3], 'w').write(json.dumps(dict(os.environ)))\n")
HANG = ("import os, sys, time\n"  # says its pid (whole, by a rename), then never ends
        "open(sys.argv[3] + '.tmp', 'w').write(str(os.getpid()))\n"
        "os.replace(sys.argv[3] + '.tmp', sys.argv[3])\n"
        "while True:\n    time.sleep(60)\n")
NO_MATPLOTLIB = ("import sys\nsys.modules['matplotlib'] = None  # as if it were not installed\n"
                 "from engine.tree_picture import main\nsys.exit(main())\n")
# Notes its call and environment in the run folder, waits to be released, then draws.
HELD = ("import json, os, sys, time\nfrom pathlib import Path\n"
        "run_dir = Path(sys.argv[1])\n"
        "with open(run_dir / 'drawer-calls', 'a') as calls:\n"
        "    calls.write(json.dumps({'argv': sys.argv[1:], 'env': dict(os.environ)}) + '\\n')\n"
        "deadline = time.monotonic() + 120\n"
        "while not (run_dir / 'drawer-release').exists():\n"
        "    if time.monotonic() > deadline:\n"
        "        sys.exit('never released')\n"
        "    time.sleep(0.02)\n"
        "from engine.tree_picture import main\nsys.exit(main())\n")


def use_drawer(monkeypatch: pytest.MonkeyPatch, code: str) -> None:
    monkeypatch.setattr(tree_picture, "DRAWER", (sys.executable, "-c", code))


def gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


async def test_the_child_draws_the_picture_from_the_journal(tmp_path):
    pytest.importorskip("matplotlib")
    write_journal(tmp_path / "r1", "r1", "heuristic")
    picture = tmp_path / "r1" / "memory" / "tree_block_001.png"
    assert await draw_tree_picture(tmp_path / "r1", 4, picture) is None
    assert_png(picture)


def test_a_normal_user_draws_the_picture_of_their_own_run(reachable_tmp):
    """As uid 65534 (no home of its own, so matplotlib has no cache folder either), on a
    run that user owns: the picture is drawn, as it is for root."""
    pytest.importorskip("matplotlib")
    if os.geteuid() != 0 or unprivileged.available() is not None:
        pytest.skip("needs root, to become another user")
    run_dir = reachable_tmp / "r1"
    write_journal(run_dir, "r1", "heuristic")
    unprivileged.give_to_nobody(run_dir)
    picture = run_dir / "memory" / "tree_block_001.png"
    env = unprivileged.environment_for_nobody(
        {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parent.parent)},
        reachable_tmp / "hold")
    done = subprocess.run(
        unprivileged.argv_as_nobody([sys.executable, "-m", "engine.tree_picture",
                                     str(run_dir), "4", str(picture)]),
        env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_png(picture)
    assert picture.stat().st_uid == unprivileged.NOBODY


async def test_without_matplotlib_the_picture_is_skipped_quietly(tmp_path, monkeypatch):
    write_journal(tmp_path / "r1", "r1", "heuristic")
    use_drawer(monkeypatch, NO_MATPLOTLIB)
    picture = tmp_path / "r1" / "memory" / "tree_block_001.png"
    assert await draw_tree_picture(tmp_path / "r1", 4, picture) is None
    assert not picture.exists()


async def test_a_picture_that_cannot_be_written_is_one_line(tmp_path):
    pytest.importorskip("matplotlib")
    write_journal(tmp_path / "r1", "r1", "heuristic")
    (tmp_path / "r1" / "memory").write_text("a file where the folder should be")
    why = await draw_tree_picture(tmp_path / "r1", 4, tmp_path / "r1" / "memory" / "tree.png")
    assert why is not None and "memory" in why and len(why.splitlines()) == 1


def test_the_environment_without_secrets_drops_names_and_values():
    source = {"PATH": "/usr/bin", "ANTHROPIC_API_KEY": FAKE_KEY, "GITHUB_TOKEN": "ghp_0123456789",
              "PASTED": f"--key={FAKE_KEY}", "EDITOR": "vi", "SHORT_KEY": "abc"}
    assert environment_without_secrets(source) == {"PATH": "/usr/bin", "EDITOR": "vi"}


async def test_the_drawer_gets_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", FAKE_KEY)
    monkeypatch.setenv("PROCTOR_TEST_PASTED", f"--key={FAKE_KEY}")
    monkeypatch.setenv("PROCTOR_TEST_PLAIN", "kept")
    use_drawer(monkeypatch, ENV_DUMP)
    dump = tmp_path / "env.json"
    assert await draw_tree_picture(tmp_path, 4, dump) is None
    env = json.loads(dump.read_text())
    assert env["PROCTOR_TEST_PLAIN"] == "kept" and "PATH" in env
    assert "ANTHROPIC_API_KEY" not in env and "PROCTOR_TEST_PASTED" not in env
    assert FAKE_KEY not in dump.read_text()


async def test_a_cancelled_drawing_kills_its_child(tmp_path, monkeypatch):
    use_drawer(monkeypatch, HANG)
    said = tmp_path / "pid"
    drawing = asyncio.create_task(draw_tree_picture(tmp_path, 4, said))
    await asyncio.to_thread(wait_for, said.exists, "the drawer to start")  # the loop runs on
    pid = int(said.read_text())
    drawing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await drawing
    assert gone(pid)


async def test_a_drawer_past_its_time_is_killed(tmp_path, monkeypatch):
    use_drawer(monkeypatch, HANG)
    monkeypatch.setattr(tree_picture, "DRAW_LIMIT_S", 1.0)
    said = tmp_path / "pid"
    assert await draw_tree_picture(tmp_path, 4, said) is None
    assert gone(int(said.read_text()))


class ReleasingAgent(ScriptedAgent):
    """Releases the held drawer when asked for iteration 3: after block 2 has ended."""

    def __init__(self, release: Path):
        super().__init__()
        self.release = release

    async def propose(self, context):
        if context.iteration == 3:
            self.release.touch()
        return await super().propose(context)


def test_the_loop_goes_on_while_a_drawer_runs_and_starts_no_second(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("ANTHROPIC_API_KEY", FAKE_KEY)
    use_drawer(monkeypatch, HELD)
    project = make_git_project(tmp_path / "project")
    config_path = project / "configs" / "fake.yaml"
    config_path.write_text(config_path.read_text().replace("block_size: 4", "block_size: 1"))
    run_dir = project / "log" / "r1"
    # Block 1's drawer waits for iteration 3's proposal: a loop that waited for it would
    # never get there, and the drawer would be killed without drawing.
    engine = run_scripted(project, iterations=3, agent=ReleasingAgent(run_dir / "drawer-release"))
    calls = [json.loads(line) for line in (run_dir / "drawer-calls").read_text().splitlines()]
    picture = engine.paths.tree_picture(1)
    assert [call["argv"] for call in calls] == [[str(run_dir), "1", str(picture)]]
    assert_png(picture)
    assert not engine.paths.tree_picture(2).exists()  # skipped: block 1's drawer still ran
    env = calls[0]["env"]
    assert "ANTHROPIC_API_KEY" not in env and FAKE_KEY not in json.dumps(env)
