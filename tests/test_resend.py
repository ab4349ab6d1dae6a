"""The pieces that hide a stub's death from clients, each on its own: which calls a stub holds (its holding
file), which models a death concerns, how fast the watchdog hears of it, and how the guard's calls are sent
again. The whole, a stub SIGKILLed under load with no call failing, is in test_stub_recovery."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List

import grpc
import pytest

from vocos_triton.launcher import resend
from vocos_triton.launcher.resend import MAX_COPIES, Pace, Resender, stub_died
from vocos_triton.launcher.watchdog import ExitWaiter, ensemble_users
from vocos_triton.serving.holding import Holding, held_calls


def test_a_stub_notes_the_calls_of_the_batch_it_runs(tmp_path):
    holding = Holding(str(tmp_path))
    assert holding.path == tmp_path / str(os.getpid())
    holding.hold([12, 7, 30])
    assert held_calls(tmp_path, os.getpid(), remove=False) == [12, 7, 30]
    holding.hold([5])  # the next batch replaces the last one's
    assert held_calls(tmp_path, os.getpid(), remove=False) == [5]
    holding.release()
    assert held_calls(tmp_path, os.getpid(), remove=False) == []
    holding.hold([9])
    assert held_calls(tmp_path, os.getpid()) == [9]  # the watchdog's read removes the file
    assert not holding.path.exists()
    assert held_calls(tmp_path, 999999) == []
    Holding("").hold([1])  # no folder: nothing written, nothing raised


def test_a_death_concerns_the_model_and_every_ensemble_that_runs_it():
    configs = [{"name": "vocos_mel"}, {"name": "mel_features"},
               {"name": "resynthesize_mel", "platform": "ensemble",
                "ensemble_scheduling": {"step": [{"model_name": "mel_features"}, {"model_name": "vocos_mel"}]}},
               {"name": "outer", "platform": "ensemble",
                "ensemble_scheduling": {"step": [{"model_name": "resynthesize_mel"}]}}]
    users = ensemble_users(configs)
    assert users["vocos_mel"] == {"resynthesize_mel", "outer"}
    assert users["resynthesize_mel"] == {"outer"}
    assert "outer" not in users


def test_the_watchdog_hears_of_a_death_at_once():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    waiter = ExitWaiter()
    try:
        waiter.watch([sleeper.pid])
        started = time.monotonic()
        waiter.wait(0.05)  # nothing happens: the timeout
        assert time.monotonic() - started >= 0.04
        os.kill(sleeper.pid, signal.SIGKILL)
        started = time.monotonic()
        waiter.wait(10.0)
        assert time.monotonic() - started < 5.0  # woken by the exit, not the 10 s timeout
        waiter.watch([])
        started = time.monotonic()
        waiter.wake()
        waiter.wait(10.0)
        assert time.monotonic() - started < 5.0  # stop() wakes it
    finally:
        sleeper.kill()
        sleeper.wait()
        waiter.close()


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


#: what tritonserver 2.51 answers for a batch whose instance's stub died (vocos_mel_0_0, inside an ensemble)
DEAD = ("in ensemble 'resynthesize_mel', Failed to process the request(s) for model instance 'vocos_mel_0_0', "
        "message: Stub process 'vocos_mel_0_0' is not healthy.")


def test_the_words_of_a_dead_stub_are_told_apart_from_other_errors():
    assert stub_died(_rpc_error(grpc.StatusCode.INTERNAL, DEAD))
    assert stub_died(_rpc_error(grpc.StatusCode.INTERNAL, "Failed to obtain the health mutex."))
    assert not stub_died(_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "mel: expected 100 bins"))
    assert not stub_died(_rpc_error(grpc.StatusCode.INTERNAL, "vocos_mel: RuntimeError: out of memory"))
    assert not stub_died(ValueError("is not healthy"))


def test_a_calls_expected_time_follows_its_model_and_its_size():
    pace = Pace()
    assert pace.hedge_after("m", 1000) == resend.HEDGE_FLOOR_S  # nothing measured yet
    pace.record("m", 1000, 1.0)
    assert pace.hedge_after("m", 1000) == pytest.approx(resend.HEDGE_FACTOR * 1.0)
    assert pace.hedge_after("m", 4000) == pytest.approx(resend.HEDGE_FACTOR * 4.0)  # 4x the audio
    assert pace.hedge_after("m", 10) == resend.HEDGE_FLOOR_S
    assert pace.hedge_after("other", 1000) == resend.HEDGE_FLOOR_S


class Upstream:
    """Stands in for tritonserver's answers to each copy, which the test gives in the order it chooses."""

    def __init__(self) -> None:
        self.copies: List[asyncio.Future] = []

    async def send(self, number: int) -> bytes:
        answer = asyncio.get_running_loop().create_future()
        self.copies.append(answer)
        return await answer


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def _run(coroutine) -> None:
    asyncio.run(coroutine)


