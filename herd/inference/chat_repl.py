"""``herd chat``: a terminal conversation with history, a system prompt, streaming output.

Commands: ``/reset`` forgets the conversation (keeps the system prompt), ``/system TEXT`` sets the system prompt and
resets, ``/exit`` (or end of input) quits. When the dialog outgrows the context, the oldest turns are dropped.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from typing import TextIO

from herd.inference.generate import stream
from herd.inference.sampling import SamplingParams
from herd.model.transformer import Transformer
from herd.tokenizer.chat import ChatFormat, Message
from herd.tokenizer.tokenizer import Tokenizer


def chat_repl(model: Transformer, tokenizer: Tokenizer, params: SamplingParams, system: str | None = None,
              read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> list[Message]:
    """Run the REPL until /exit or end of input; return the final conversation."""
    chat = ChatFormat(tokenizer)
    history: list[Message] = []
    while True:
        try:
            line = read(">>> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return _dialog(system, history)
        command = line.strip()
        if command in ("/exit", "/quit"):
            return _dialog(system, history)
        if command == "/reset" or command.startswith("/system"):
            if command.startswith("/system"):
                system = command[len("/system"):].strip() or None
            history = []
            out.write("(conversation reset)\n")
            continue
        if not command:
            continue
        history.append({"role": "user", "content": line})
        prompt = chat.encode_dialog_prompt(_dialog(system, history))
        while len(prompt) >= model.args.max_seq_len and len(history) > 1:  # drop the oldest exchange
            history = history[2:] if len(history) > 2 else history[1:]
            prompt = chat.encode_dialog_prompt(_dialog(system, history))
        room = model.args.max_seq_len - len(prompt)
        if room <= 0:
            out.write("(message too long for the context)\n")
            history.pop()
            continue
        reply = []
        for piece in stream(model, tokenizer, prompt, replace(params, max_new_tokens=min(params.max_new_tokens, room))):
            out.write(piece)
            out.flush()
            reply.append(piece)
        out.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def _dialog(system: str | None, history: list[Message]) -> list[Message]:
    return ([{"role": "system", "content": system}] if system else []) + history
