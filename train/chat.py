"""Chat with a trained model in the terminal, or answer one prompt for a script.

    python -m train.chat --model outputs/demo/demo_stage3/final                       # interactive, multi-turn
    python -m train.chat --model DIR --image a.jpg --prompt "Where is the cat?" --draw out.png
    python -m train.chat --model DIR --raw --prompt "<img>a.jpg</img><ref>the cat</ref><box>"   # stage-2 template

Interactive: each line is one user turn (ChatML, official format); `--image` files are shown with the first turn,
`<img>path</img>` in a line adds an image there, `:image PATH` queues one for the next turn, `:clear` forgets the
conversation, `:quit` (or Ctrl-D) leaves. Replies stream as they are generated. Boxes and quads in a reply are
listed with their pixel coordinates in the image they refer to and, with `--draw out.png`, drawn on it
(interactive turns write out_1.png, out_2.png, ...). `--json` prints one JSON object per reply instead (for scripts).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from data.samples import DEFAULT_SYSTEM


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m train.chat", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="official-layout dir, run checkpoint step dir, or run dir")
    ap.add_argument("--image", action="append", default=[], help="image shown with the (first) prompt; repeatable")
    ap.add_argument("--prompt", help="answer this one prompt and exit (otherwise: interactive)")
    ap.add_argument("--raw", action="store_true", help="--prompt is a raw completion prompt, not a ChatML turn")
    ap.add_argument("--system", default=DEFAULT_SYSTEM, help="ChatML system prompt (default: %(default)r)")
    ap.add_argument("--draw", help="draw the reply's boxes on the image and save here (e.g. out.png)")
    ap.add_argument("--json", action="store_true", help="print each reply as one JSON line (text, boxes, ...)")
    ap.add_argument("--no-stream", action="store_true", help="print replies only when complete")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                    help="default: bf16 on GPU, fp32 on CPU")
    g = ap.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=512)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    return ap


def _gen_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    return dict(max_new_tokens=a.max_new_tokens, do_sample=a.sample, temperature=a.temperature, top_p=a.top_p,
                top_k=a.top_k, repetition_penalty=a.repetition_penalty, seed=a.seed)


def reply_record(r: Any) -> dict[str, Any]:
    return {"text": r.text, "finish_reason": r.finish_reason, "image": r.image_name,
            "boxes": [{"label": b.label, "kind": b.kind, "grid": list(b.grid),
                       "pixels": [round(v, 2) for v in b.pixels] if b.pixels is not None else None}
                      for b in r.boxes]}


def _report(r: Any, a: argparse.Namespace, out: TextIO, draw_to: str | None) -> None:
    if a.json:
        print(json.dumps(reply_record(r), ensure_ascii=False), file=out, flush=True)
    elif a.no_stream:
        print(r.text, file=out, flush=True)
    else:
        print(file=out, flush=True)  # end the streamed line
    if not a.json:
        for b in r.boxes:
            where = "" if b.pixels is None else " -> " + ", ".join(f"{v:.1f}" for v in b.pixels) + f" px in {b.image}"
            print(f"[{b.kind}] {b.label or '-'}: {b.grid}{where}", file=sys.stderr, flush=True)
    if draw_to is not None:
        if r.image is None:
            print("--draw: the conversation has no image to draw on", file=sys.stderr)
        else:
            r.draw(draw_to)
            print(f"[drawn] {len(r.boxes)} box(es) on {r.image_name} -> {draw_to}", file=sys.stderr, flush=True)


def _numbered(path: str | None, n: int) -> str | None:
    if path is None:
        return None
    p = Path(path)
    return str(p.with_name(f"{p.stem}_{n}{p.suffix or '.png'}"))


def main(argv: list[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    a = build_parser().parse_args(argv)
    out = stdout or sys.stdout
    stdin = stdin or sys.stdin
    from train.infer import load

    try:
        vm = load(a.model, device=a.device, dtype=a.dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gen = _gen_kwargs(a)

    def stream(piece: str) -> None:
        out.write(piece)
        out.flush()

    streamer = None if (a.no_stream or a.json) else stream
    if a.prompt is not None:
        if a.raw:
            r = vm.complete(a.prompt, images=a.image, stream=streamer, **gen)
        else:
            r = vm.chat(a.prompt, images=a.image, system=a.system, stream=streamer, **gen)
        _report(r, a, out, a.draw)
        return 0

    history: list[tuple[str, str]] = []
    pending = list(a.image)
    turn = 0
    interactive = stdin.isatty()
    if interactive:
        print(f"[chat] {vm.source.path if vm.source else a.model}; :image PATH, :clear, :quit", file=sys.stderr)
    while True:
        if interactive:
            print("user> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in (":quit", ":q", ":exit"):
            break
        if cmd == ":clear":
            history, pending = [], []
            print("[history cleared]", file=sys.stderr)
            continue
        if cmd.startswith(":image "):
            pending.append(cmd[len(":image "):].strip())
            continue
        turn += 1
        if interactive and streamer is not None:
            print("assistant> ", end="", file=sys.stderr, flush=True)
        try:
            r = vm.chat(line, images=pending, history=history, system=a.system, stream=streamer, **gen)
        except (FileNotFoundError, ValueError) as e:  # a bad image path: report, keep the conversation
            print(f"error: {e}", file=sys.stderr)
            pending = []
            continue
        pending = []
        history = r.history
        _report(r, a, out, _numbered(a.draw, turn))
    return 0


if __name__ == "__main__":
    sys.exit(main())
