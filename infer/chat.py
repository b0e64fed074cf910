"""Terminal chat with a Medusa model: `python -m infer.chat [--model PATH] [--heads PATH] ...`.

Interactive: type a message, the answer streams as it is accepted, then a line of stats (tokens/s and mean
tokens per decoding step). Ctrl-C during an answer stops it (what was shown stays in the conversation); `/reset`
starts a new conversation, `/exit` (or Ctrl-D, or Ctrl-C at the prompt) quits.
Scripted: `--prompt TEXT` answers once, prints the stats line to stderr, and exits.
"""

from __future__ import annotations

import argparse
import sys

from infer.api import generate
from medusa_jax.errors import MedusaError, cli_errors
from medusa_jax.tree import check_lookup, tree_option


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m infer.chat", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory or file (default: the embedded SmolLM2-135M)")
    p.add_argument("--heads", default=None, help="Medusa heads to use instead of the model's shipped ones")
    p.add_argument("--mode", default=None, choices=["greedy", "typical", "sample", "ar"],
                   help="decoding mode (default: greedy at temperature 0, sample above; ar without heads)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    p.add_argument("--tree", default=None,
                   help="draft tree: a name (mc_sim_7b_63), chain:N, dense:7,6, or JSON paths [[0],[0,0]]")
    p.add_argument("--lookup", type=int, default=None,
                   help="draft tokens per step copied from the context, verified with the tree (0 = none; "
                        "default: the model's tuned tree.json)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (default 256)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--prompt", default=None, help="answer this one message and exit (no interaction)")
    return p.parse_args(argv)


def _check_args(args: argparse.Namespace) -> None:
    """Flag errors, before the (slow) model load."""
    if not args.temperature >= 0:
        raise MedusaError(f"--temperature {args.temperature} must be >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
        raise MedusaError(f"--top-p {args.top_p} must be in (0, 1]")
    if args.max_new_tokens < 1:
        raise MedusaError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.mode == "greedy" and args.temperature != 0:
        raise MedusaError(f"--mode greedy is for --temperature 0, got {args.temperature}; use --mode sample or typical")
    if args.lookup is not None:
        check_lookup(args.lookup, "--lookup")
    args.tree = tree_option(args.tree)  # parsed once, before the model loads


def _stats_line(stats: dict) -> str:
    return (f"[{stats['new_tokens']} tokens in {stats['wall_s']:.2f} s: {stats['tokens_per_s']:.1f} tokens/s, "
            f"{stats['mean_accepted']:.2f} tokens/step over {stats['steps']} steps]")


def _answer(params, messages, args, seed: int, shown: list[str] | None = None) -> tuple[str, dict]:
    """Streams the answer to stdout (and into `shown`, so that an interrupted answer's text is known)."""
    shown = [] if shown is None else shown

    def show(piece: str) -> None:
        shown.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()

    text, stats = generate(params, messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_p=args.top_p, mode=args.mode, tree=args.tree, seed=seed, stream=show,
                           return_stats=True, lookup=args.lookup)
    sys.stdout.write("\n")
    return text, stats


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    with cli_errors():
        _check_args(args)
        from medusa_jax import load  # after argument parsing, so --help is fast

        params = load(args.model, heads=args.heads)
        if args.prompt is not None:
            _, stats = _answer(params, args.prompt, args, args.seed)
            print(_stats_line(stats), file=sys.stderr)
            return
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print(f"medusa-jax chat: {params.source or 'model'}; /reset clears the conversation, Ctrl-C stops an "
              "answer, /exit quits.")
        messages: list[dict] = []
        turn = 0
        while True:
            try:
                line = input("> ").strip()
            except EOFError:
                print()
                return
            if line in ("/exit", "/quit"):
                return
            if line == "/reset":
                messages = []
                print("(new conversation)")
                continue
            if not line:
                continue
            messages.append({"role": "user", "content": line})
            shown: list[str] = []
            try:
                text, stats = _answer(params, messages, args, args.seed + turn, shown)
            except MedusaError as e:  # e.g. the conversation outgrew the context: report it and keep chatting
                messages.pop()
                print(f"error: {e}", file=sys.stderr)
                continue
            except KeyboardInterrupt:  # stops this answer (streaming returns to Python after every segment)
                print(" [stopped]")
                if shown:
                    messages.append({"role": "assistant", "content": "".join(shown)})
                    turn += 1
                else:
                    messages.pop()
                continue
            messages.append({"role": "assistant", "content": text})
            turn += 1
            print(_stats_line(stats))


if __name__ == "__main__":
    main()
