"""Node lineage in git: the one git wrapper of proctor (GitPython, a Repo per operation).

A node that changes code is a commit whose git parent is its tree parent's commit. Commits
are built without the user's index or working tree: blobs go straight into the object
store, trees are written from a temporary index under `log/<run>/`, commits with
`git commit-tree`, refs with `git update-ref`. The user's HEAD, branch, index and working
tree are never touched, and every git call runs with hooks and fsmonitor switched off on
the command line (never by editing the user's config).

Refs of a run live under `refs/proctor/<run>/`: `base`, `nodes/<id>` (the node's latest
code), `attempts/<id>/<attempt>` (every attempt, failed ones included, for inspection);
the branch `proctor/<run>/best` follows the best node.

A project that is not a git repository gets a private bare repository at
`log/<run>/repo.git` whose base commit holds the experiment package as it is on disk; the
lineage works the same way there.
"""

from __future__ import annotations

import io
import os
import signal
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import git
from gitdb import IStream

from engine.edits import EditError, line_counts, read_code

# Command-line settings on every call: a hook or fsmonitor planted in the repository's own
# config or `.git/hooks` (e.g. by training code) never runs; no auto-gc in our processes.
SAFE_OPTIONS = (
    "-c", "core.hooksPath=/dev/null",
    "-c", "core.fsmonitor=false",
    "-c", "gc.auto=0",
    "-c", "maintenance.auto=false",
    "--no-optional-locks",
)
PROCTOR = ("proctor", "proctor@localhost")
TEMP_INDEX = "git-index"
PRIVATE_REPO = "repo.git"
LOCK_WAIT_S = 5.0
STALE_USER_LOCK_S = 60.0
CACHE_ENTRIES = 1024
MODE_FILE, MODE_EXECUTABLE, MODE_SYMLINK = 0o100644, 0o100755, 0o120000
# Fault injection for the resume tests, shared with the journal's: "git:commit-tree" kills
# the engine between writing a commit and pointing its refs at it.
CRASH_AFTER_ENV = "PROCTOR_CRASH_AFTER"


class VcsError(Exception):
    """A git problem, worded for the user."""


@dataclass(frozen=True)
class Identity:
    """Who a commit is by."""

    name: str
    email: str


@dataclass(frozen=True)
class RepoInfo:
    """Where a run keeps its lineage (stored with the run)."""

    path: str  # what `git.Repo` opens: the user's work tree, or the private bare repository
    prefix: str  # the project root inside the repository: "" or "sub/dir/"
    private: bool
    base: str  # the base commit: the user's HEAD at run creation

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RepoInfo:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Entry:
    """One file of a commit's tree, relative to the project root."""

    path: str
    mode: int
    sha: str


def _crash_if_asked(point: str) -> None:
    if os.environ.get(CRASH_AFTER_ENV) == f"git:{point}":
        os.kill(os.getpid(), signal.SIGKILL)


def _git_error(exc: git.GitCommandError) -> VcsError:
    stderr = (exc.stderr or "").strip().removeprefix("stderr:").strip(" '\n")
    command = " ".join(str(part) for part in exc.command[len(SAFE_OPTIONS) + 1:][:3])
    return VcsError(f"git {command} failed: {stderr or exc.status}")


def run_git(repo: git.Repo, *args: str, env: Mapping[str, str] | None = None,
            stdin: bytes | None = None, strip: bool = True) -> bytes:
    """Run `git <SAFE_OPTIONS> args` in `repo`; stdout as bytes, VcsError on failure."""
    command = ["git", *SAFE_OPTIONS, *args]
    environment = {"GIT_TERMINAL_PROMPT": "0", **(env or {})}
    try:
        if stdin is None:
            return repo.git.execute(command, env=environment, stdout_as_string=False,
                                    strip_newline_in_stdout=strip)
        with tempfile.TemporaryFile() as handle:  # Popen needs a real file for stdin
            handle.write(stdin)
            handle.seek(0)
            return repo.git.execute(command, istream=handle, env=environment,
                                    stdout_as_string=False, strip_newline_in_stdout=strip)
    except git.GitCommandError as exc:
        raise _git_error(exc) from None


