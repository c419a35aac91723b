"""Claude as the agent: the Messages API with two tools (`read_file`, `submit_iteration`).

One proposal is one short conversation: the model reads what it needs and must end with a
`submit_iteration` call within `max_turns` requests. A malformed answer (no tool call, cut
off, refused, fields that fail validation) gets a bounded re-ask that says what was wrong,
then `AgentGaveUp`. Every request is stored in the journal before it is sent and every
response before it is used, keyed by iteration/attempt/turn, so a resumed run reuses an
answer it already paid for. Spend is accounted per call (input, output, cache read, cache
write) in the journal; the budget cap and spend limits raise `AgentPaused`.

The `anthropic` SDK is imported on the first request, never when the engine imports this."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.agents.base import AgentContext, AgentGaveUp, AgentPaused, AgentReply
from engine.agents.claude_client import (
    StreamFault,
    assistant_content,
    make_client,
    stream_message,
)
from engine.agents.claude_prompt import (
    READ_TOOL,
    SUBMIT_TOOL,
    SubmissionError,
    iteration_message,
    proposal_from_submission,
    read_file,
    system_blocks,
    tool_definitions,
)
from engine.apikey import load_api_key, redact
from engine.config import ExperimentConfig, Prices
from engine.proposal import Proposal
from engine.state import AGENT_BUDGET, AGENT_COST

if TYPE_CHECKING:
    from engine.journal import Journal

PROPOSAL_STEP = "proposal_stored"

TRUNCATED = (
    "Your last answer was cut off at the output limit before it was complete, so it was "
    "discarded. Answer more briefly (a shorter memory and analysis) and call submit_iteration."
)
REFUSED = (
    "Your last answer ended as a refusal and was discarded. The task is only to propose the "
    "next experiment (config values or a small code edit of a training script): call "
    "submit_iteration with this iteration's proposal."
)
NO_TOOL_CALL = (
    "You answered without calling a tool. Every iteration must end with one submit_iteration "
    "call: call it now."
)
LAST_TURN = "This is your last request for this iteration: call submit_iteration now."


@dataclass
class Usage:
    """Tokens of one call (or a total) as the API bills them."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0

    @classmethod
    def of(cls, message: dict[str, Any]) -> Usage:
        usage = message.get("usage") or {}
        return cls(**{name: int(usage.get(name) or 0) for name in cls.__dataclass_fields__})

    def cost(self, prices: Prices) -> float:
        """US dollars at `prices` (per million tokens)."""
        return (
            self.input_tokens * prices.input
            + self.output_tokens * prices.output
            + self.cache_read_input_tokens * prices.cache_read
            + self.cache_creation_input_tokens * prices.cache_write
        ) / 1e6


@dataclass
class Ledger:
    """The run's spend: `calls` numbers the billed responses, so each is counted once."""

    calls: int = 0
    usd_total: float = 0.0
    usage: Usage = field(default_factory=Usage)

    @classmethod
    def from_state(cls, data: dict[str, Any] | None) -> Ledger:
        if not data:
            return cls()
        return cls(int(data.get("calls", 0)), float(data.get("usd_total", 0.0)),
                   Usage(**data.get("usage", {})))

    def add(self, usage: Usage, usd: float) -> None:
        self.calls += 1
        self.usd_total += usd
        for name in Usage.__dataclass_fields__:
            setattr(self.usage, name, getattr(self.usage, name) + getattr(usage, name))

    def to_state(self) -> dict[str, Any]:
        return {"calls": self.calls, "usd_total": self.usd_total, "usage": asdict(self.usage)}


@dataclass
class _Turn:
    """How one response moves the conversation on."""

    proposal: Proposal | None = None
    problem: str | None = None  # a malformed answer: counts against the re-asks
    keep_assistant: bool = True  # False: the answer is discarded (cut off, refused)
    replies: list[dict[str, Any]] = field(default_factory=list)  # the next user content
    notes: list[str] = field(default_factory=list)  # for the reasoning log


