"""nanochat-chat: talk to a checkpoint in the terminal.

    nanochat-chat runs/sft/d4/20260101-120000          # a run dir (its last checkpoint)
    nanochat-chat --latest                             # newest completed rl > sft > mid run under --root
    nanochat-chat --latest -p "What is 12*7?"          # one shot: print the answer and exit

Tokens stream as they are sampled (calculator tool calls run inside the Engine and their
output is shown). Type `clear` to start a new conversation, `quit` (or Ctrl-D) to leave.
"""
from __future__ import annotations

import argparse
import codecs
import sys
from pathlib import Path
from typing import Iterator, Optional

CHAT_STAGES = ("rl", "sft", "mid")


def find_latest_chat_run(root: str | Path, stages: tuple[str, ...] = CHAT_STAGES) -> Optional[Path]:
    """Newest completed run of the first stage in `stages` that has one (any tag)."""
    root = Path(root).expanduser()
    done = next((d for s in stages if (d := [p.parent for p in (root / s).glob("*/*/COMPLETED")])), [])
    return max(done, key=lambda p: (p / "COMPLETED").stat().st_mtime, default=None)


class ChatSession:
    """A conversation as a growing list of tokens, answered by the Engine."""

    def __init__(self, model, tokenizer, temperature: float = 0.6, top_k: Optional[int] = 50,
                 max_tokens: int = 256, seed: int = 42):
        from nanochat.engine import Engine
        self.tok = tokenizer
        self.engine = Engine(model, tokenizer)
        self.temperature, self.top_k, self.max_tokens, self.seed = temperature, top_k, max_tokens, seed
        self.clear()

    def clear(self) -> None:
        self.tokens = [self.tok.get_bos_token_id()]
        self.turn = 0

    def reply(self, text: str) -> Iterator[str]:
        """Add a user message; yield the assistant's answer as text pieces while it is sampled."""
        self.tokens += [*self.tok.encode(text, prepend="<|user_start|>", append="<|user_end|>"),
                        self.tok.encode_special("<|assistant_start|>")]
        budget = min(self.max_tokens, self.engine.model.rotary_len - len(self.tokens))
        if budget < 1:
            self.clear()
            yield "[the conversation is longer than the model's context; cleared it, ask again]"
            return
        out: list[int] = []
        # token bytes in, text out: a character split across tokens is shown once it is complete
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for column, _ in self.engine.generate(self.tokens, num_samples=1, max_tokens=budget,
                                              temperature=self.temperature, top_k=self.top_k,
                                              seed=self.seed + self.turn):
            token = column[0]
            if token in (self.engine.assistant_end, self.engine.bos):
                break
            out.append(token)
            yield decoder.decode(self.tok.enc.decode_single_token_bytes(token))
        self.tokens += out + [self.engine.assistant_end]
        self.turn += 1
        yield decoder.decode(b"", final=True)


def load(run_dir: str | Path, device: str = "cpu"):
    """(model, tokenizer, meta) of a run dir's last checkpoint."""
    from nanochat.checkpoint import load_model_from_run
    from nanochat.common import get_base_dir, pick_device
    from nanochat.tokenizer import get_tokenizer
    model, meta = load_model_from_run(run_dir, pick_device(device))
    conf = meta.get("config") or {}
    base = get_base_dir(conf.get("paths", {}).get("base_dir"))
    tokenizer = get_tokenizer(base, conf.get("data", {}).get("tokenizer", "demo"))
    return model, tokenizer, meta


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="nanochat-chat", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="?", help="a run dir with checkpoints (mid, sft or rl)")
    ap.add_argument("--latest", action="store_true", help="newest completed rl > sft > mid run under --root")
    ap.add_argument("--root", default="runs", help="run.root to search with --latest (default: runs)")
    ap.add_argument("-p", "--prompt", help="one-shot: answer this and exit")
    ap.add_argument("-t", "--temperature", type=float, default=0.6)
    ap.add_argument("-k", "--top-k", type=int, default=50)
    ap.add_argument("-m", "--max-tokens", type=int, default=256)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | mps | auto")
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args(argv)
    if args.latest:
        run_dir = find_latest_chat_run(args.root)
        if run_dir is None:
            print(f"nanochat-chat: no completed rl/sft/mid run under {args.root}; run the chat stages first "
                  f"or give a RUN_DIR", file=sys.stderr)
            return 2
    elif args.run_dir:
        run_dir = Path(args.run_dir)
    else:
        ap.error("give a RUN_DIR or --latest")
    try:
        model, tokenizer, meta = load(run_dir, args.device)
    except FileNotFoundError as e:
        print(f"nanochat-chat: {e}", file=sys.stderr)
        return 2
    from nanochat.packed import pack_for_inference
    pack_for_inference(model)   # CPU: oneDNN-prepacked linear layers (a no-op elsewhere)
    session = ChatSession(model, tokenizer, args.temperature, args.top_k, args.max_tokens, args.seed)
    if args.prompt is not None:
        for piece in session.reply(args.prompt):
            print(piece, end="", flush=True)
        print()
        return 0
    print(f"nanochat-chat · {run_dir} ({meta.get('stage')}, step {meta.get('step')}) · "
          f"'clear' starts over, 'quit' exits")
    while True:
        try:
            text = input("\nYou: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if text.lower() in ("quit", "exit"):
            return 0
        if text.lower() == "clear":
            session.clear()
            print("(conversation cleared)")
            continue
        if not text:
            continue
        print("Assistant: ", end="")
        for piece in session.reply(text):
            print(piece, end="", flush=True)
        print()


if __name__ == "__main__":
    sys.exit(main())
