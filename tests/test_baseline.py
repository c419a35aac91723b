"""`proctor baseline`: Optuna's TPE and random samplers as an agent of the engine, on the fake
experiment (score 0.9 - 0.1·|log10(learning_rate) + 3|, best at 1e-3) through the real loop,
runner, evaluator and journal; the study is rebuilt from the tree at every call, so a run
killed with SIGKILL resumes where it was and goes on with the same trials."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from git_project import make_git_project
from waiting import until, wait_for

from engine.agents import AgentUnavailable, make_agent
from engine.agents.base import AgentContext, InFlight, NodeSummary
from engine.config import ExperimentConfig, load_config
from engine.journal import Journal, RunEvent, Step
from engine.loop import Engine
from engine.proposals import ProposalChecker
from engine.runs import RunSettings
from engine.state import RunState
from engine.tree import Tree
from tui.app import attached_app
from tui.settings import TuiSettings

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOW, HIGH = 1e-6, 1e-1  # the fake config's learning-rate range
QUIET = TuiSettings(watch_files=False, show_clock=False, bell=False, toasts=False,
                    journal_poll_s=0.05)


def fake_r2(rate: float) -> float:
    return 0.9 - 0.1 * abs(math.log10(rate) + 3)


def project_with(root: Path, **changes) -> Path:
    """The fake project as a git repository, with `section={key: value}` changes to its
    config, committed."""
    project = make_git_project(root)
    path = project / "configs" / "fake.yaml"
    config = yaml.safe_load(path.read_text())
    for section, values in changes.items():
        config[section].update(values)
    path.write_text(yaml.safe_dump(config))
    return project


# -- the agent alone: what it is told and what it samples -----------------------------------


def fake_config(training: dict | None = None, **exploration) -> ExperimentConfig:
    data = load_config(HERE / "fakeproject" / "configs" / "fake.yaml").model_dump()
    data["training"].update(training or {})
    data["exploration"].update(exploration)
    return ExperimentConfig.model_validate(data)


def node(node_id: int, rate: float, status: str = "done", code: bool = False,
         r2: float | None = None) -> NodeSummary:
    config = fake_config().experiment_sections()
    config["training"]["learning_rate"] = rate
    metrics = {"final_r2": fake_r2(rate) if r2 is None else r2} if status == "done" else {}
    return NodeSummary(id=node_id, parent_id=None, block=1, status=status, strategy="explore",
                       mutation="", code_changed=code, config_changes={}, config=config,
                       metrics=metrics)


def context(iteration: int, nodes=(), in_flight=(), config=None) -> AgentContext:
    return AgentContext(iteration=iteration, block=1, iteration_in_block=iteration,
                        block_size=12, block_end=False, instructions="", memory="",
                        score_table="", config=config or fake_config(), nodes=tuple(nodes),
                        candidates=(), in_flight=tuple(in_flight), attempt=0)


def propose(agent, ctx: AgentContext):
    return asyncio.run(agent.propose(ctx))


def test_tpe_samples_where_the_history_scored_well_and_random_does_not():
    history = [node(i + 1, 10 ** (-6 + 5 * i / 11)) for i in range(12)]  # > startup trials
    distance = {}
    for sampler in ("tpe", "random"):
        agent = make_agent(f"optuna-{sampler}", fake_config())
        rates = [propose(agent, context(i, history)).proposal.config_changes[
            "training.learning_rate"] for i in range(13, 21)]
        assert all(LOW <= rate <= HIGH for rate in rates)
        again = propose(agent, context(20, history)).proposal.config_changes
        assert again == {"training.learning_rate": rates[-1]}  # same history, same trial
        distance[sampler] = statistics.median(abs(math.log10(r) + 3) for r in rates)
    # decades from the best rate (1e-3): TPE models the told trials, random ignores them
    assert distance["tpe"] < 0.25 < distance["random"]


def test_every_node_is_told_by_its_outcome_and_nodes_outside_the_space_are_left_out():
    nodes = [node(1, 1e-3), node(2, 1e-2, status="diverged"), node(3, 1e-5, status="failed"),
             node(4, 1e-4, status="running"), node(5, 1e-3, code=True),
             node(6, 0.5)]  # a human's node outside the space
    waiting = InFlight(iteration=7, slot=2, parent_id=None, mutation="",
                       config_changes={"training.learning_rate": 2e-3}, code_change=None,
                       status="review")
    reply = propose(make_agent("optuna-tpe", fake_config()), context(8, nodes, [waiting]))
    assert reply.reasoning.startswith("tpe sampler (seed ")
    assert "told 2 finished trial(s), 1 failed, 2 in flight, 2 node(s) outside the space " \
           "left out; sampled training.learning_rate=" in reply.reasoning


def test_a_trial_is_a_config_only_sample_from_the_base_config_that_the_engine_accepts():
    config = fake_config(training={"step_sleep": 0.0}, search_space={
        "training.learning_rate": {"low": LOW, "high": HIGH, "log": True},
        "training.steps": {"low": 1.5, "high": 6, "integer": True},
        "training.step_sleep": {"choices": [0.0, 0.01]}})
    agent = make_agent("optuna-random", config)
    checker = ProposalChecker(config, Tree(block_size=12, score="puct", c=1.4), lambda _: {})
    for iteration in range(1, 6):
        proposal = propose(agent, context(iteration, config=config)).proposal
        assert proposal.parent_id is None and not proposal.edits
        assert sorted(proposal.config_changes) == sorted(config.exploration.search_space)
        steps = proposal.config_changes["training.steps"]
        assert isinstance(steps, int) and 2 <= steps <= 6
        for key, value in proposal.config_changes.items():
            checker.check_change(key, value)  # raises when outside the space


@pytest.mark.parametrize("space, expected", [
    ({}, "the config has no exploration.search_space"),
    ({"training.steps": {"low": 1.2, "high": 1.8, "integer": True}},
     "exploration.search_space.training.steps: no integer lies in [1.2, 1.8]"),
])
def test_a_space_that_cannot_be_searched_is_one_clear_line(space, expected):
    config = fake_config(search_space=space)
    with pytest.raises(AgentUnavailable) as caught:
        make_agent("optuna-tpe", config)
    assert str(caught.value).startswith(expected) and "\n" not in str(caught.value)


# -- through the engine ---------------------------------------------------------------------


async def run_baseline(project: Path, sampler: str, trials: int, name: str) -> Engine:
    config = load_config(project / "configs" / "fake.yaml")
    agent_name = f"optuna-{sampler}"
    settings = RunSettings(name=name, config_path=str(project / "configs" / "fake.yaml"),
                           iterations=trials, approval="auto", agent=agent_name,
                           runner="subprocess")
    engine = Engine.create(project, config, settings, make_agent(agent_name, config))
    try:
        await engine.run()
    finally:
        engine.close()
    return engine


def trial_rates(project: Path, name: str) -> list[float]:
    """Each recorded node's learning rate, by iteration."""
    with Journal.open_for_client(project / "log" / name) as journal:
        return [journal.payload(i, Step.RECORDED)["node"]["config"]["training"]["learning_rate"]
                for i in journal.completed_iterations()]


