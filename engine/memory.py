"""memory.md, the agent's working memory: the one model of its sections for every reader and
writer (the engine's notes, the offline agent's rewrite, the tests).

The protocol's skeleton (Knowledge Base, Previous Block Summary, Current Block) is the
template a run starts from. An agent rewrites the file whole; proctor adds its own lines (a
do-not-retry note, a finished node's outcome) and leaves every other line as it was written.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

MEMORY_MAX_LINES = 500  # the protocol's cap; longer memory is kept, with a warning

# The protocol's skeleton: (level, title), in the order the template shows them.
SKELETON: tuple[tuple[int, str], ...] = (
    (1, "Working memory"),
    (2, "Knowledge Base"),
    (3, "Regime table"),
    (3, "Established principles"),
    (3, "Do not retry"),
    (3, "Open questions"),
    (2, "Previous Block Summary"),
    (2, "Current Block"),
    (3, "Info"),
    (3, "Hypothesis"),
    (3, "Iterations"),
    (3, "Observations"),
)
REGIME_HEADER = (
    "| Block | Field | n_frames | Best R2 (node) | Best config | Verdict |",
    "|-------|-------|----------|----------------|-------------|---------|",
)
KNOWLEDGE_BASE = "knowledge base"
DO_NOT_RETRY = "do not retry"
ITERATIONS = "iterations"
REGIME_TABLE = "regime table"
PENDING = "pending"  # the outcome an iteration line shows until its node finishes

# Sections split at level 1-3 headings; deeper ones are text of the section above them.
_HEADING = re.compile(r"^(#{1,3})\s+(.*?)\s*$")
_PARENTHESES = re.compile(r"\(.*?\)")
_PENDING_LINE = re.compile(r"^- Node (\d+) \(.*-> " + PENDING + r"$")
_NODE_LINE = re.compile(r"^- Node (\d+) \(")


def title_key(title: str) -> str:
    """How a heading is looked up: `Established principles (with evidence)` ->
    `established principles`."""
    return _PARENTHESES.sub("", title).strip().lower()


_SKELETON_KEYS = {title_key(title): (index, level, title)
                  for index, (level, title) in enumerate(SKELETON)}


def _content_span(lines: list[str]) -> tuple[int, int]:
    """Where the non-blank lines start and end; (0, 0) when every line is blank."""
    filled = [index for index, line in enumerate(lines) if line.strip()]
    return (filled[0], filled[-1] + 1) if filled else (0, 0)


@dataclass
class MemorySection:
    """One heading as written and the lines under it, up to the next level 1-3 heading."""

    level: int
    title: str
    heading: str
    lines: list[str]

    @classmethod
    def new(cls, level: int, title: str, body: Iterable[str] = ()) -> MemorySection:
        return cls(level, title, f"{'#' * level} {title}", list(body))

    @property
    def key(self) -> str:
        return title_key(self.title)

    @property
    def in_skeleton(self) -> bool:
        return self.key in _SKELETON_KEYS

    @property
    def body(self) -> list[str]:
        """The section's lines without the blank lines around them."""
        start, end = _content_span(self.lines)
        return self.lines[start:end]

    def set_body(self, body: Iterable[str]) -> None:
        """Replace the body; the blank lines around it stay as they were."""
        start, end = _content_span(self.lines)
        self.lines[start:end] = list(body)


