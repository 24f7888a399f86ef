"""``sagellm chat``: an interactive conversation whose replies stream token by token.

``LLM.chat`` returns only finished outputs, so the loop drives the engine itself: it adds the
templated conversation as one request and prints each step's ``new_text`` as it arrives.
Ctrl-C during a reply stops that reply (the request is aborted) and keeps the conversation.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from sagellm.llm import LLM
    from sagellm.sampling_params import SamplingParams

BANNER = "sagellm chat: type a message, /reset to clear, Ctrl-D to quit."


def stream_reply(llm: LLM, messages: list[dict[str, str]], params: SamplingParams,
                 out: TextIO) -> str:
    """Generate the assistant's next message, writing each new piece of text as it is decoded."""
    engine = llm.engine
    request_id = engine.add_request(llm.apply_chat_template(messages), params)
    try:
        while True:
            for step_out in engine.step():
                if step_out.request_id != request_id:
                    continue
                if step_out.new_text:
                    out.write(step_out.new_text)
                    out.flush()
                if step_out.finished:
                    out.write("\n")
                    out.flush()
                    return step_out.text
    except BaseException:
        engine.abort_request(request_id)
        out.write("\n")
        raise


def run_chat(llm: LLM, params: SamplingParams, system: str | None = None) -> int:
    head: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    history = list(head)
    print(BANNER, file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        if line.strip() == "/reset":
            history = list(head)
            continue
        history.append({"role": "user", "content": line})
        try:
            reply = stream_reply(llm, history, params, sys.stdout)
        except KeyboardInterrupt:
            print("(reply stopped)", file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})