@contextmanager
def open_repo(path: str | Path) -> Iterator[git.Repo]:
    """A Repo for one operation, closed after it (GitPython's advice for long processes)."""
    try:
        repo = git.Repo(path)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError) as exc:
        raise VcsError(f"{path} is not a usable git repository: {exc}") from None
    try:
        yield repo
    finally:
        repo.close()


def find_repository(project_root: Path) -> tuple[Path, str] | None:
    """(work tree, prefix of the project inside it) when `project_root` is in a git work
    tree; None otherwise (including bare repositories)."""
    try:
        repo = git.Repo(project_root, search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return None
    try:
        if repo.bare or repo.working_tree_dir is None:
            return None
        work_tree = Path(repo.working_tree_dir).resolve()
    finally:
        repo.close()
    relative = project_root.resolve().relative_to(work_tree).as_posix()
    return work_tree, "" if relative == "." else relative + "/"


def head_commit(work_tree: Path) -> str:
    """The user's HEAD commit; VcsError with instructions when there is none yet."""
    with open_repo(work_tree) as repo:
        try:
            return run_git(repo, "rev-parse", "--verify", "-q", "HEAD^{commit}").decode()
        except VcsError as exc:
            if "dubious ownership" in str(exc):  # git's own guard, not a missing commit
                raise VcsError(
                    f"git refuses the repository {work_tree}: it belongs to another user. "
                    f"If you trust it: git config --global --add safe.directory {work_tree}"
                ) from None
            raise VcsError(
                f"the git repository {work_tree} has no commit yet: commit the experiment "
                "first (git add -A && git commit -m base), then start the run"
            ) from None


def user_identity(path: str | Path) -> Identity:
    """The human's name and email from git config (for adopted manual edits)."""
    values = []
    with open_repo(path) as repo:
        for key, fallback in (("user.name", "human"), ("user.email", "human@localhost")):
            try:
                values.append(run_git(repo, "config", "--get", key).decode().strip() or fallback)
            except VcsError:
                values.append(fallback)
    return Identity(*values)


def user_index_lock_warning(work_tree: Path) -> str | None:
    """A message when the user's `.git/index.lock` looks abandoned; proctor never removes it
    (a git command of the user's may hold it)."""
    with open_repo(work_tree) as repo:
        lock = Path(repo.git_dir) / "index.lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return None
    if age < STALE_USER_LOCK_S:
        return None
    return (f"{lock} is {age / 60:.0f} min old: a git command was probably killed. proctor "
            "never touches your index; if no git command is running, remove it yourself "
            f"(rm {lock})")


def lock_holder(lock: Path) -> int | None:
    """The pid of a process that has `lock` open, or None (no /proc: judged by age)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            young = time.time() - lock.stat().st_mtime < STALE_USER_LOCK_S
        except FileNotFoundError:
            return None
        return -1 if young else None
    target = str(lock.resolve())
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) == target:
                    return int(entry.name)
        except OSError:  # gone, or not ours to look at
            continue
    return None


def clear_stale_lock(lock: Path, wait_s: float = LOCK_WAIT_S) -> bool:
    """Remove a lock file left by a killed git, only once no process holds it; waits up to
    `wait_s` for a live holder. True if a stale lock was removed."""
    deadline = time.monotonic() + wait_s
    while lock.exists():
        holder = lock_holder(lock)
        if holder is None:
            lock.unlink(missing_ok=True)
            return True
        if time.monotonic() > deadline:
            raise VcsError(f"{lock} is held by a running process (pid {holder}); "
                           "wait for it to finish or stop it")
        time.sleep(0.05)
    return False


def commit_message(iteration: int, title: str, hypothesis: str,
                   counts: Iterable[tuple[str, int, int]], run: str, node_id: int,
                   approved_by: str | None = None) -> str:
    """The original's commit message, with true per-file counts and proctor's trailers
    (`Proctor-Approved-By: name <email>` when a human approved the change)."""
    lines = [f"[Iter {iteration}] {title}".strip()]
    if hypothesis:
        lines.append(f"Hypothesis: {' '.join(hypothesis.split())}")
    for path, added, removed in counts:
        lines += ["", f"File: {path}", f"Changes: +{added} lines, -{removed} lines"]
    lines += ["", f"Proctor-Run: {run}", f"Proctor-Node: {node_id}"]
    if approved_by:
        lines.append(f"Proctor-Approved-By: {' '.join(approved_by.split())}")
    return "\n".join(lines) + "\n"


def change_counts(
    before: Mapping[str, str], after: Mapping[str, str]
) -> list[tuple[str, int, int]]:
    """(file, +added, -removed) for every file that differs."""
    return [(path, *line_counts(before.get(path, ""), after.get(path, "")))
            for path in sorted(set(before) | set(after))
            if before.get(path) != after.get(path)]


class _Bounded(OrderedDict):
    """A small LRU map: values keyed by immutable shas never go stale, they only pile up."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def put(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


class Lineage:
    """One run's commits and refs, and reads of any commit's files (cached by sha: commits
    proctor makes itself are known without reading them back)."""

    def __init__(self, info: RepoInfo, run: str, scratch: Path):
        self.info = info
        self.run = run
        self.scratch = scratch  # holds the temporary index
        self._listings = _Bounded(CACHE_ENTRIES)  # (commit, folder) -> {path: Entry}
        self._files = _Bounded(CACHE_ENTRIES)  # commit -> {path: Entry} of single files
        self._blobs = _Bounded(CACHE_ENTRIES)  # blob sha -> bytes
        self._best: str | None = None

    @property
    def base(self) -> str:
        return self.info.base

    def ref(self, *parts: str | int) -> str:
        return "/".join(("refs", "proctor", self.run, *map(str, parts)))

    @property
    def best_branch(self) -> str:
        return f"refs/heads/proctor/{self.run}/best"

    def _repo_path(self, relative: str) -> str:
        return self.info.prefix + relative

    # -- reading ---------------------------------------------------------------------------

    def resolve(self, ref: str) -> str | None:
        """The commit a ref points at, or None."""
        with open_repo(self.info.path) as repo:
            try:
                return run_git(repo, "rev-parse", "--verify", "-q", ref + "^{commit}").decode()
            except VcsError:
                return None

    def listing(self, commit: str, under: str) -> dict[str, Entry]:
        """Every file below the project-relative folder `under` at `commit` (cached)."""
        cached = self._listings.get((commit, under))
        if cached is not None:
            return cached
        entries: dict[str, Entry] = {}
        with open_repo(self.info.path) as repo:
            try:
                tree = repo.commit(commit).tree
                folder = tree / self._repo_path(under).rstrip("/") if under else tree
            except (KeyError, ValueError) as exc:
                raise VcsError(f"'{under}' is not in commit {commit[:12]}: {exc}") from None
            for item in folder.traverse():
                if item.type == "blob":
                    relative = item.path[len(self.info.prefix):]
                    entries[relative] = Entry(relative, item.mode, item.hexsha)
        self._listings.put((commit, under), entries)
        return entries

    def entries(self, commit: str, paths: Iterable[str]) -> dict[str, Entry | None]:
        """The tree entries of single files at `commit` (None where absent)."""
        paths = list(paths)
        known = self._files.get(commit, {})
        if all(path in known for path in paths):
            return {path: known[path] for path in paths}
        found: dict[str, Entry | None] = {}
        with open_repo(self.info.path) as repo:
            try:
                tree = repo.commit(commit).tree
            except (ValueError, git.BadName) as exc:
                raise VcsError(f"no commit {commit[:12]} in {self.info.path}: {exc}") from None
            for relative in paths:
                try:
                    item = tree / self._repo_path(relative)
                except KeyError:
                    found[relative] = None
                    continue
                found[relative] = Entry(relative, item.mode, item.hexsha) \
                    if item.type == "blob" else None
        self._files.put(commit, {**known, **found})
        return found

    def file_entries(self, commit: str, paths: Iterable[str]) -> dict[str, Entry]:
        """`entries` of files that must exist and not be symlinks."""
        checked = {}
        for path, entry in self.entries(commit, paths).items():
            if entry is None:
                raise VcsError(f"'{path}' is not a file in commit {commit[:12]}")
            if entry.mode == MODE_SYMLINK:
                raise VcsError(f"'{path}' is a symlink in commit {commit[:12]}; refusing it")
            checked[path] = entry
        return checked

    def blobs(self, shas: Iterable[str]) -> dict[str, bytes]:
        """Blob contents by sha (cached; the rest read in one Repo)."""
        wanted = list(dict.fromkeys(shas))
        found = {sha: self._blobs[sha] for sha in wanted if sha in self._blobs}
        missing = [sha for sha in wanted if sha not in found]
        if missing:
            with open_repo(self.info.path) as repo:
                for sha in missing:
                    found[sha] = repo.odb.stream(bytes.fromhex(sha)).read()
                    self._blobs.put(sha, found[sha])
        return found

    def read_texts(self, commit: str, paths: Iterable[str]) -> dict[str, str]:
        """UTF-8 texts of files at `commit`; VcsError for a missing file or a symlink."""
        entries = self.file_entries(commit, paths)
        contents = self.blobs(entry.sha for entry in entries.values())
        return {path: contents[entry.sha].decode("utf-8") for path, entry in entries.items()}

    # -- writing ---------------------------------------------------------------------------

    def commit_files(self, parent: str | None, files: Mapping[str, str | bytes], message: str,
                     author: Identity, when: float) -> str:
        """A commit of `parent`'s tree with `files` (project-relative) replaced; dates are
        fixed by `when` so the same change committed twice (after a crash) is one commit."""
        index = self.scratch / TEMP_INDEX
        self.scratch.mkdir(parents=True, exist_ok=True)
        clear_stale_lock(Path(f"{index}.lock"))
        index.unlink(missing_ok=True)
        env = {"GIT_INDEX_FILE": str(index)}
        stamp = f"@{int(when)} +0000"
        commit_env = {
            "GIT_AUTHOR_NAME": author.name, "GIT_AUTHOR_EMAIL": author.email,
            "GIT_AUTHOR_DATE": stamp, "GIT_COMMITTER_NAME": PROCTOR[0],
            "GIT_COMMITTER_EMAIL": PROCTOR[1], "GIT_COMMITTER_DATE": stamp,
        }
        previous = self.entries(parent, files) if parent is not None else {}
        written: dict[str, Entry] = {}
        with open_repo(self.info.path) as repo:
            if parent is not None:
                run_git(repo, "read-tree", parent, env=env)
            updates = []
            for relative, content in sorted(files.items()):
                data = content.encode("utf-8") if isinstance(content, str) else content
                sha = repo.odb.store(IStream("blob", len(data), io.BytesIO(data))).hexsha.decode()
                self._blobs.put(sha, data)
                entry = previous.get(relative)
                mode = entry.mode if entry is not None and entry.mode != MODE_SYMLINK \
                    else MODE_FILE
                written[relative] = Entry(relative, mode, sha)
                updates += ["--cacheinfo", f"{mode:o},{sha},{self._repo_path(relative)}"]
            run_git(repo, "update-index", "--add", *updates, env=env)
            tree = run_git(repo, "write-tree", env=env).decode()
            parents = ("-p", parent) if parent is not None else ()
            commit = run_git(repo, "commit-tree", tree, *parents, "-m", message,
                             env=commit_env).decode()
        index.unlink(missing_ok=True)
        self._learn(parent, commit, written)
        _crash_if_asked("commit-tree")
        return commit

    def _learn(self, parent: str | None, commit: str, written: dict[str, Entry]) -> None:
        """What a new commit holds, from its parent's caches and what was just written."""
        if parent is None:
            return
        self._files.put(commit, {**self._files.get(parent, {}), **written})
        for (cached_commit, under), entries in list(self._listings.items()):
            if cached_commit == parent:
                inside = {path: entry for path, entry in written.items()
                          if not under or path.startswith(under.rstrip("/") + "/")}
                self._listings.put((commit, under), {**entries, **inside})

    def set_refs(self, refs: Mapping[str, str]) -> None:
        """Point refs at commits in one transaction (all or none)."""
        script = "".join(f"update {name} {sha}\n" for name, sha in refs.items())
        with open_repo(self.info.path) as repo:
            run_git(repo, "update-ref", "--stdin", stdin=script.encode())

    def record_node(self, node_id: int, attempt: int, commit: str) -> None:
        self.set_refs({self.ref("attempts", node_id, attempt): commit,
                       self.ref("nodes", node_id): commit})

    def node_attempt_commit(self, node_id: int, attempt: int) -> str | None:
        """The commit an earlier (interrupted) apply of this attempt already made."""
        return self.resolve(self.ref("attempts", node_id, attempt))

    def set_best(self, commit: str) -> str | None:
        """Move `proctor/<run>/best` to `commit`; a warning instead when the user has that
        branch checked out (moving it would change their HEAD)."""
        if commit == self._best:
            return None
        with open_repo(self.info.path) as repo:
            listing = run_git(repo, "worktree", "list", "--porcelain").decode() \
                if not self.info.private else ""
            if f"branch {self.best_branch}" in listing.splitlines():
                return (f"{self.best_branch.removeprefix('refs/heads/')} is checked out: "
                        "proctor leaves it where it is")
            run_git(repo, "update-ref", self.best_branch, commit)
        self._best = commit
        return None


@dataclass(frozen=True)
class ProjectState:
    """A project's code as a run is created."""

    repo: RepoInfo | None  # None: not in a git work tree (a private repository is made)
    checkout: dict[str, str]  # the editable files as they are on disk
    uncommitted: dict[str, str]  # those that differ from the committed ones
    warning: str | None = None


def inspect_project(project_root: Path, editable: list[str], package: str) -> ProjectState:
    """Read the editable files (never through a symlink) and compare them with HEAD;
    VcsError, with what to do, when the project's commit lacks the experiment."""
    try:
        checkout = read_code(project_root, editable)
    except FileNotFoundError as exc:
        raise VcsError(f"editable file missing from {project_root}: {exc.filename}") from None
    except (EditError, UnicodeDecodeError) as exc:
        raise VcsError(f"cannot use the editable files: {exc}") from None
    located = find_repository(project_root)
    if located is None:
        return ProjectState(None, checkout, {})
    work_tree, prefix = located
    head = head_commit(work_tree)
    info = RepoInfo(str(work_tree), prefix, False, head)
    probe = Lineage(info, "probe", project_root)
    try:
        committed = probe.read_texts(head, editable)
        probe.listing(head, package)
    except VcsError as exc:
        raise VcsError(
            f"{exc}. Commit the experiment first (in {work_tree}: git add "
            f"{' '.join(editable)} && git commit), then start the run") from None
    uncommitted = {path: text for path, text in checkout.items() if committed[path] != text}
    return ProjectState(info, checkout, uncommitted, user_index_lock_warning(work_tree))


def merge_texts(base: str, ours: str, theirs: str) -> str | None:
    """Three-way merge of one file's texts (`git merge-file`); None when they conflict."""
    with tempfile.TemporaryDirectory(prefix="proctor-merge-") as folder:
        paths = []
        for name, text in (("ours", ours), ("base", base), ("theirs", theirs)):
            path = Path(folder) / name
            path.write_text(text, encoding="utf-8")
            paths.append(str(path))
        status, merged, _ = git.Git(folder).execute(
            ["git", *SAFE_OPTIONS, "merge-file", "-p", "-q", *paths],
            with_extended_output=True, with_exceptions=False, stdout_as_string=False,
            strip_newline_in_stdout=False)
    if status != 0:
        return None
    return merged.decode("utf-8")


def create_private(run_dir: Path, project_root: Path, paths: Iterable[str],
                   when: float) -> RepoInfo:
    """A private bare repository under the run folder whose base commit holds `paths`
    (project-relative files) as they are on disk."""
    path = run_dir / PRIVATE_REPO
    if not (path / "HEAD").exists():
        path.mkdir(parents=True, exist_ok=True)
        try:  # no template: a private repository has no sample hooks at all
            git.Git(str(path)).execute(["git", *SAFE_OPTIONS, "init", "-q", "--bare",
                                        "--template=", str(path)])
        except git.GitCommandError as exc:
            raise _git_error(exc) from None
    files = {}
    for relative in paths:
        files[relative] = (project_root / relative).read_bytes()
    info = RepoInfo(str(path), "", True, "")
    lineage = Lineage(info, run_dir.name, run_dir)
    message = f"Base of run {run_dir.name}: {project_root}\n\nProctor-Run: {run_dir.name}\n"
    base = lineage.commit_files(None, files, message, Identity(*PROCTOR), when)
    return RepoInfo(str(path), "", True, base)


def package_files(project_root: Path, package: str) -> list[str]:
    """The project-relative files of the experiment package on disk (no caches)."""
    found = []
    for path in sorted((project_root / package).rglob("*")):
        relative = path.relative_to(project_root)
        if "__pycache__" in relative.parts or any(p.startswith(".") for p in relative.parts):
            continue
        if path.is_file() and not path.is_symlink():
            found.append(relative.as_posix())
    return found
