"""memory.md's one model: lossless parsing, reading and editing a section, the protocol's
template and layout, do-not-retry notes, iteration lines and the line cap."""

import textwrap

from hypothesis import given
from hypothesis import strategies as st

from engine.memory import (
    MEMORY_MAX_LINES,
    MEMORY_TEMPLATE,
    Memory,
    insert_do_not_retry,
    iteration_line,
    memory_section,
    memory_warning,
    title_key,
)

MEMORY_LINES = st.lists(
    st.one_of(
        st.sampled_from(["", "  ", "```", "```python", "# Working memory", "## Knowledge Base",
                         "### Do not retry", "### do not retry (templates)", "#### deeper",
                         "## Current Block", "### Iterations", "#no space", "- a bullet  "]),
        st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=30),
    ),
    max_size=40,
)


def test_the_template_is_the_protocols_skeleton():
    assert textwrap.dedent("""\
        # Working memory

        ## Knowledge Base

        ### Regime table
        | Block | Field | n_frames | Best R2 (node) | Best config | Verdict |
        |-------|-------|----------|----------------|-------------|---------|

        ### Established principles

        ### Do not retry

        ### Open questions

        ## Previous Block Summary

        ## Current Block

        ### Info

        ### Hypothesis

        ### Iterations

        ### Observations
        """) == MEMORY_TEMPLATE


@given(lines=MEMORY_LINES)
def test_parsing_gives_the_text_back_unchanged(lines):
    text = "\n".join(lines) + "\n" if lines else ""
    assert Memory.parse(text).text() == text


def test_sections_split_at_level_one_to_three_headings_outside_code_fences():
    text = textwrap.dedent("""\
        loose line
        ## Knowledge Base (what we know)

        ### Do not retry
        - Huber loss
        #### why
        ```
        ### not a heading
        ```

        ## Current Block
        """)
    memory = Memory.parse(text)
    assert memory.preamble == ["loose line"]
    assert [(s.level, s.key) for s in memory.sections] == [
        (2, "knowledge base"), (3, "do not retry"), (2, "current block")]
    assert memory.body("Do not retry") == [
        "- Huber loss", "#### why", "```", "### not a heading", "```"]
    assert memory_section(text, "do NOT retry") == "\n".join(memory.body("do not retry"))
    assert memory.body("Knowledge base") == [] and memory_section(text, "Observations") == ""
    assert title_key("Established principles (each with evidence)") == "established principles"


def test_set_body_keeps_the_blank_lines_around_it():
    memory = Memory.parse("## Current Block\n\n### Info\n\nold\n\n### Hypothesis\n")
    memory.set_body("info", ["new 1", "new 2"])
    memory.set_body("hypothesis", ["h"])
    assert memory.text() == "## Current Block\n\n### Info\n\nnew 1\nnew 2\n\n### Hypothesis\nh\n"


def test_do_not_retry_goes_after_the_last_bullet_once():
    memory = MEMORY_TEMPLATE.replace("### Do not retry\n", "### Do not retry\n- first\n")
    once = insert_do_not_retry(memory, "second")
    assert memory_section(once, "do not retry").splitlines() == ["- first", "- second"]
    assert insert_do_not_retry(once, "second") == once
    assert once.replace("- second\n", "") == memory


def test_do_not_retry_heading_recreated_where_it_belongs():
    memory = "# Working memory\n## Knowledge Base\n### Open questions\n- why?\n## Current Block\n"
    assert insert_do_not_retry(memory, "multi\nline note") == (
        "# Working memory\n## Knowledge Base\n### Open questions\n- why?\n\n"
        "### Do not retry\n- multi line note\n\n## Current Block\n"
    )
    fenced = "notes\n```\n### Do not retry\n```\n"
    assert insert_do_not_retry(fenced, "x") == fenced + "\n### Do not retry\n- x\n"
    assert insert_do_not_retry("", "x") == "### Do not retry\n- x\n"
    unclosed = "notes\n```\nprint(1)\n"  # an open fence would swallow the new heading
    assert insert_do_not_retry(unclosed, "x") == unclosed + "```\n\n### Do not retry\n- x\n"