@pytest.mark.parametrize("sampler", ["tpe", "random"])
async def test_a_five_trial_baseline_runs_through_the_loop(tmp_path, sampler):
    project = project_with(tmp_path / "project")
    engine = await run_baseline(project, sampler, 5, "b1")
    nodes = sorted(engine.tree, key=lambda n: n.id)
    assert [n.id for n in nodes] == [1, 2, 3, 4, 5]
    for n in nodes:
        rate = n.config["training"]["learning_rate"]
        assert n.parent_id is None and not n.code_changed and n.status == "done"
        assert LOW <= rate <= HIGH
        # the trusted evaluator scored the sampled config, nothing else
        assert n.metrics["final_r2"] == pytest.approx(fake_r2(rate))
        assert n.mutation.startswith(f"{sampler}: training.learning_rate=")
    assert len({n.config["training"]["learning_rate"] for n in nodes}) == 5
    reasoning = (project / "log" / "b1" / "reasoning.log").read_text()
    assert f"{sampler} sampler (seed " in reasoning
    assert "told 4 finished trial(s), 0 failed, 0 in flight" in reasoning  # the fifth's


async def test_the_same_seed_gives_the_same_trials_another_seed_others(tmp_path):
    project = project_with(tmp_path / "project")
    await run_baseline(project, "tpe", 2, "s0")
    await run_baseline(project, "tpe", 2, "again")
    other = project_with(tmp_path / "other", exploration={"seed": 1})
    await run_baseline(other, "tpe", 2, "s1")
    assert trial_rates(project, "s0") == trial_rates(project, "again")
    assert not set(trial_rates(project, "s0")) & set(trial_rates(other, "s1"))


async def test_two_slots_tell_each_other_their_trials_and_never_share_a_point(tmp_path):
    project = project_with(tmp_path / "project", exploration={"parallel": 2},
                           training={"step_sleep": 0.1})
    engine = await run_baseline(project, "tpe", 4, "p2")
    rates = [n.config["training"]["learning_rate"] for n in engine.tree]
    assert len(rates) == 4 and len(set(rates)) == 4
    reasoning = (project / "log" / "p2" / "reasoning.log").read_text()
    # iteration 2 was proposed while iteration 1 was in flight
    second = reasoning.split("=== Iteration 2 ===")[1].split("=== Iteration")[0]
    assert "told 0 finished trial(s), 0 failed, 1 in flight" in second


# -- the command line -----------------------------------------------------------------------


def proctor(*args: str, cwd: Path, prelude: str = "") -> subprocess.CompletedProcess:
    code = f"{prelude}import sys\nfrom tui.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)


