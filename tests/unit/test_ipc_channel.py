"""MessageChannel: whole messages back exactly, and waiting that does not spin."""

from __future__ import annotations

import pickle
import select
from typing import Any

import pytest

from shared import ipc
from shared.ipc import STOP, MessageChannel


def test_messages_come_back_whole_whatever_their_size() -> None:
    channel = MessageChannel(1 << 20)
    messages = [b"a" * 200_000, b"b" * 10, STOP, b"c" * channel.max_message, b"d"]
    try:
        for message in messages:
            assert channel.send_nowait(message)
            assert channel.peek(1.0) == message  # peeked: still there
            assert channel.receive(1.0) == message
        assert channel.receive(0.0) is None
    finally:
        channel.close()


def test_a_channel_sent_to_a_child_carries_no_receive_buffer() -> None:
    channel = MessageChannel(1 << 20)
    try:
        assert channel.send_nowait(b"x")
        assert channel.receive(1.0) == b"x"
        state = channel.__getstate__()
        assert state["_buffer"] is None
        assert len(pickle.dumps(state["_buffer"])) < 100
    finally:
        channel.close()


class CountingPoll:
    def __init__(self) -> None:
        self.calls = 0
        self.make_poller = select.poll

    def __call__(self) -> Any:
        counter = self
        real = self.make_poller()

        class Poller:
            def register(self, fd: int, event: int) -> None:
                real.register(fd, event)

            def poll(self, timeout: int) -> list[tuple[int, int]]:
                counter.calls += 1
                return real.poll(timeout)

        return Poller()


def test_waiting_on_an_empty_channel_polls_once_rather_than_spinning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counting = CountingPoll()
    monkeypatch.setattr(select, "poll", counting)
    channel = MessageChannel(1 << 16)
    try:
        for _ in range(5):
            assert channel.receive(0.0205) is None
    finally:
        channel.close()
    # One poll per wait (two if a signal cut one short); it used to end each wait with
    # poll(0) in a loop for the last sub-millisecond.
    assert counting.calls <= 10


def test_poll_timeouts_round_up() -> None:
    assert ipc.poll_milliseconds(0.0) == 0
    assert ipc.poll_milliseconds(0.0004) == 1
    assert ipc.poll_milliseconds(0.2) == 200
