"""Creating a run folder and reopening one: everything before the loop's first step.

A creation that fails (a folder not writable, a full disk, a git problem) raises EngineError
and leaves nothing behind: the run folder, and `log/` when this call made it, are removed."""

from __future__ import annotations

import re
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from engine import events as ev
from engine.atomic import write_atomic
from engine.config import ExperimentConfig
from engine.edits import EditError, check_parses
from engine.executors import ExecutorError, check_executor
from engine.human import PRE_EXISTING, HumanChange
from engine.journal import Journal, JournalError, RunEvent
from engine.logs import RunLogs
from engine.paths import RunPaths, log_root, run_dir_of
from engine.state import RunState
from engine.vcs import (
    Lineage,
    ProjectState,
    RepoInfo,
    VcsError,
    create_private,
    inspect_project,
    package_files,
    user_identity,
)
from engine.watch import ManualEdits

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class EngineError(Exception):
    """A problem that stops the engine, worded for the user."""


@dataclass(frozen=True)
class RunSettings:
    """What `proctor run` decided; stored with the run so a resume behaves the same."""

    name: str
    config_path: str
    iterations: int
    approval: str
    agent: str
    runner: str
    watch_edits: bool = True  # watch the editable files for manual edits

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSettings:
        fields = cls.__dataclass_fields__
        return cls(**{key: data[key] for key in fields if key in data})


@dataclass(frozen=True)
class OpenedRun:
    """A run folder with its journal open for the engine."""

    run_dir: Path
    project_root: Path
    config: ExperimentConfig  # as it runs: the settings' iterations, approval, agent, runner
    settings: RunSettings
    journal: Journal
    repo: RepoInfo


def package_of(config: ExperimentConfig) -> str:
    """The experiment's Python package (the harness module's top level)."""
    return config.exploration.harness.split(".")[0]


def effective_config(config: ExperimentConfig, settings: RunSettings) -> ExperimentConfig:
    """The config with what the command line decided, so snapshots hold what ran."""
    exploration = config.exploration.model_copy(update={
        "iterations": settings.iterations, "approval": settings.approval,
        "agent": settings.agent, "runner": settings.runner})
    return config.model_copy(update={"exploration": exploration})


def check_name(name: str) -> None:
    if not RUN_NAME.match(name):
        raise EngineError(f"run name '{name}' must be letters, digits, '_', '.', '-'")


def check_project(project_root: Path, config: ExperimentConfig,
                  publish: Callable[[ev.Event], None]) -> ProjectState:
    """The project's git state before a run is created; EngineError with instructions when
    it cannot start (uncommitted editable files under `dirty: refuse`, no commit yet...)."""
    exploration = config.exploration
    try:
        state = inspect_project(project_root, exploration.editable_files, package_of(config))
    except VcsError as exc:
        raise EngineError(str(exc)) from None
    if state.warning:
        publish(ev.EngineError(state.warning))
    dirty = state.uncommitted
    if dirty and exploration.dirty == "refuse":
        names = " ".join(sorted(dirty))
        raise EngineError(
            f"uncommitted changes to editable files: {names}. proctor starts from your last "
            f"commit and never stashes, resets or commits your work. Commit them "
            f"(git commit {names}), set them aside yourself (git stash), or set "
            "exploration.dirty: adopt to start with them as a 'pre-existing changes' node")
    if dirty:
        try:
            check_parses(dirty)
        except EditError as exc:
            raise EngineError(f"the uncommitted editable files cannot be adopted: {exc}") \
                from None
    return state