class Memory:
    """memory.md as parsed: the lines before its first heading, then its sections in order.
    `text()` returns the parsed text unchanged until something is edited; headings inside
    code fences are text."""

    def __init__(self, preamble: list[str], sections: list[MemorySection]) -> None:
        self.preamble = preamble
        self.sections = sections

    @classmethod
    def parse(cls, text: str) -> Memory:
        preamble: list[str] = []
        sections: list[MemorySection] = []
        fenced = False
        for line in text.splitlines():
            if line.lstrip().startswith("```"):
                fenced = not fenced
            match = None if fenced else _HEADING.match(line)
            if match:
                sections.append(MemorySection(len(match.group(1)), match.group(2), line, []))
            else:
                (sections[-1].lines if sections else preamble).append(line)
        return cls(preamble, sections)

    def text(self) -> str:
        lines = list(self.preamble)
        for section in self.sections:
            lines += [section.heading, *section.lines]
        return "\n".join(lines) + "\n" if lines else ""

    def line_count(self) -> int:
        return len(self.preamble) + sum(1 + len(s.lines) for s in self.sections)

    # -- reading and editing one section ---------------------------------------------------

    def find(self, title: str) -> MemorySection | None:
        """The first section called `title` (compared by `title_key`)."""
        key = title_key(title)
        return next((s for s in self.sections if s.key == key), None)

    def body(self, title: str) -> list[str]:
        """The body of the section called `title`; [] when there is none."""
        section = self.find(title)
        return section.body if section is not None else []

    def set_body(self, title: str, body: Iterable[str]) -> None:
        self.ensure(title).set_body(body)

    def append(self, title: str, line: str) -> None:
        """`line` after the last non-blank line of the section (created when missing)."""
        section = self.ensure(title)
        end = _content_span(section.lines)[1]
        section.lines.insert(end, line)

    def add_unique(self, title: str, lines: Iterable[str]) -> bool:
        """Append each line the section does not hold yet; True when one was added."""
        added = False
        for line in lines:
            if line.rstrip() not in (held.rstrip() for held in self.body(title)):
                self.append(title, line)
                added = True
        return added

    def ensure(self, title: str) -> MemorySection:
        """The section called `title`; a missing skeleton section is created where the
        template has it: at the end of its parent section (Knowledge Base, Current Block), or
        at the end of the file when that is missing too."""
        section = self.find(title)
        if section is not None:
            return section
        if title_key(title) not in _SKELETON_KEYS:
            raise KeyError(f"memory.md has no section {title!r} and it is not in the skeleton")
        index, level, canonical = _SKELETON_KEYS[title_key(title)]
        parent_title = next((t for lv, t in reversed(SKELETON[:index]) if lv < level), None)
        parent = self.find(parent_title) if parent_title is not None else None
        position = len(self.sections)
        if parent is not None:
            start = self.sections.index(parent) + 1
            position = next((i for i in range(start, len(self.sections))
                             if self.sections[i].level <= parent.level), len(self.sections))
        at_end = position == len(self.sections)
        created = MemorySection.new(level, canonical, [] if at_end else [""])
        if at_end and self._ends_in_open_fence():
            self._last_lines().append("```")  # else the new heading would be fenced text
        self._blank_line_before(position)
        self.sections.insert(position, created)
        return created

    def _last_lines(self) -> list[str]:
        return self.sections[-1].lines if self.sections else self.preamble

    def _ends_in_open_fence(self) -> bool:
        lines = [*self.preamble, *(line for s in self.sections for line in s.lines)]
        return sum(line.lstrip().startswith("```") for line in lines) % 2 == 1

    def _blank_line_before(self, position: int) -> None:
        """A blank line ends whatever comes before section `position`, so a new heading does
        not run on from the text above it."""
        if position > 0:
            previous = self.sections[position - 1]
            if not previous.lines or previous.lines[-1].strip():
                previous.lines.append("")
        elif self.preamble and self.preamble[-1].strip():
            self.preamble.append("")

    # -- the protocol's layout -------------------------------------------------------------

    def conformed(self) -> Memory:
        """The skeleton's sections in the template's order with their bodies (and the canonical
        headings), other sections kept: those under the Knowledge Base before the Previous
        Block Summary, the rest at the end; one blank line after each section. Text before
        the first heading and under the top heading is dropped."""
        bodies: dict[str, list[str]] = {title_key(title): [] for _, title in SKELETON}
        in_knowledge_base: list[MemorySection] = []
        at_end: list[MemorySection] = []
        parent = ""
        for section in self.sections:
            body = [line.rstrip() for line in section.body]
            if section.in_skeleton:
                bodies[section.key] = body
                if section.level <= 2:
                    parent = section.key
                continue
            extra = MemorySection.new(section.level, section.title, body)
            below_knowledge_base = parent == KNOWLEDGE_BASE and section.level == 3
            (in_knowledge_base if below_knowledge_base else at_end).append(extra)
            if section.level <= 2:
                parent = section.key
        rows = [line for line in bodies[REGIME_TABLE] if line.strip() and line not in
                REGIME_HEADER]
        bodies[REGIME_TABLE] = [*REGIME_HEADER, *rows]
        sections: list[MemorySection] = []
        for level, title in SKELETON:
            if title_key(title) == "previous block summary":
                sections += in_knowledge_base
            sections.append(MemorySection.new(level, title, bodies[title_key(title)]
                                              if level > 1 else []))
        sections += at_end
        for section in sections[:-1]:
            section.lines.append("")
        return Memory([], sections)

    # -- iteration lines -------------------------------------------------------------------

    def keep_iterations(self, earlier: Memory, node_ids: Collection[int]) -> bool:
        """Put back the Iterations lines of `node_ids` that `earlier` holds and this memory
        lacks: with slots, a proposal drafted before another slot's node was applied does
        not know that node's line. True when a line was put back."""
        have = {int(match.group(1)) for line in self.body(ITERATIONS)
                if (match := _NODE_LINE.match(line))}
        missing = [line.rstrip() for line in earlier.body(ITERATIONS)
                   if (match := _NODE_LINE.match(line)) and int(match.group(1)) in node_ids
                   and int(match.group(1)) not in have]
        for line in missing:
            self.append(ITERATIONS, line)
        return bool(missing)

    def settle_iterations(self, outcomes: Mapping[int, str]) -> bool:
        """Each `- Node N (...) -> pending` line of the Iterations section whose node has an
        outcome in `outcomes` (node id -> word) shows it; True when a line changed."""
        section = self.find(ITERATIONS)
        if section is None:
            return False
        changed = False
        for index, line in enumerate(section.lines):
            match = _PENDING_LINE.match(line.rstrip())
            outcome = outcomes.get(int(match.group(1))) if match else None
            if outcome is not None and outcome != PENDING:
                section.lines[index] = line.rstrip()[: -len(PENDING)] + outcome
                changed = True
        return changed


