"""`tune chat MODEL_DIR [--adapter DIR] [--prompt TEXT] [--system TEXT] [sampling options]`.

With `--prompt`, one answer and exit; without it, a conversation read from stdin a line at a
time (`exit`, `quit` or end of input ends it). Each turn renders the whole history with the
model's chat template and streams the answer as it is generated; when the history outgrows the
model's context, the oldest exchanges are dropped. Self-contained: `add_parser` registers the
command on the `tune` subparsers; `run` is its handler (heavy imports happen inside it).
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_WORDS = ("exit", "quit")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "chat", help="chat with a model (and a LoRA adapter) in the terminal",
        description="Talk to the model in MODEL_DIR (a Hugging Face directory) through its chat "
        "template, answers streamed as they are generated. With --prompt: one answer, then exit; "
        "without: one user turn per line of input, history kept, `exit` or end of input ends.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face model directory")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="PEFT-format LoRA adapter for this model, merged into the weights")
    p.add_argument("--prompt", default=None, metavar="TEXT",
                   help="answer this one message and exit")
    p.add_argument("--system", default=None, metavar="TEXT", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="most tokens per answer (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature; 0 is greedy (default: 0)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="sample among the K most likely tokens")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="seed for sampling")
    p.add_argument("--device", default="auto", metavar="D",
                   help="cpu, cuda, cuda:1, ... (default: auto, the GPU if there is one)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="weights dtype (default: bf16 on a GPU, fp32 on the CPU)")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    # Bad input raises ValueError/OSError; `tune`'s main turns it into one `error:` line.
    session = _load(args)
    if args.prompt is not None:
        session.answer(args.prompt)
        return 0
    return _loop(session)


def _load(args: argparse.Namespace) -> "_Session":
    from tunewright.training.generation import check_sampling

    check_sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.adapter is not None and not os.path.isdir(args.adapter):
        raise FileNotFoundError(f"adapter directory not found: {args.adapter}")

    from tunewright.data.tokenizer import load_tokenizer
    from tunewright.models import load_pretrained
    from tunewright.training.generation import merge_adapter
    from tunewright.training.setup import setup_device

    device = setup_device(args.device, None)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    model = load_pretrained(args.model_dir, dtype=dtype, device=device)
    if args.adapter is not None:
        merge_adapter(model, args.adapter)
    tokenizer = load_tokenizer(args.model_dir)
    if getattr(tokenizer, "chat_format", None) is None:
        raise ValueError(f"{args.model_dir}: the tokenizer has no chat template, so there is "
                         "no chat format to talk in (use `tune run generate` with chat=false)")
    return _Session(model, tokenizer, args)


class _Session:
    """The model, the tokenizer and the conversation so far."""

    def __init__(self, model, tokenizer, args: argparse.Namespace) -> None:
        self.model, self.tokenizer, self.args = model, tokenizer, args
        self.system = [{"role": "system", "content": args.system}] if args.system else []
        self.history: list[dict[str, str]] = []
        self.context = getattr(getattr(model, "args", None), "max_seq_len", None)

    def answer(self, text: str) -> str:
        """Generate the reply to `text`, streamed to stdout, and add the exchange to history."""
        from tunewright.training.generation import TokenStream, generate, strip_stop

        a, tok = self.args, self.tokenizer
        self.history.append({"role": "user", "content": text})
        prompt_ids = self._prompt_ids()
        max_new = a.max_new_tokens
        if self.context is not None:
            max_new = min(max_new, self.context - len(prompt_ids))
        stream = TokenStream(tok)
        [ids] = generate(
            self.model, prompt_ids, max_new_tokens=max_new, temperature=a.temperature,
            top_k=a.top_k, top_p=a.top_p, stop_ids=tok.stop_ids, seed=a.seed, pad_id=tok.pad_id,
            vocab_size=tok.vocab_size, on_token=stream,
        )
        stream.finish()
        print(flush=True)
        reply = tok.decode(strip_stop(ids, tok.stop_ids), skip_special=True)
        self.history.append({"role": "assistant", "content": reply})
        return reply

    def _prompt_ids(self) -> list[int]:
        """The conversation as ids, oldest exchanges dropped until an answer has room."""
        room = min(self.args.max_new_tokens, 64)  # at least this much space for the reply
        while True:
            ids, _ = self.tokenizer.tokenize_messages(self.system + self.history,
                                                      add_generation_prompt=True)
            if self.context is None or len(ids) + room <= self.context:
                return ids
            if len(self.history) <= 1:
                self.history = []
                raise ValueError(f"the message is {len(ids)} tokens with the template, too long "
                                 f"for the model's context of {self.context}")
            self.history = self.history[2:]  # the oldest user turn and its answer
            print("(the conversation outgrew the model's context: dropped the oldest exchange)",
                  file=sys.stderr)


def _loop(session: _Session) -> int:
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {session.args.model_dir}; `exit` or Ctrl-D ends, Ctrl-C stops an "
              "answer.", file=sys.stderr)
    while True:
        if interactive:
            try:
                line = input(">>> ")
            except EOFError:
                print(file=sys.stderr)
                return 0
        else:
            line = sys.stdin.readline()
            if not line:  # end of input (an empty line reads as "\n")
                return 0
        text = line.strip()
        if text in EXIT_WORDS:
            return 0
        if not text:
            continue
        try:
            session.answer(text)
        except KeyboardInterrupt:  # stop this answer, keep the conversation before it
            session.history = session.history[:-1] if session.history[-1]["role"] == "user" \
                else session.history
            print("\n(answer interrupted)", file=sys.stderr)
        except ValueError as e:  # a message too long for the context: say so, keep chatting
            if os.environ.get("TUNEWRIGHT_DEBUG"):
                raise
            print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
