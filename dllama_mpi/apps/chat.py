"""`chat`: an interactive conversation on rank 0, streamed as it is generated.

Each user line becomes a turn; the whole conversation is rendered with the model's chat
template and submitted to the scheduler, which this front end steps itself on the calling
(main) thread. The next turn's prompt is built as the previous turn's prompt tokens + the
answer's tokens + the tokens of the new text after them, so it starts with exactly the tokens
already in the KV cache and the scheduler's prefix cache reuses them (when the template
renders the history differently, e.g. trimming the answer, the whole text is re-encoded).

Commands: /reset (forget the conversation, keep the system prompt), /exit (or end of input),
/help. Ctrl-C during an answer cancels that answer; at the prompt it ends the program.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading

from ..config import SamplingParams
from ..errors import DllamaError
from ..runtime import interrupt

__all__ = ["run_chat", "ChatSession"]

HELP = "commands: /reset (new conversation), /exit (or Ctrl-D), /help; Ctrl-C stops an answer\n"


@contextlib.contextmanager
def _sigint_sets_flag():
    """While inside, SIGINT sets the yielded Event instead of raising KeyboardInterrupt (which
    could land in the middle of an engine step: the ranks would lose step with each other)."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


class ChatSession:
    """The conversation, and the token form of its last rendered prompt + answer."""

    def __init__(self, scheduler, tokenizer, params: SamplingParams, system: str | None = None):
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.params = params
        self.system = system
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self._known_text: str | None = None        # rendered prompt + answer of the last turn
        self._known_tokens: list[int] = []         # ... as the tokens the KV cache holds

    def render(self, messages: list[dict]) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as e:
            raise DllamaError(str(e)) from None

    def prompt_tokens(self, text: str) -> list[int]:
        """`text` (a rendered conversation) as tokens, starting with the last turn's tokens
        when the text starts with what they stand for."""
        known = self._known_text
        if known is not None and text.startswith(known):
            return self._known_tokens + self.tokenizer.encode(text[len(known):], add_bos=False)
        return self.tokenizer.encode(text)

    def ask(self, user_text: str, output) -> object:
        """One turn: the answer streamed to `output`; returns the scheduler's Completion.
        Raises DllamaError (the conversation is then unchanged)."""
        messages = self.messages + [{"role": "user", "content": user_text}]
        text = self.render(messages)
        prompt = self.prompt_tokens(text)
        shown = []

        def on_token(event) -> None:
            if event.text:
                shown.append(event.text)
                output.write(event.text)
                output.flush()

        context = getattr(self.scheduler, "max_seq_len", None)
        if context and len(prompt) >= context:
            raise DllamaError(f"the conversation has {len(prompt)} tokens, the context holds "
                              f"{context}: /reset starts a new one")
        with _sigint_sets_flag() as interrupted:
            handle = self.scheduler.submit(prompt, self.params, on_token=on_token)
            cancelled = False
            while not handle.done():
                if interrupted.is_set() and not cancelled:
                    handle.cancel()
                    cancelled = True
                if not self.scheduler.step():
                    handle.wait(0.01)
            c = handle.wait()
        streamed = "".join(shown)
        rest = c.text[len(streamed):] if c.text.startswith(streamed) else ""
        output.write(rest + "\n")
        if c.finish_reason == "cancelled":
            output.write("[answer cancelled]\n")
        context = getattr(self.scheduler, "max_seq_len", None)
        if c.finish_reason == "length" and context and \
                len(prompt) + len(c.generated_tokens) >= context:
            output.write(f"[the conversation reached the end of the context ({context} tokens):"
                         " /reset starts a new one]\n")
        output.flush()
        if c.finish_reason == "error":
            raise DllamaError(c.error or "generation failed")
        if c.finish_reason == "cancelled" and not c.text:
            return c                               # nothing to keep: the turn is dropped
        self.messages = messages + [{"role": "assistant", "content": c.text}]
        if self.tokenizer.decode(c.generated_tokens) == c.text:
            self._known_text = text + c.text
            self._known_tokens = list(prompt) + list(c.generated_tokens)
        else:                                      # a stop string cut a token: re-encode next time
            self._known_text, self._known_tokens = None, []
        return c


def run_chat(scheduler, tokenizer, params: SamplingParams, system: str | None = None,
             input=sys.stdin, output=sys.stdout) -> int:
    """The chat loop (rank 0, main thread; the scheduler is stepped from here, not run()).
    Errors of one turn are printed as `error: ...` on stderr and the chat goes on.
    Returns 0 at /exit or end of input."""
    session = ChatSession(scheduler, tokenizer, params, system)
    echo = not (hasattr(input, "isatty") and input.isatty())   # piped input: show the turn
    while True:
        output.write("> ")
        output.flush()
        try:
            with interrupt.interruptible():    # waiting for the user: Ctrl-C ends the chat
                line = input.readline()
        except KeyboardInterrupt:
            output.write("\n")
            break
        if not line:
            output.write("\n")
            break
        text = line.rstrip("\r\n")
        if echo:
            output.write(text + "\n")
        command = text.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            session.reset()
            output.write("[conversation cleared]\n")
            continue
        if command == "/help":
            output.write(HELP)
            continue
        try:
            session.ask(text, output)
        except DllamaError as e:
            output.flush()
            print(f"error: {e}", file=sys.stderr, flush=True)
            if "room" in str(e) or "context" in str(e):
                print("(the conversation no longer fits the context: /reset starts a new one)",
                      file=sys.stderr, flush=True)
    output.flush()
    return 0


def run_chat_command(args, run) -> int:
    """`chat`: every rank starts; the root talks with the user on stdin/stdout until /exit
    or end of input, then stops the workers."""
    from ..comm import make_comm
    from ..runtime.startup import ignore_job_signals_on_workers, run_root, scheduler_for, start
    comm = make_comm()
    ignore_job_signals_on_workers(comm)
    session = start(comm, args.model, run, kv_dir=args.kv_cache_dir,
                    tokenizer_path=args.tokenizer)
    params = SamplingParams(temperature=run.temperature, top_p=run.topp, top_k=run.topk,
                            seed=run.seed, max_tokens=args.steps, ignore_eos=False)

    def body(s) -> int:
        s.print_memory()
        return run_chat(scheduler_for(s), s.tokenizer, params, system=args.system)

    return run_root(session, body)