def test_the_calls_a_dead_stub_held_are_sent_again_and_the_first_answer_wins():
    async def scenario() -> None:
        resender = Resender()
        upstreams: Dict[int, Upstream] = {n: Upstream() for n in range(1, 4)}
        calls = [resender.start("resynthesize_mel", n, 100, upstreams[n].send, None) for n in range(1, 4)]
        await _settle()
        assert [len(u.copies) for u in upstreams.values()] == [1, 1, 1]
        resender.repair_started(["vocos_mel", "resynthesize_mel"], held=[2, 99])  # 99: answered already
        await _settle()
        assert [len(u.copies) for u in upstreams.values()] == [1, 2, 1]  # only call 2 again
        upstreams[2].copies[1].set_result(b"from the live instance")
        await _settle()
        assert calls[1].answer.result() == b"from the live instance" and calls[1].answered_by == 1
        upstreams[2].copies[0].set_exception(_rpc_error(grpc.StatusCode.INTERNAL, DEAD))  # a second later
        await _settle()
        assert calls[1].answer.result() == b"from the live instance"
        resender.repair_ended(["vocos_mel", "resynthesize_mel"])
        for n in (1, 3):
            upstreams[n].copies[0].set_result(b"ok")
        await _settle()
        assert resender.resent == 1 and resender.rescued == 1 and not resender.by_number
        resender.close()

    _run(scenario())


def test_without_holding_files_every_call_in_flight_to_the_models_concerned_goes_again():
    async def scenario() -> None:
        resender = Resender()
        upstream = Upstream()
        resender.start("resynthesize_mel", 1, 100, upstream.send, None)
        resender.start("vocos_encodec", 2, 100, upstream.send, None)
        resender.repair_started(["vocos_mel", "resynthesize_mel"], held=None)
        await _settle()
        assert len(upstream.copies) == 3  # the encodec call is not concerned
        resender.repair_ended(["vocos_mel", "resynthesize_mel"])
        for copy in upstream.copies:
            copy.set_result(b"ok")
        resender.close()

    _run(scenario())


def test_a_copy_failing_on_a_dead_stub_is_sent_again_until_the_copies_run_out():
    async def scenario() -> None:
        resender = Resender()
        upstream = Upstream()
        call = resender.start("vocos_mel", 1, 100, upstream.send, None)
        for attempt in range(MAX_COPIES):
            await _settle()
            assert len(upstream.copies) == attempt + 1
            upstream.copies[-1].set_exception(_rpc_error(grpc.StatusCode.INTERNAL, DEAD))
        await _settle()
        assert len(upstream.copies) == MAX_COPIES and isinstance(call.answer.exception(), grpc.aio.AioRpcError)
        # any other error is the client's answer at once
        other = resender.start("vocos_mel", 2, 100, upstream.send, None)
        await _settle()
        upstream.copies[-1].set_exception(_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "mel: bad"))
        await _settle()
        assert other.answer.exception().code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(upstream.copies) == MAX_COPIES + 1
        resender.close()

    _run(scenario())