@given(lines=MEMORY_LINES, note=st.text(max_size=20))
def test_a_do_not_retry_note_only_adds_lines(lines, note):
    text = "\n".join(lines) + "\n" if lines else ""
    updated = insert_do_not_retry(text, note)
    remaining = iter(updated.splitlines())
    assert all(line in remaining for line in text.splitlines())  # nothing removed or changed
    flat = " ".join(note.split())
    if not flat:
        assert updated == text
    else:
        assert f"- {flat}" in memory_section(updated, "do not retry").splitlines()
        assert insert_do_not_retry(updated, note) == updated


def test_the_protocols_layout_orders_the_skeleton_and_keeps_other_sections():
    text = textwrap.dedent("""\
        stray text
        ## Current Block
        ### Iterations
        - Node 1 (root): none [baseline] -> good
        # Working memory
        ignored
        ## Knowledge Base
        ### Established principles (each with evidence)
        - lr above 1E-3 diverges
        ### Regime table
        | 1 | Jp | 24 | 0.900 (3) | lr=1E-4 | good |
        ### Tricks a human found
        - warm restarts
        ## Notes
        - keep
        """)
    conformed = Memory.parse(text).conformed().text()
    assert conformed == MEMORY_TEMPLATE.replace(
        "|\n\n### Established principles\n",
        "|\n| 1 | Jp | 24 | 0.900 (3) | lr=1E-4 | good |\n\n### Established principles\n"
        "- lr above 1E-3 diverges\n",
    ).replace(
        "### Open questions\n\n", "### Open questions\n\n### Tricks a human found\n"
        "- warm restarts\n\n",
    ).replace(
        "### Iterations\n", "### Iterations\n- Node 1 (root): none [baseline] -> good\n",
    ) + "\n## Notes\n- keep\n"


def test_iteration_lines_settle_to_their_outcome():
    lines = [iteration_line(1, None, "none", "baseline"),
             iteration_line(2, 1, "lr: 1E-5 -> 3E-5", "exploit"),
             iteration_line(3, 1, "omega_0: 30.0 -> 40.0", "explore")]
    assert lines[0] == "- Node 1 (root): none [baseline] -> pending"
    memory = Memory.parse(MEMORY_TEMPLATE)
    memory.set_body("iterations", lines)
    assert memory.settle_iterations({1: "moderate", 2: "diverged", 3: "pending"})
    assert memory.body("iterations") == [
        "- Node 1 (root): none [baseline] -> moderate",
        "- Node 2 (parent 1): lr: 1E-5 -> 3E-5 [exploit] -> diverged",
        "- Node 3 (parent 1): omega_0: 30.0 -> 40.0 [explore] -> pending",
    ]
    assert not memory.settle_iterations({1: "good"})  # settled lines stay as they are
    assert not Memory.parse("- Node 1 (root): x -> pending\n").settle_iterations({1: "good"})


def test_a_slots_memory_keeps_the_lines_of_nodes_it_was_drafted_without():
    current = Memory.parse(MEMORY_TEMPLATE)
    current.set_body("iterations", [iteration_line(1, None, "none", "baseline"),
                                    iteration_line(2, 1, "lr up", "exploit")])
    drafted = Memory.parse(MEMORY_TEMPLATE)  # slot 1's proposal, drafted before node 2 was
    drafted.set_body("iterations", [iteration_line(1, None, "none", "baseline"),
                                    iteration_line(3, 1, "omega down", "explore")])
    assert drafted.keep_iterations(current, {1, 2})
    assert drafted.body("iterations") == [iteration_line(1, None, "none", "baseline"),
                                          iteration_line(3, 1, "omega down", "explore"),
                                          iteration_line(2, 1, "lr up", "exploit")]
    assert not drafted.keep_iterations(current, {1, 2})  # nothing missing any more
    other_block = Memory.parse(MEMORY_TEMPLATE)
    assert not other_block.keep_iterations(current, set())  # lines dropped on purpose stay out


def test_the_line_cap_warns_and_keeps():
    assert memory_warning(MEMORY_TEMPLATE) is None
    long_text = "\n".join(f"- line {i}" for i in range(MEMORY_MAX_LINES + 1))
    warning = memory_warning(long_text)
    assert warning is not None and str(MEMORY_MAX_LINES + 1) in warning