def start_proctor(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tui.cli", *args], cwd=cwd,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


async def test_cli_baseline_is_a_run_then_kill_9_and_resume_goes_on_with_the_same_trials(
        tmp_path):
    project = project_with(tmp_path / "project")
    whole = proctor("baseline", "configs/fake.yaml", "--sampler", "tpe", "--trials", "3",
                    "--name", "whole", "--headless", cwd=project)
    assert whole.returncode == 0, whole.stderr
    assert "finished: completed 3 iterations" in whole.stdout
    status = proctor("status", "whole", "--json", cwd=project)
    assert status.returncode == 0, status.stderr
    assert sorted(row["node_id"] for row in json.loads(status.stdout)["nodes"]) == [1, 2, 3]
    stats = proctor("stats", "whole", "--json", cwd=project)
    assert stats.returncode == 0 and json.loads(stats.stdout)["nodes"] == 3
    with Journal.open_for_client(project / "log" / "whole") as journal:
        settings = journal.run_events(RunEvent.RUN_CREATED)[0].payload["settings"]
    assert (settings["agent"], settings["approval"], settings["iterations"]) == \
        ("optuna-tpe", "auto", 3)
    app = attached_app(project / "log" / "whole", QUIET)  # the app browses it like any run
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("3")
        await until(pilot, lambda: app.snapshot is not None and len(app.snapshot.nodes) == 3,
                    "the tree of the baseline run")
        assert sorted(app.snapshot.nodes) == [1, 2, 3]

    # the same baseline, slower, killed while iteration 2 trains
    slow = project / "configs" / "slow.yaml"
    config = yaml.safe_load((project / "configs" / "fake.yaml").read_text())
    config["training"].update(steps=10, step_sleep=0.1)  # the score ignores both
    slow.write_text(yaml.safe_dump(config))
    run_dir = project / "log" / "killed"
    engine = start_proctor("baseline", str(slow), "--trials", "3", "--name", "killed",
                           "--headless", cwd=project)
    try:
        wait_for(lambda: (run_dir / "vcs.yaml").exists(), "the run folder", 60)
        with Journal.open_for_client(run_dir) as journal:
            wait_for(lambda: 2 in RunState(journal).active_runs, "iteration 2 training", 60)
        engine.send_signal(signal.SIGKILL)
        engine.wait()
        with Journal.open_for_client(run_dir) as journal:  # killed while 2 trained
            assert journal.completed_iterations() == [1]
            assert journal.unfinished_iterations() == [2]
            assert journal.payload(2, Step.RUN_FINISHED) is None
    finally:
        if engine.poll() is None:
            os.kill(engine.pid, signal.SIGKILL)
            engine.wait()
    resumed = proctor("resume", "killed", cwd=project)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    with Journal.open_for_client(run_dir) as journal:
        assert journal.completed_iterations() == [1, 2, 3]
        events = journal.events()
        assert [e.iteration for e in events if e.step == Step.STARTED] == [1, 2, 3]
        for step in (Step.PROPOSAL_STORED, Step.RECORDED):  # none asked or recorded twice
            assert [e.iteration for e in events if e.step == step] == [1, 2, 3]
    assert trial_rates(project, "killed") == trial_rates(project, "whole")
    reasoning = (run_dir / "reasoning.log").read_text()
    after = reasoning.split("=== Iteration 3 ===")[1]  # proposed by the resumed engine
    assert "told 2 finished trial(s), 0 failed, 0 in flight" in after


@pytest.mark.parametrize("args, prelude, expected", [
    (("--sampler", "grid"), "", "argument --sampler: invalid choice: 'grid'"),
    (("--trials", "0"), "", "argument --trials: must be at least 1"),
    ((), "import sys\nsys.modules['optuna'] = None\n",
     "proctor: the tpe baseline needs optuna: pip install 'proctor[analytics]'"),
])
def test_bad_input_is_exit_2_and_nothing_starts(tmp_path, args, prelude, expected):
    project = project_with(tmp_path / "project")
    result = proctor("baseline", "configs/fake.yaml", *args, cwd=project, prelude=prelude)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (project / "log").exists()


def test_a_config_without_a_search_space_is_one_line_exit_2(tmp_path):
    project = project_with(tmp_path / "project", exploration={"search_space": {}})
    result = proctor("baseline", "configs/fake.yaml", cwd=project)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "proctor: the config has no exploration.search_space: a baseline searches its keys "
        "(low/high or choices)"]
    assert not (project / "log").exists()


def test_start_up_does_not_import_optuna():
    probe = ("import sys, tui.cli, engine.agents, engine.loop\n"
             "for argv in (['--help'], ['baseline', '--help']):\n"
             "    try:\n        tui.cli.main(argv)\n    except SystemExit:\n        pass\n"
             "print('optuna' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "False"