def test_a_call_overdue_during_a_repair_goes_again_but_not_past_its_deadline(monkeypatch):
    monkeypatch.setattr(resend, "HEDGE_FLOOR_S", 0.05)
    monkeypatch.setattr(resend, "CHECK_EVERY_S", 0.01)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        resender = Resender()
        upstream = Upstream()
        slow = resender.start("vocos_mel", 1, 100, upstream.send, None)
        late = resender.start("vocos_mel", 2, 100, upstream.send, loop.time() + 0.03)  # deadline first
        outside = resender.start("vocos_encodec", 3, 100, upstream.send, None)
        resender.repair_started(["vocos_mel"], held=[])
        await asyncio.sleep(0.2)
        copies = {call.number: len(call.copies) for call in (slow, late, outside)}
        assert copies[1] >= 2 and copies[2] == 1 and copies[3] == 1, copies
        resender.repair_ended(["vocos_mel"])
        await asyncio.sleep(0.1)
        settled = len(slow.copies)
        await asyncio.sleep(0.1)
        assert len(slow.copies) == settled <= MAX_COPIES  # nothing more once the repair has ended
        for copy in upstream.copies:
            if not copy.done():
                copy.set_result(b"ok")
        resender.close()

    _run(scenario())


def test_no_call_is_overdue_while_the_dead_instance_still_waits_for_the_batch_it_held(monkeypatch):
    """tritonserver's thread of the dead instance takes nothing before the batch the stub held has failed (a
    second or two): copies of calls that are merely slow before that would only load the survivor."""
    monkeypatch.setattr(resend, "HEDGE_FLOOR_S", 0.05)
    monkeypatch.setattr(resend, "CHECK_EVERY_S", 0.01)

    async def scenario() -> None:
        resender = Resender()
        upstreams = {n: Upstream() for n in (1, 2)}
        held = resender.start("resynthesize_mel", 1, 100, upstreams[1].send, None)
        queued = resender.start("resynthesize_mel", 2, 100, upstreams[2].send, None)
        resender.repair_started(["vocos_mel", "resynthesize_mel"], held=[1])
        await _settle()
        assert (len(upstreams[1].copies), len(upstreams[2].copies)) == (2, 1)  # the held call went again at once
        assert not resender.may_be_taken_by_the_dead("resynthesize_mel")
        upstreams[1].copies[1].set_result(b"from the live instance")
        await asyncio.sleep(0.2)  # four times the floor: overdue, but nothing can have taken it
        assert len(upstreams[2].copies) == 1 and held.answer.result() == b"from the live instance"
        upstreams[1].copies[0].set_exception(_rpc_error(grpc.StatusCode.INTERNAL, DEAD))  # the held batch fails
        await asyncio.sleep(0.1)
        assert resender.may_be_taken_by_the_dead("vocos_mel") and len(upstreams[2].copies) >= 2  # now it may
        resender.repair_ended(["vocos_mel", "resynthesize_mel"])
        assert not resender.may_be_taken_by_the_dead("vocos_mel") and not resender.holding_back
        for copy in upstreams[2].copies:
            copy.set_result(b"ok")
        await _settle()
        assert queued.answer.result() == b"ok"
        resender.close()

    _run(scenario())


def test_a_dead_instance_that_held_none_of_the_calls_in_flight_may_take_them_at_once():
    async def scenario() -> None:
        resender = Resender()
        upstream = Upstream()
        resender.start("vocos_mel", 1, 100, upstream.send, None)
        for held in ([], [99], None):  # idle, a batch already answered, unknown
            resender.repair_started(["vocos_mel"], held=held)
            assert resender.may_be_taken_by_the_dead("vocos_mel"), held
            resender.repair_ended(["vocos_mel"])
        for copy in upstream.copies:
            copy.set_result(b"ok")
        await _settle()
        resender.close()

    _run(scenario())


def test_no_copy_goes_for_a_client_that_has_gone():
    async def scenario() -> None:
        resender = Resender()
        upstream = Upstream()
        call = resender.start("vocos_mel", 1, 100, upstream.send, None)
        call.answer.cancel()  # what the guard does when the client cancels
        resender.forget(call)
        resender.repair_started(["vocos_mel"], held=[1])
        await _settle()
        upstream.copies[0].set_exception(_rpc_error(grpc.StatusCode.INTERNAL, DEAD))
        await _settle()
        assert len(upstream.copies) == 1
        resender.repair_ended(["vocos_mel"])
        resender.close()

    _run(scenario())
