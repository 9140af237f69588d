"""Talk to a model: one reply, or an interactive loop with the conversation's history, through
the tokenizer's chat template, the reply streamed as it is generated (`unitune chat`).

In the loop, `/reset` forgets the conversation (the system message stays), `/exit` or end of
input (Ctrl-D) ends it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from unitune.eval.generate import GenerationError, generate

HELP = "/reset: forget the conversation   /exit or Ctrl-D: quit"


def reply(
    model: Any,
    tokenizer: Any,
    messages: list[dict[str, Any]],
    *,
    max_new_tokens: int = 256,
    stream: bool = True,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> str:
    """The model's next message in `messages`; with `stream`, printed to stdout as it comes."""
    if not getattr(tokenizer, "chat_template", None):
        raise GenerationError("chat needs a tokenizer with a chat template; this one has none")
    streamer = None
    if stream:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    (text,) = generate(
        model,
        tokenizer,
        [messages],
        max_new_tokens=max_new_tokens,
        batch_size=1,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        streamer=streamer,
    )
    return text


def chat_loop(
    model: Any,
    tokenizer: Any,
    *,
    system: str | None = None,
    max_new_tokens: int = 256,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = print,
    stream: bool = True,
) -> list[dict[str, Any]]:
    """Read user messages with `read` until `/exit` or EOF, answer each; return the history."""
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    write(HELP)
    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            write("")
            return history
        text = line.strip()
        if text == "/exit":
            return history
        if text == "/reset":
            history = list(start)
            write("(conversation reset)")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        answer = reply(model, tokenizer, history, max_new_tokens=max_new_tokens, stream=stream)
        if not stream:
            write(answer)
        history.append({"role": "assistant", "content": answer})
