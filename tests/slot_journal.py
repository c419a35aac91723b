"""A run with four slots, its journal written by hand the way the engine journals slots: two
runs in flight (one in a local slot, one on a Dask worker) and two reviews waiting, one per
slot. No engine holds it afterwards (a test that wants one takes the lock itself)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from engine.config import load_config
from engine.journal import Journal, RunEvent, Step
from engine.paths import RunPaths
from engine.proposal import Proposal, Strategy
from engine.review import Review, proposal_id
from engine.runs import RunSettings
from engine.state import RunState
from engine.tree import Node

WORKER = "dask worker tcp://10.1.2.3:40211"


def slot_review(iteration: int, mutation: str, awaiting: bool = True) -> Review:
    content = {"mutation": mutation, "iteration": iteration}
    return Review(proposal_id=proposal_id(iteration, 0, content), iteration=iteration,
                  attempt=0, mutation=mutation,
                  diff="--- a/models/trainer.py\n+++ b/models/trainer.py\n-a\n+b\n",
                  config_diff="", files=("models/trainer.py",), added=1, removed=1,
                  awaiting=awaiting, parent_id=None)


WAITING = (slot_review(7, "[code] clip the gradients"), slot_review(8, "[code] huber loss"))


def _propose(journal: Journal, review: Review) -> None:
    """The agent's proposal of `review`'s iteration, then its review, as the engine journals
    them."""
    proposal = Proposal(parent_id=review.parent_id, strategy=Strategy.EXPLOIT,
                        mutation=review.mutation, hypothesis=f"{review.mutation} helps")
    journal.append(review.iteration, Step.PROPOSAL_STORED,
                   {"proposal": proposal.model_dump(mode="json")})
    journal.append(review.iteration, Step.REVIEW, review.to_dict())


def _run(journal: Journal, paths: RunPaths, iteration: int, slot: int, where: str, pid: int,
         mutation: str, log: str) -> None:
    """Iteration `iteration` training in `slot` at `where`, its log so far being `log`."""
    journal.append(iteration, Step.STARTED, {"block": 1, "slot": slot})
    _propose(journal, slot_review(iteration, mutation, False))
    journal.append(iteration, Step.DECISION, {"approved": True, "by": "policy"})
    node = Node(iteration, None, {"training": {"steps": 2000}}, mutation=mutation,
                strategy="exploit")
    journal.append(iteration, Step.APPLIED, {"node": node.to_dict()})
    record = {"kind": "local", "pid": pid} if pid else {"kind": "dask", "key": f"node-{iteration}"}
    placement = {"slot": slot, "where": where, "record": record}
    journal.append(iteration, Step.RUN_STARTED, {**placement, "pid": pid})
    RunState(journal).set_active_run(iteration, placement)
    paths.training_log(iteration).parent.mkdir(parents=True, exist_ok=True)
    paths.training_log(iteration).write_text(log)


def write_slot_run(project: Path, name: str = "s1") -> Path:
    """Run `name` of `project` (the fake project) with `parallel: 4`: iteration 5 trains in
    local slot 1, 6 simulates its dataset on a Dask worker (slot 2), 7 and 8 wait for review
    in slots 3 and 4."""
    config_path = project / "configs" / "fake.yaml"
    config = load_config(config_path).model_dump(mode="json")
    config["exploration"]["parallel"] = 4
    settings = RunSettings(name=name, config_path=str(config_path), iterations=12,
                           approval="code", agent="scripted", runner="subprocess")
    run_dir = project / "log" / name
    paths = RunPaths(run_dir)
    with Journal.open_for_engine(run_dir) as journal:
        journal.append_run_event(RunEvent.RUN_CREATED, {
            "settings": asdict(settings), "project_root": str(project), "config": config})
        _run(journal, paths, 5, 1, "local slot 1", 4242, "lr 1e-3",
             "step 100/2000 loss 1.0e-01\nstep 300/2000 loss 5.0e-02\n")
        _run(journal, paths, 6, 2, WORKER, 0, "lr 3e-4",
             "[harness] simulating 200 frames\nsimulated frame 40/200\n")
        for slot, review in enumerate(WAITING, start=3):
            journal.append(review.iteration, Step.STARTED, {"block": 1, "slot": slot})
            _propose(journal, review)
    return run_dir