def create_run(project_root: Path, config: ExperimentConfig, settings: RunSettings,
               publish: Callable[[ev.Event], None]) -> OpenedRun:
    """Make `log/<name>/` with its journal, lineage and memory; refuses a name that is taken
    and a checkout whose editable files have uncommitted changes (unless `dirty: adopt`)."""
    check_name(settings.name)
    try:
        check_executor(config)
    except ExecutorError as exc:
        raise EngineError(str(exc)) from None
    project_root = project_root.resolve()
    paths = RunPaths(run_dir_of(project_root, settings.name))
    if paths.journal.exists():
        raise EngineError(f"run '{settings.name}' already exists in {paths.run_dir}: "
                          f"use `proctor resume {settings.name}` or pick another --name")
    project = check_project(project_root, config, publish)
    made = [folder for folder in (log_root(project_root), paths.run_dir)
            if not folder.exists()]
    journal: Journal | None = None
    try:
        journal = Journal.open_for_engine(paths.run_dir)
        repo = _record_creation(paths, project_root, config, settings, journal, project)
    except BaseException as exc:
        if journal is not None:
            journal.close()
        for folder in reversed(made):  # nothing half-made stays behind
            shutil.rmtree(folder, ignore_errors=True)
        if isinstance(exc, VcsError | JournalError | OSError | sqlite3.Error):
            raise EngineError(f"cannot create run '{settings.name}' in {paths.run_dir}: "
                              f"{exc}") from None
        raise
    return OpenedRun(paths.run_dir, project_root, effective_config(config, settings), settings,
                     journal, repo)


def _record_creation(paths: RunPaths, project_root: Path, config: ExperimentConfig,
                     settings: RunSettings, journal: Journal, project: ProjectState) -> RepoInfo:
    repo = project.repo
    if repo is None:  # not a git project: a private repository in the run folder
        files = sorted({*package_files(project_root, package_of(config)),
                        *config.exploration.editable_files})
        repo = create_private(paths.run_dir, project_root, files, time.time())
    lineage = Lineage(repo, settings.name, paths.run_dir)
    lineage.set_refs({lineage.ref("base"): repo.base})
    write_atomic(paths.vcs, yaml.safe_dump(repo.to_dict(), sort_keys=False))
    config_record = config.model_dump(mode="json")  # as loaded: a resume validates it again
    ran = effective_config(config, settings).model_dump(mode="json")
    write_atomic(paths.config, yaml.safe_dump(ran, sort_keys=False))
    ManualEdits(journal, config.exploration.editable_files).remember_checkout(project.checkout)
    dirty = project.uncommitted
    if dirty:
        author = user_identity(repo.path)
        RunState(journal).human_queue = [HumanChange(
            request_id=PRE_EXISTING, kind=PRE_EXISTING, parent_id=None, files=dirty,
            config=None, title=f"manual edit: pre-existing changes ({', '.join(sorted(dirty))})",
            author=asdict(author)).to_dict()]
    RunLogs(paths.run_dir, journal).init_memory(None)
    # Last: a run is there for viewers and `resume` once this record is.
    journal.append_run_event(
        RunEvent.RUN_CREATED,
        {"settings": asdict(settings), "config": config_record,
         "project_root": str(project_root), "repo": repo.to_dict()})
    return repo


def reopen_run(run_dir: Path, iterations: int | None = None) -> OpenedRun:
    """An existing run, from its journal (the config it was created with)."""
    journal = Journal.open_for_engine(run_dir)
    try:
        created = journal.run_events(RunEvent.RUN_CREATED)
        if not created:
            raise EngineError(f"{run_dir} has no record of its creation; cannot resume it")
        record = created[0].payload
        config = ExperimentConfig.model_validate(record["config"])
        settings = RunSettings.from_dict(record["settings"])
        if iterations is not None:
            settings = replace(settings, iterations=iterations)
        repo = stored_repo(journal, run_dir)
        running = effective_config(config, settings)
        if iterations is not None:  # config.yaml says what runs, as at creation
            write_atomic(RunPaths(run_dir).config,
                         yaml.safe_dump(running.model_dump(mode="json"), sort_keys=False))
    except BaseException:
        journal.close()
        raise
    return OpenedRun(run_dir, Path(record["project_root"]), running, settings, journal, repo)


def stored_repo(journal: Journal, run_dir: Path) -> RepoInfo:
    created = journal.run_events(RunEvent.RUN_CREATED)
    record = created[0].payload if created else {}
    if "repo" not in record:
        raise EngineError(f"{run_dir} was created by a proctor without git lineage; "
                          "start a new run")
    return RepoInfo.from_dict(record["repo"])