MEMORY_TEMPLATE = Memory([], []).conformed().text()


def iteration_line(node_id: int, parent_id: int | None, mutation: str, strategy: str) -> str:
    """The Iterations line of a node just proposed; `settle_iterations` fills in its outcome."""
    parent = f"parent {parent_id}" if parent_id is not None else "root"
    return f"- Node {node_id} ({parent}): {mutation} [{strategy}] -> {PENDING}"


def memory_section(text: str, title: str) -> str:
    """The body of the section called `title` in a memory text ('' when absent)."""
    return "\n".join(Memory.parse(text).body(title))


def insert_do_not_retry(text: str, note: str) -> str:
    """`text` with `- note` (on one line) as the last bullet under `### Do not retry` (the
    heading created at the end of the Knowledge Base, or of the file, when missing);
    unchanged if that bullet is there or the note is blank."""
    flat = " ".join(note.split())
    memory = Memory.parse(text)
    if not flat or not memory.add_unique(DO_NOT_RETRY, [f"- {flat}"]):
        return text
    return memory.text()


def memory_warning(text: str) -> str | None:
    """A warning when a memory text is over the protocol's line cap (it is kept anyway)."""
    count = len(text.splitlines())
    if count <= MEMORY_MAX_LINES:
        return None
    return f"memory.md has {count} lines, over the protocol's {MEMORY_MAX_LINES}; kept as is"