class AnthropicAgent:
    """Claude through the Messages API; see the module docstring."""

    name = "anthropic"

    def __init__(
        self,
        config: ExperimentConfig,
        journal: Journal | None = None,
        *,
        api_key: str | None = None,
    ) -> None:
        self.config = config
        self.settings = config.exploration.anthropic
        self._api_key = api_key or load_api_key(self.settings.key_file)
        self._journal: Journal | None = None
        self._ledger = Ledger()  # used without a journal
        self._client: Any = None
        self._tools = tool_definitions(config)
        if journal is not None:
            self.attach_journal(journal)

    def attach_journal(self, journal: Journal) -> None:
        """Store exchanges and spend in this run's journal (the engine calls it on open)."""
        self._journal = journal

    async def aclose(self) -> None:
        """Close the HTTP client (the engine calls it when the run ends)."""
        if self._client is not None:
            await self._client.close()
            self._client = None

    @property
    def run_dir(self) -> Path | None:
        return self._journal.path.parent if self._journal is not None else None

    # -- the conversation ------------------------------------------------------------------

    async def propose(self, context: AgentContext) -> AgentReply:
        """One proposal: a short tool-use conversation ending in `submit_iteration`."""
        attempt = self._attempt(context)
        secret = self._api_key
        first = redact(iteration_message(context, self.config, secret), secret)
        messages: list[dict[str, Any]] = [
            {"role": "user", "content": [{"type": "text", "text": first}]}
        ]
        reasks, cost, notes = 0, 0.0, []
        last_raw: dict[str, Any] | None = None
        max_turns = self.settings.max_turns
        for turn in range(max_turns):
            key = f"{context.iteration}/{attempt}/{turn}"
            request = self._request_body(context, messages)
            record = self._exchange(f"{key}/response")
            if record is None:
                self._check_budget()
                self._store(f"{key}/request", {"request": request}, context.iteration)
                record = await self._send(request, key, context.iteration)
            cost += self._account(record)
            message = record["message"]
            last_raw = message
            step = self._interpret(message, context)
            notes += step.notes
            if step.proposal is not None:
                reasoning = "\n\n".join(note for note in notes if note.strip())
                return AgentReply(step.proposal, reasoning=reasoning, cost_usd=cost)
            if step.problem is not None:
                reasks += 1
                notes.append(f"[re-ask {reasks}: {step.problem}]")
                if reasks > self.settings.max_reasks:
                    raise AgentGaveUp(
                        f"no valid proposal after {reasks} malformed answers "
                        f"(last: {step.problem})", raw=last_raw,
                    )
            replies = list(step.replies)
            if turn == max_turns - 2:
                replies.append({"type": "text", "text": LAST_TURN})
            messages = _advance(messages, message, step.keep_assistant, replies)
        raise AgentGaveUp(f"no submit_iteration within {max_turns} requests", raw=last_raw)

    def _interpret(self, message: dict[str, Any], context: AgentContext) -> _Turn:
        blocks = message.get("content", [])
        notes = [block.get("text", "") for block in blocks if block.get("type") == "text"]
        notes += [block.get("thinking", "") for block in blocks if block.get("type") == "thinking"]
        stop = message.get("stop_reason")
        if stop in ("max_tokens", "model_context_window_exceeded"):
            return _Turn(problem=f"answer cut off ({stop})", keep_assistant=False,
                         replies=[{"type": "text", "text": TRUNCATED}])
        if stop == "refusal":
            return _Turn(problem="the model refused", keep_assistant=False,
                         replies=[{"type": "text", "text": REFUSED}])
        calls = [block for block in blocks if block.get("type") == "tool_use"]
        if not calls:
            said = any(b.get("type") == "text" and b.get("text", "").strip() for b in blocks)
            return _Turn(problem="no tool call", keep_assistant=said, notes=notes,
                         replies=[{"type": "text", "text": NO_TOOL_CALL}])
        turn = _Turn(notes=notes)
        for call in calls:
            if call.get("name") == SUBMIT_TOOL and turn.proposal is None:
                try:
                    turn.proposal = proposal_from_submission(call.get("input"), context,
                                                             self.config)
                    continue
                except SubmissionError as exc:
                    turn.problem = f"invalid submission: {exc}"
                    text = f"proctor refused this submission: {exc}. Fix it and submit again."
                    turn.replies.append(_tool_result(call, text, error=True))
                    continue
            if call.get("name") == READ_TOOL:
                arguments = call.get("input") or {}
                text, error = read_file(arguments, context, self.config, self.run_dir,
                                        self._api_key)
                where = arguments.get("node_id")
                turn.notes.append(f"[read_file {arguments.get('path')}"
                                  + (f" at node {where}]" if where is not None else "]"))
                turn.replies.append(_tool_result(call, text, error=error))
                continue
            turn.replies.append(_tool_result(call, f"unknown tool {call.get('name')!r}",
                                             error=True))
        if turn.proposal is not None:
            turn.problem = None  # one valid submission is the answer
        return turn

    # -- requests --------------------------------------------------------------------------

    def _request_body(
        self, context: AgentContext, messages: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """The request as sent (no headers: the key never reaches the journal)."""
        body: dict[str, Any] = {
            "model": self.settings.model,
            "max_tokens": self.settings.max_tokens,
            "system": system_blocks(redact(context.instructions, self._api_key)),
            "tools": self._tools,
            "messages": _with_cache_marker(messages),
        }
        if self.settings.temperature is not None:
            body["temperature"] = self.settings.temperature
        if self.settings.effort is not None:
            body["output_config"] = {"effort": self.settings.effort}
        return body

    async def _send(self, request: dict[str, Any], key: str, iteration: int) -> dict[str, Any]:
        """One logical request; the response is stored (with its cost) before it is used."""
        if self._client is None:
            self._client = make_client(self.settings, self._api_key)
        kwargs = dict(request)
        temperature = kwargs.pop("temperature", None)
        if temperature is not None:  # not a keyword of the SDK's stream(): sent as body
            kwargs["extra_body"] = {"temperature": temperature}

        def on_fault(fault: StreamFault) -> None:
            self._store(f"{key}/fault/{time.time_ns()}", {"fault": asdict(fault)}, iteration)

        streamed = await stream_message(
            self._client, kwargs, retries=self.settings.stream_retries, secret=self._api_key,
            on_fault=on_fault, backoff_s=self.settings.stream_retry_backoff_s,
        )
        usage = Usage.of(streamed.message)
        record = {
            "message": streamed.message,
            "request_id": streamed.request_id,
            "usage": asdict(usage),
            "cost_usd": usage.cost(self.settings.prices),
            "call": self._load_ledger().calls + 1,
        }
        self._store(f"{key}/response", record, iteration)
        return record

    # -- journal, spend and budget ---------------------------------------------------------

    def _attempt(self, context: AgentContext) -> int:
        """The loop's attempt number: given, or the proposals already stored this iteration
        (the loop stores one per attempt before it moves to the next)."""
        if context.attempt is not None:
            return context.attempt
        if self._journal is None:
            return 0
        return sum(1 for event in self._journal.events(context.iteration)
                   if event.step == PROPOSAL_STEP)

    def _exchange(self, key: str) -> dict[str, Any] | None:
        return self._journal.exchange(key) if self._journal is not None else None

    def _store(self, key: str, payload: dict[str, Any], iteration: int) -> None:
        if self._journal is not None:
            self._journal.store_exchange(key, payload, iteration=iteration)

    def _load_ledger(self) -> Ledger:
        if self._journal is None:
            return self._ledger
        return Ledger.from_state(self._journal.state(AGENT_COST))

    def _account(self, record: dict[str, Any]) -> float:
        """Add a stored response's cost to the run's total once (a reused one may already be
        in it); returns its cost either way."""
        usd = float(record.get("cost_usd", 0.0))
        ledger = self._load_ledger()
        if int(record.get("call", 0)) > ledger.calls:
            ledger.add(Usage(**record.get("usage", {})), usd)
            if self._journal is not None:
                self._journal.set_state(AGENT_COST, ledger.to_state())
        return usd

    def budget_usd(self) -> float | None:
        """The run's cap: a human's override in the journal, else the config's."""
        if self._journal is not None:
            override = self._journal.state(AGENT_BUDGET)
            if override is not None:
                return float(override)
        return self.settings.budget_usd

    def spent_usd(self) -> float:
        return self._load_ledger().usd_total

    def _check_budget(self) -> None:
        budget = self.budget_usd()
        spent = self.spent_usd()
        if budget is not None and spent >= budget:
            raise AgentPaused(
                f"the run's agent budget of ${budget:.2f} is spent (${spent:.4f} so far); "
                "raise exploration.anthropic.budget_usd (or the run's budget) to go on"
            )


def _tool_result(call: dict[str, Any], text: str, *, error: bool = False) -> dict[str, Any]:
    result: dict[str, Any] = {"type": "tool_result", "tool_use_id": call.get("id", ""),
                              "content": text}
    if error:
        result["is_error"] = True
    return result


def _advance(
    messages: list[dict[str, Any]],
    message: dict[str, Any],
    keep_assistant: bool,
    replies: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """The conversation after one answer: with it and our replies, or (a discarded answer)
    with the replies added to the last user message."""
    if keep_assistant:
        return [*messages, {"role": "assistant", "content": assistant_content(message)},
                {"role": "user", "content": replies}]
    last = messages[-1]
    return [*messages[:-1], {"role": "user", "content": [*last["content"], *replies]}]


def _with_cache_marker(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A copy whose last block carries a cache breakpoint, so a tool round re-reads the
    conversation so far from the cache."""
    if not messages or not messages[-1]["content"]:
        return messages
    *rest, last = messages
    *blocks, final = last["content"]
    marked = {**final, "cache_control": {"type": "ephemeral"}}
    return [*rest, {"role": last["role"], "content": [*blocks, marked]}]
