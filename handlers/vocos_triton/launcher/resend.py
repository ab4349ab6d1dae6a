"""Calls a dead stub may hold, sent again: how the gRPC guard hides a stub's death from its clients.

When the stub process of a model instance dies, tritonserver 2.51 fails the batch it held only at its
next health poll, 1-2 s after the death, and until the watchdog's repair takes the instance out
(vocos_triton.launcher.watchdog) it may hand it one more batch, failed a second later again. A client
without retries would see those calls fail; one with retries would wait over a second for them. The guard
sends such a call again instead, to be computed by the model's other instances, and answers the client
with the first copy that succeeds:

- **when the watchdog reports the death**: the calls the dead stub held (its holding file,
  vocos_triton.serving.holding; without one, every call in flight to the models concerned: the model
  and the ensembles that run it);
- **while the repair lasts, once the dead instance can take calls again**: a call still unanswered after
  :data:`HEDGE_FACTOR` times what its model's calls have been taking for their size (at least
  :data:`HEDGE_FLOOR_S`): the dead instance may have taken it since. The backend thread of the dead
  instance takes nothing while it waits for the batch the stub held, so when the watchdog named that
  batch the guard waits until it fails (the first copy that fails on the dead stub). Before, copies of
  calls that were merely slow went in that wait, each one more forward on the cores the survivor and
  the replacement shared (a kill under load: 12 such copies, all wasted, the survivor's calls later for
  them);
- **whenever a copy fails because its stub is dead** (tritonserver's "... is not healthy") and no other
  copy is still out: at once.

A call is sent at most :data:`MAX_COPIES` times, and not once its deadline has passed. Inference is a pure
function of its request, so a copy costs compute and changes nothing else; the copies that lose finish
unseen, like a call whose client has gone (the guard never cancels a call upstream).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Awaitable, Callable, Dict, Iterable, List, Optional, Set

import grpc

log = logging.getLogger("vocos_triton.launcher.guard")

#: how many times one call may go upstream: once, and twice more around a stub's death
MAX_COPIES = 3
#: a call of a model under repair is sent again once it has taken this many times what such calls took
#: before the repair ...
HEDGE_FACTOR = 2.0
#: ... and at least this long (s). A dead instance holds a batch for 1-2 s; the live one, with the
#: replacement loading beside it on the same cores, answered 1 s clips in up to 0.7 s (measured): sooner
#: would send many calls that are merely slow again, and slow every call further.
HEDGE_FLOOR_S = 0.5
#: how often a repair's calls are looked at (s)
CHECK_EVERY_S = 0.05
#: how quickly the expected time follows the latest calls (weight of the newest)
PACE_WEIGHT = 0.2
#: what tritonserver 2.51's Python backend says of a call whose instance's stub process is dead
DEAD_STUB_WORDS = ("is not healthy", "Failed to obtain the health mutex")

#: sends copy number ``n`` (0: the first) of a call upstream
Sender = Callable[[int], Awaitable[bytes]]


def stub_died(error: BaseException) -> bool:
    """Whether ``error`` (an upstream call's) says the instance that held the call has a dead stub."""
    if not isinstance(error, grpc.aio.AioRpcError) or error.code() != grpc.StatusCode.INTERNAL:
        return False
    details = error.details() or ""
    return any(words in details for words in DEAD_STUB_WORDS)


class Pace:
    """Seconds per request byte each model's calls have been taking (queueing included), outside stub
    repairs: an average that follows the latest answers, so a call's expected time scales with its audio."""

    def __init__(self, weight: float = PACE_WEIGHT) -> None:
        self.weight = weight
        self.per_byte: Dict[str, float] = {}

    def record(self, model: str, size: int, seconds: float) -> None:
        rate = seconds / max(1, size)
        before = self.per_byte.get(model)
        self.per_byte[model] = rate if before is None else before + self.weight * (rate - before)

    def hedge_after(self, model: str, size: int) -> float:
        """Seconds after which a call of ``size`` bytes to ``model`` is overdue."""
        rate = self.per_byte.get(model)
        return HEDGE_FLOOR_S if rate is None else max(HEDGE_FLOOR_S, HEDGE_FACTOR * rate * size)


class InferCall:
    """One client's inference call and its copies upstream: answered by the first copy that succeeds, failed
    with the last copy's error once every copy has failed and none may follow."""

    def __init__(self, model: str, number: int, size: int, send: Sender, deadline: Optional[float],
                 on_done: Callable[[InferCall, Optional[float]], None],
                 on_dead_stub: Callable[[InferCall], bool], on_dead_batch: Callable[[str], None]) -> None:
        self.model, self.number, self.size, self._send, self.deadline = model, number, size, send, deadline
        self._on_done = on_done  # (call, seconds the winning copy took, or None when it failed)
        self._on_dead_stub = on_dead_stub  # its last copy out failed on a dead stub: True if sent again
        self._on_dead_batch = on_dead_batch  # any copy failed on a dead stub (the call answered or not)
        self._loop = asyncio.get_running_loop()
        self.answer: asyncio.Future = self._loop.create_future()
        self.copies: List[asyncio.Future] = []
        self.last_sent = 0.0
        self.answered_by: Optional[int] = None  # the copy whose answer the client got (0: the first)

    def may_send(self) -> bool:
        return (not self.answer.done() and len(self.copies) < MAX_COPIES
                and (self.deadline is None or self._loop.time() < self.deadline))

    def send(self) -> bool:
        """Send one more copy; False when it may not (answered, copies used up, deadline passed)."""
        if not self.may_send():
            return False
        sent = self.last_sent = self._loop.time()
        number = len(self.copies)
        copy = asyncio.ensure_future(self._send(number))
        self.copies.append(copy)
        copy.add_done_callback(lambda done: self._copy_done(done, number, sent))
        return True

    def pending(self) -> List[asyncio.Future]:
        return [copy for copy in self.copies if not copy.done()]

    def _copy_done(self, copy: asyncio.Future, number: int, sent: float) -> None:
        error = copy.exception() if not copy.cancelled() else asyncio.CancelledError()
        if error is not None and stub_died(error):
            self._on_dead_batch(self.model)
        if self.answer.done():
            return
        if error is None:
            self.answered_by = number
            self.answer.set_result(copy.result())
            self._on_done(self, self._loop.time() - sent)
        elif not self.pending() and not (stub_died(error) and self._on_dead_stub(self)):
            self.answer.set_exception(error)
            self._on_done(self, None)


class Resender:
    """The guard's inference calls in flight, by model, and the stub repairs under way (told by the launcher's
    watchdog): sends again the calls a dead stub may hold (module docstring)."""

    def __init__(self) -> None:
        self.calls: Dict[str, Set[InferCall]] = {}
        self.by_number: Dict[int, InferCall] = {}
        self._numbers = itertools.count(1)
        self.repairing: Dict[str, int] = {}  # model -> repairs under way (two stubs of one model may die)
        # the models of each repair whose dead instance still waits for the batch its stub held: it takes
        # no call before that batch fails, so no call of theirs is overdue yet
        self.holding_back: List[Set[str]] = []
        self.pace = Pace()
        self.resent = 0  # copies sent after the first
        self.rescued = 0  # calls answered by a later copy
        self._checking: Optional[asyncio.Task] = None

    def number(self) -> int:
        """A new call's number (:data:`~vocos_triton.contract.CALL_PARAMETER`)."""
        return next(self._numbers)

    def start(self, model: str, number: int, size: int, send: Sender, deadline: Optional[float]) -> InferCall:
        """A new call, sent upstream at once."""
        call = InferCall(model, number, size, send, deadline, self._finished, self._resend, self._dead_batch_failed)
        self.calls.setdefault(model, set()).add(call)
        self.by_number[number] = call
        call.send()
        return call

    def forget(self, call: InferCall) -> None:
        """No more copies of ``call`` (answered, or its client has gone)."""
        self.calls.get(call.model, set()).discard(call)
        self.by_number.pop(call.number, None)

    def _finished(self, call: InferCall, seconds: Optional[float]) -> None:
        self.forget(call)
        if seconds is not None and call.model not in self.repairing:  # a repair slows every call
            self.pace.record(call.model, call.size, seconds)
        self.rescued += bool(call.answered_by)

    def _resend(self, call: InferCall) -> bool:
        if call.send():
            self.resent += 1
            return True
        return False

    def repair_started(self, models: Iterable[str], held: Optional[Iterable[int]] = None) -> None:
        """A stub of ``models`` died holding the calls ``held`` (None: unknown, so any call in flight to
        ``models`` may be in its batch): send them again. Calls overdue are sent again once the dead
        instance can take calls (at once, unless it holds a batch of calls in flight here)."""
        models = list(models)
        for model in models:
            self.repairing[model] = self.repairing.get(model, 0) + 1
        if held is None:
            lost = [call for model in models for call in self.calls.get(model, ())]
        else:
            held = list(held)
            lost = [self.by_number[number] for number in held if number in self.by_number]
        if lost and held is not None:
            self.holding_back.append(set(models))
        sent = sum(self._resend(call) for call in lost)
        log.info("a stub of %s died holding %s; sent %d calls again", ", ".join(models),
                 "unknown calls" if held is None else f"{len(held)} calls", sent)
        if self._checking is None or self._checking.done():
            self._checking = asyncio.ensure_future(self._check_overdue())

    def _dead_batch_failed(self, model: str) -> None:
        """tritonserver failed a batch of ``model`` on a dead stub: that instance's thread is free and may
        take the next calls."""
        self.holding_back = [models for models in self.holding_back if model not in models]

    def may_be_taken_by_the_dead(self, model: str) -> bool:
        """Whether a dead instance may take ``model``'s calls now (a repair of it is under way, and its dead
        instance no longer waits for the batch it held)."""
        return model in self.repairing and not any(model in models for models in self.holding_back)

    def repair_ended(self, models: Iterable[str]) -> None:
        models = list(models)
        log.info("the repair of %s has ended (%d copies sent again so far, %d calls answered by one)",
                 ", ".join(models), self.resent, self.rescued)
        for model in models:
            if self.repairing.get(model, 0) <= 1:
                self.repairing.pop(model, None)
            else:
                self.repairing[model] -= 1
        self.holding_back = [group for group in self.holding_back if group & set(self.repairing)]

    async def _check_overdue(self) -> None:
        loop = asyncio.get_running_loop()
        while self.repairing:
            await asyncio.sleep(CHECK_EVERY_S)
            now = loop.time()
            for model in list(self.repairing):
                if not self.may_be_taken_by_the_dead(model):
                    continue
                for call in list(self.calls.get(model, ())):
                    if now - call.last_sent > self.pace.hedge_after(model, call.size):
                        self._resend(call)

    def close(self) -> None:
        if self._checking is not None:
            self._checking.cancel()
