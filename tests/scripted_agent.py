"""A scripted agent for engine tests: real proposals through the real loop, chosen by rule.

Iteration 1 measures the baseline; even iterations step the learning rate up tenfold from
the best candidate; odd iterations after 1 raise the fake model's BONUS by a code edit."""

from __future__ import annotations

from engine.agents.base import AgentContext, AgentReply
from engine.proposal import CodeChange, CodeEdit, Proposal, Strategy


class ScriptedAgent:
    name = "scripted"

    def __init__(self, config=None):
        self.contexts: list[AgentContext] = []

    async def propose(self, context: AgentContext) -> AgentReply:
        self.contexts.append(context)
        memory = f"# Working memory\n## Current Block\n- proposed iteration {context.iteration}\n"
        if not context.candidates:
            proposal = Proposal(parent_id=None, strategy=Strategy.BASELINE,
                                analysis="first run", memory=memory)
        elif context.iteration % 2 == 0:
            parent = context.node(context.candidates[0])
            rate = parent.config["training"]["learning_rate"]
            proposal = Proposal(
                parent_id=parent.id, strategy=Strategy.EXPLOIT,
                config_changes={"training.learning_rate": min(rate * 10, 0.1)},
                parent_rule=f"Node {parent.id} (highest score)",
                hypothesis="a larger rate fits faster", analysis="under-fitting", memory=memory,
            )
        else:
            parent_id = context.candidates[0]
            current = context.read_file(parent_id, "models/siren.py")
            line = next(x for x in current.splitlines() if x.startswith("BONUS"))
            bonus = float(line.split("=")[1])
            proposal = Proposal(
                parent_id=parent_id, strategy=Strategy.CODE_CHANGE,
                edits=(CodeEdit(file="models/siren.py", search=line,
                                replace=f"BONUS = {bonus + 0.01:.2f}"),),
                code_change=CodeChange(file="models/siren.py", function="module",
                                       change="raise BONUS by 0.01"),
                mutation="[code] bonus", hypothesis="more bonus, more R2",
                analysis="try code", memory=memory,
            )
        return AgentReply(proposal, reasoning=f"scripted choice for {context.iteration}")


def run_scripted(project, name: str = "r1", iterations: int = 3, agent=None):
    """Run the scripted agent (or `agent`) on the fake project in `project` to its end,
    approving everything; returns the closed engine (its tree and paths stay readable)."""
    import asyncio

    from engine.config import load_config
    from engine.loop import Engine
    from engine.runs import RunSettings

    config_path = project / "configs" / "fake.yaml"
    settings = RunSettings(name=name, config_path=str(config_path), iterations=iterations,
                           approval="auto", agent="scripted", runner="subprocess",
                           watch_edits=False)
    engine = Engine.create(project, load_config(config_path), settings, agent or ScriptedAgent())
    try:
        asyncio.run(engine.run())
    finally:
        engine.close()
    return engine
