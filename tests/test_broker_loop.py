"""The serving loops' drain: a handler that fails on one message does not stop the loop."""

from __future__ import annotations

import logging

import zmq

from cecollm.broker.loop import drain


def test_a_failing_handler_is_logged_and_the_rest_are_served(caplog):
    context = zmq.Context.instance()
    pull, push = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    for sock in (pull, push):
        sock.setsockopt(zmq.LINGER, 0)
    pull.bind("inproc://test-drain")
    push.connect("inproc://test-drain")
    try:
        for word in (b"a", b"boom", b"c"):
            push.send(word)
        seen = []

        def handler(frames):
            if frames[0].bytes == b"boom":
                raise KeyError("a bug")
            seen.append(frames[0].bytes)

        assert pull.poll(10_000)
        with caplog.at_level(logging.ERROR):
            failed = drain(pull, handler, logging.getLogger("test"))
        assert failed == 1 and seen == [b"a", b"c"]
        assert "could not be handled" in caplog.text and "KeyError" in caplog.text
    finally:
        pull.close(0)
        push.close(0)
