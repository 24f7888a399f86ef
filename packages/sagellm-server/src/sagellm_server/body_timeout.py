"""A request body that stops arriving gets 408, instead of holding its connection forever."""

from __future__ import annotations

import asyncio

from starlette.types import Message, Receive

from sagellm_server.openai_protocol import ApiError


def timed_receive(receive: Receive, timeout: float) -> Receive:
    """``receive`` whose every call must complete within ``timeout`` until the body is in;
    then it is passed through untimed (the app waits on it for the client's disconnect)."""
    done = False

    async def receive_within() -> Message:
        nonlocal done
        if done:
            return await receive()
        try:
            msg = await asyncio.wait_for(receive(), timeout)
        except asyncio.TimeoutError:
            raise BodyTimeoutError(timeout) from None
        if msg["type"] != "http.request" or not msg.get("more_body", False):
            done = True
        return msg

    return receive_within


class BodyTimeoutError(ApiError):
    def __init__(self, timeout: float) -> None:
        super().__init__(408, f"the request body did not arrive within {timeout:g} s",
                         code="request_timeout")
