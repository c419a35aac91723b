"""Validated code edits (FAULTS 9-12): units of `engine.edits`, then the same faults through
the real engine on a git project: nothing written, policy violations recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
from git_project import UserState, git, make_git_project
from scripted_agent import ScriptedAgent

from engine import events as ev
from engine.agents.base import AgentReply
from engine.config import load_config
from engine.edits import (
    MAX_EDIT_BYTES,
    MAX_FILE_BYTES,
    EditError,
    apply_edits,
    check_parses,
    normalise_path,
    read_code,
    validate_files,
    write_files,
)
from engine.journal import Journal
from engine.loop import Engine
from engine.proposal import CodeEdit, Proposal, Strategy
from engine.runs import RunSettings
from engine.state import POLICY_VIOLATIONS

WHITELIST = ["models/siren.py", "models/trainer.py"]
FILES = {
    "models/siren.py": '"""doc"""\n\nBONUS = 0.0\n',
    "models/trainer.py": "import math\n\n\ndef fit(s):\n    return 0.9\n\n\ndef g():\n"
                         "    return 0.9\n",
}


def edit(file: str, search: str, replace: str) -> CodeEdit:
    return CodeEdit(file=file, search=search, replace=replace)


# -- paths ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["../x", "models/../../x", "/etc/passwd", "/work/models/siren.py",
                                  "models/harness.py", "models/siren.py.bak", "models\\siren.py",
                                  "", "models", "models/siren.py/.."])
def test_paths_outside_the_whitelist_are_policy_violations(path):
    with pytest.raises(EditError) as refused:
        normalise_path(path, WHITELIST)
    assert refused.value.policy_violation
    assert "not an editable file" in str(refused.value)


def test_equivalent_spellings_of_a_whitelisted_path_are_accepted():
    assert normalise_path("./models/siren.py", WHITELIST) == "models/siren.py"
    assert normalise_path("models//siren.py", WHITELIST) == "models/siren.py"


def test_symlinks_are_refused_never_followed(tmp_path):
    outside = tmp_path / "outside.py"
    outside.write_text("SECRET = 1\n")
    root = tmp_path / "root"
    (root / "models").mkdir(parents=True)
    (root / "models" / "siren.py").symlink_to(outside)
    (root / "models" / "trainer.py").write_text("x = 1\n")
    with pytest.raises(EditError, match="symlink") as refused:
        read_code(root, ["models/siren.py"])
    assert refused.value.policy_violation
    with pytest.raises(EditError, match="symlink"):
        write_files(root, {"models/trainer.py": "x = 2\n", "models/siren.py": "SECRET = 2\n"})
    assert outside.read_text() == "SECRET = 1\n"
    assert (root / "models" / "trainer.py").read_text() == "x = 1\n"  # nothing written
    # a symlinked folder on the way is refused as well
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "models").symlink_to(root / "models")
    with pytest.raises(EditError, match="symlink"):
        read_code(linked, ["models/trainer.py"])


def test_write_files_replaces_whole_files_atomically(tmp_path):
    (tmp_path / "models").mkdir()
    write_files(tmp_path, {"models/siren.py": "BONUS = 1\n"})
    assert (tmp_path / "models" / "siren.py").read_text() == "BONUS = 1\n"
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["siren.py"]  # no temp left


# -- search and replace ---------------------------------------------------------------------


def test_a_missing_search_text_quotes_the_closest_lines():
    with pytest.raises(EditError) as refused:
        apply_edits(FILES, [edit("models/siren.py", "BONUS = 0.5", "BONUS = 1")], WHITELIST)
    message = str(refused.value)
    assert "does not occur" in message and "Did you mean" in message
    assert "line 3: 'BONUS = 0.0'" in message


def test_an_ambiguous_search_text_names_where_it_occurs():
    with pytest.raises(EditError) as refused:
        apply_edits(FILES, [edit("models/trainer.py", "    return 0.9\n", "    return 1\n")],
                    WHITELIST)
    assert "occurs 2 times" in str(refused.value)
    assert "lines 5, 9" in str(refused.value)


def test_all_edits_apply_or_none_do():
    before = dict(FILES)
    edits = [edit("models/siren.py", "BONUS = 0.0", "BONUS = 1.0"),
             edit("models/trainer.py", "no such text", "x")]
    with pytest.raises(EditError, match="edit 2"):
        apply_edits(FILES, edits, WHITELIST)
    assert before == FILES
    changed = apply_edits(FILES, edits[:1], WHITELIST)
    assert changed == {"models/siren.py": '"""doc"""\n\nBONUS = 1.0\n'}


def test_edits_to_one_file_apply_in_order():
    edits = [edit("models/siren.py", "BONUS = 0.0", "BONUS = 1.0"),
             edit("models/siren.py", "BONUS = 1.0", "BONUS = 2.0")]
    assert apply_edits(FILES, edits, WHITELIST)["models/siren.py"].endswith("BONUS = 2.0\n")


def test_a_syntax_error_is_rejected_naming_the_line():
    with pytest.raises(EditError) as refused:
        apply_edits(FILES, [edit("models/trainer.py", "    return 0.9\n\n\ndef g",
                                 "    return (0.9\n\n\ndef g")], WHITELIST)
    assert "does not parse" in str(refused.value)
    assert "models/trainer.py, line" in str(refused.value)


def test_size_caps():
    with pytest.raises(EditError, match="larger than"):
        apply_edits(FILES, [edit("models/siren.py", "BONUS", "x" * MAX_EDIT_BYTES)], WHITELIST)
    big = {"models/siren.py": "A = 1\n" + "# pad\n" * (MAX_FILE_BYTES // 6)}
    with pytest.raises(EditError, match="exceeds"):
        apply_edits(big, [edit("models/siren.py", "A = 1", "A = 1" + " " * 60)], WHITELIST)


def test_a_pathological_file_fails_to_parse_without_hurting_the_engine():
    with pytest.raises(EditError, match="does not parse"):
        check_parses({"models/siren.py": "x = " + "(" * 100_000 + ")" * 100_000 + "\n"})


def test_validate_files_checks_a_humans_whole_version():
    with pytest.raises(EditError) as refused:
        validate_files({"models/harness.py": "x = 1\n"}, FILES, WHITELIST)
    assert refused.value.policy_violation
    with pytest.raises(EditError, match="does not parse"):
        validate_files({"models/siren.py": "BONUS = (\n"}, FILES, WHITELIST)
    changed = validate_files({"models/siren.py": "BONUS = 3\n",
                              "models/trainer.py": FILES["models/trainer.py"]}, FILES, WHITELIST)
    assert changed == {"models/siren.py": "BONUS = 3\n"}


# -- the same faults through the engine ------------------------------------------------------


BAD = {
    2: [edit("../x.py", "a", "b"), edit("/tmp/proctor-x.py", "a", "b")],
    3: [edit("models/harness.py", "import json", "import os"),
        edit("models/harness.py", "import json", "import os")],
    4: [edit("models/siren.py", "BONUS = 0.0", "BONUS = (0.0"),
        edit("models/siren.py", "BONUS = 0.0", "def BONUS = 0")],
}


class BadEditAgent(ScriptedAgent):
    """Iterations 2-4 propose only invalid edits (twice: the first try and one repair)."""

    async def propose(self, context):
        if context.iteration in BAD:
            self.contexts.append(context)
            tries = BAD[context.iteration]
            chosen = tries[min(context.repair.attempt if context.repair else 0, len(tries) - 1)]
            return AgentReply(Proposal(parent_id=1, strategy=Strategy.CODE_CHANGE,
                                       edits=(chosen,)), "bad")
        return await super().propose(context)


async def test_invalid_edits_write_nothing_and_policy_violations_are_recorded(tmp_path):
    project = make_git_project(tmp_path / "project")
    checkout = {path: (project / path).read_bytes() for path in WHITELIST}
    harness = (project / "models" / "harness.py").read_bytes()
    user = UserState.of(project)
    seen: list[ev.Event] = []
    agent = BadEditAgent()
    config = load_config(project / "configs" / "fake.yaml")
    settings = RunSettings(name="r1", config_path="fake.yaml", iterations=5, approval="auto",
                           agent="scripted", runner="subprocess", watch_edits=False)
    engine = Engine.create(project, config, settings, agent, seen.append)
    try:
        await engine.run()
    finally:
        engine.close()
    skipped = {e.iteration for e in seen if isinstance(e, ev.IterationSkipped)}
    assert skipped == {2, 3, 4}
    assert sorted(node.id for node in engine.tree) == [1, 5]
    # the agent heard why, each time (bounded: the first try and one repair)
    repairs = [c.repair.error for c in agent.contexts if c.iteration in BAD and c.repair]
    assert len(repairs) == 3 and "does not parse" in repairs[2]
    # nothing written: the checkout, the user's git state, no commit for the bad iterations
    assert {path: (project / path).read_bytes() for path in WHITELIST} == checkout
    assert (project / "models" / "harness.py").read_bytes() == harness
    assert not (tmp_path / "x.py").exists() and not Path("/tmp/proctor-x.py").exists()
    for iteration in BAD:
        assert git(project, "for-each-ref", f"refs/proctor/r1/attempts/{iteration}") == ""
    assert UserState.of(project) == user
    # paths outside the whitelist are policy violations: published and in the journal
    violations = [e for e in seen if isinstance(e, ev.PolicyViolation)]
    assert [e.iteration for e in violations] == [2, 2, 3, 3]
    with Journal.open_for_client(project / "log" / "r1") as journal:
        recorded = journal.state(POLICY_VIOLATIONS)
    assert [(v["iteration"], v["attempt"]) for v in recorded] == [(2, 0), (2, 1), (3, 0), (3, 1)]
    assert "../x.py" in recorded[0]["error"]
