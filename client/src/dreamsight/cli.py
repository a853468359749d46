"""The ``dreamsight`` command line.

    dreamsight up                                   # gateway + vision + diffusion, demo key
    dreamsight chat --image cat.png "What is this?" # one shot, streamed
    dreamsight chat                                 # interactive, like `ollama run`
    dreamsight generate "a red circle" --out out/
    dreamsight train --images a.jpg b.jpg c.jpg --instance-prompt "a photo of sks dog" \\
        --class-prompt "a photo of a dog"
    dreamsight jobs | watch JOB | cancel JOB | models | usage
    dreamsight keys create TENANT TIER | keys list | keys revoke KEY_ID   (admin token)

Target and key come from --host/--api-key or DREAMSIGHT_HOST/DREAMSIGHT_API_KEY.
``--json`` prints machine-readable output. Progress bars use rich when it is
installed (``pip install 'dreamsight[cli]'``) and plain lines otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from dreamsight._client import Client
from dreamsight._errors import DreamsightError
from dreamsight._types import ChatChunk, GenerateProgress, GenerateResult, Message, Options


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _jsonable(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.name not in ("raw", "png", "image_png")
        }
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


class Output:
    """People get rich tables and bars (when available); scripts get JSON lines."""

    def __init__(self, as_json: bool) -> None:
        self.json = as_json
        try:
            from rich.console import Console

            self.console: Any = Console(stderr=False)
        except ImportError:
            self.console = None

    def emit(self, value: Any) -> None:
        """One result: a JSON line, or a readable rendering."""
        if self.json:
            print(json.dumps(_jsonable(value)), flush=True)
        elif self.console is not None:
            self.console.print(_jsonable(value))
        else:
            print(_jsonable(value), flush=True)

    def table(
        self,
        title: str,
        rows: Sequence[Any],
        columns: Sequence[str],
        formats: Mapping[str, Callable[[Any], str]] | None = None,
    ) -> None:
        """Rows of dataclasses as a table; ``formats`` renders some columns for people."""
        if self.json:
            print(json.dumps([_jsonable(r) for r in rows]), flush=True)
            return
        shown = formats or {}
        data = [
            [shown.get(c, lambda v: str(_jsonable(v)))(getattr(r, c)) for c in columns]
            for r in rows
        ]
        if self.console is not None:
            from rich.table import Table

            table = Table(title=title)
            for column in columns:
                table.add_column(column)
            for row in data:
                table.add_row(*row)
            self.console.print(table)
        else:
            print(title)
            for row in [list(columns), *data]:
                print("  ".join(row))

    def progress(self, description: str, total: int) -> Any:
        """A progress bar (rich) or a plain counter on stderr."""
        return _Bar(description, total, self.console if not self.json else None)


class _Bar:
    def __init__(self, description: str, total: int, console: Any) -> None:
        self._description = description
        self._total = total
        self._progress: Any = None
        self._task: Any = None
        if console is not None:
            from rich.progress import Progress

            self._progress = Progress(console=console, transient=False)
            self._task = self._progress.add_task(description, total=total)
            self._progress.start()

    def update(self, done: int, total: int | None = None, note: str = "") -> None:
        if total:
            self._total = total
        if self._progress is not None:
            self._progress.update(
                self._task, completed=done, total=self._total, description=self._description + note
            )
        else:
            print(f"{self._description}: {done}/{self._total}{note}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def _client(args: argparse.Namespace) -> Client:
    return Client(args.host, api_key=args.api_key)


def _stream_reply(chunks: Iterator[ChatChunk], out: Output) -> str:
    text = ""
    for chunk in chunks:  # to the end, so the call completes rather than being cancelled
        if chunk.done and chunk.response is not None:
            if out.json:
                out.emit(chunk.response)
            else:
                print(flush=True)
            text = chunk.response.text
            continue
        text += chunk.text
        if not out.json:
            print(chunk.text, end="", flush=True)
    return text


def cmd_chat(args: argparse.Namespace, out: Output) -> int:
    options: Options = {}
    if args.temperature is not None:
        options["temperature"] = args.temperature
    if args.max_tokens is not None:
        options["max_tokens"] = args.max_tokens
    if args.seed is not None:
        options["seed"] = args.seed
    if args.format:
        options["format"] = "json" if args.format == "json" else json.loads(args.format)
    history: list[Message] = []
    if args.system:
        history.append(Message("system", args.system))
    with _client(args) as client:
        if args.prompt:
            history.append(Message("user", " ".join(args.prompt), tuple(args.image or ())))
            chunks = client.chat(args.model, history, options=options, stream=True)
            _stream_reply(chunks, out)
            return 0
        return _interactive(client, args, history, options, out)


def _interactive(
    client: Client,
    args: argparse.Namespace,
    history: list[Message],
    options: Options,
    out: Output,
) -> int:
    """A REPL like `ollama run`: /image PATH attaches, /clear forgets, /bye leaves."""
    pending: list[str] = list(args.image or ())
    print("Send a message (/image PATH to attach, /clear, /bye to quit)", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/bye", "/exit", "/quit"):
            return 0
        if line == "/clear":
            history = [m for m in history if m.role == "system"]
            print("cleared", file=sys.stderr)
            continue
        if line.startswith("/image "):
            path = line.split(" ", 1)[1].strip()
            if not Path(path).is_file():
                print(f"no such file: {path}", file=sys.stderr)
                continue
            pending.append(path)
            print(f"attached {path}", file=sys.stderr)
            continue
        history.append(Message("user", line, tuple(pending)))
        pending = []
        try:
            chunks = client.chat(args.model, history, options=options, stream=True)
            reply = _stream_reply(chunks, out)
        except DreamsightError as error:
            history.pop()
            print(f"error: {error}", file=sys.stderr)
            continue
        history.append(Message("assistant", reply))


def cmd_generate(args: argparse.Namespace, out: Output) -> int:
    target = Path(args.out)
    target.mkdir(parents=True, exist_ok=True)
    bar = None
    with _client(args) as client:
        events = client.generate_image(
            " ".join(args.prompt),
            model=args.model,
            negative_prompt=args.negative_prompt,
            width=args.width,
            height=args.height,
            steps=args.steps,
            guidance_scale=args.guidance_scale,
            scheduler=args.scheduler,
            seed=args.seed,
            num_images=args.num_images,
            stream=True,
        )
        try:
            for event in events:
                if isinstance(event, GenerateProgress):
                    bar = bar or out.progress("denoising", event.total_steps)
                    bar.update(event.step)
                elif isinstance(event, GenerateResult):
                    if bar is not None:
                        bar.close()
                        bar = None
                    paths = [
                        image.save(target / f"{event.model}-{image.seed}.png")
                        for image in event.images
                    ]
                    out.emit(
                        {
                            "images": [str(p) for p in paths],
                            "seeds": [i.seed for i in event.images],
                            "gpu_seconds": event.gpu_seconds,
                            "model": event.model,
                        }
                    )
        finally:
            if bar is not None:
                bar.close()
    return 0


def _follow(client: Client, job_id: str, out: Output) -> int:
    """Show a job's events with progress bars until it ends."""
    bars: dict[str, Any] = {}
    final = "unknown"
    try:
        for event in client.watch(job_id):
            if out.json:
                out.emit(event)
            if event.kind == "class_images" and not out.json:
                bar = bars.setdefault("class", out.progress("class images", event.total))
                bar.update(event.done, event.total)
            elif event.kind == "training_step" and not out.json:
                bar = bars.setdefault("steps", out.progress("training", event.total_steps))
                bar.update(event.step, event.total_steps, f" loss {event.loss:.4f}")
            elif event.kind in ("succeeded", "failed", "cancelled"):
                final = event.kind
                for bar in bars.values():
                    bar.close()
                bars.clear()
                if not out.json:
                    detail = event.model or event.reason
                    print(f"job {job_id} {event.kind}{': ' + detail if detail else ''}")
    finally:
        for bar in bars.values():
            bar.close()
    return 0 if final == "succeeded" else 1


def cmd_train(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as client:
        job = client.train(
            args.images,
            args.instance_prompt,
            base_model=args.base_model,
            class_prompt=args.class_prompt,
            num_class_images=args.class_images,
            max_train_steps=args.steps,
            learning_rate=args.learning_rate,
            resolution=args.resolution,
            seed=args.seed,
            validation_prompt=args.validation_prompt,
            output_model_name=args.name,
            kind=args.kind,
            rank=args.rank,
        )
        if not out.json:
            print(f"job {job.id} created")
        else:
            out.emit(job.job)
        if args.no_watch:
            return 0
        return _follow(client, job.id, out)


def cmd_jobs(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as client:
        columns = ["job_id", "state", "step", "total_steps", "model", "created"]
        out.table("training jobs", client.jobs(), columns)
    return 0


def cmd_watch(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as client:
        return _follow(client, args.job_id, out)


def cmd_cancel(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as client:
        out.emit(client.cancel(args.job_id))
    return 0


def cmd_models(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as client:
        columns = ["name", "kind", "origin", "demo", "base_model", "tune", "size_bytes", "source"]
        out.table("models", client.models(), columns, {"size_bytes": _size})
    return 0


def _size(size_bytes: int) -> str:
    """Size on disk for people: empty for base models."""
    if not size_bytes:
        return ""
    if size_bytes < 1000:
        return f"{size_bytes} B"
    size = float(size_bytes)
    for unit in ("kB", "MB", "GB"):
        size /= 1000
        if size < 1000 or unit == "GB":
            break
    return f"{size:.1f} {unit}"


def cmd_usage(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as client:
        out.emit(client.usage())
    return 0


def cmd_keys(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as client:
        if args.keys_command == "create":
            out.emit(client.create_key(args.tenant, args.tier, args.description))
        elif args.keys_command == "list":
            keys = client.list_keys(args.tenant, args.all)
            out.table("keys", keys, ["key_id", "tenant", "tier", "created", "revoked"])
        else:
            out.emit(client.revoke_key(args.key_id))
    return 0


def cmd_up(args: argparse.Namespace, out: Output) -> int:
    from dreamsight import _up

    home = Path(args.home or os.environ.get("DREAMSIGHT_HOME", ".dreamsight")).resolve()
    models = _up.Models(
        vision=args.vision_model,
        diffusion=args.diffusion_model,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        max_model_len=args.max_model_len,
        tool_call_parser=args.tool_call_parser,
    )
    demo = not (models.vision and models.diffusion)
    note = " (demo models set up on first run)" if demo else ""
    print(f"starting dreamsight in {home}{note} ...", file=sys.stderr)
    stack = _up.start(home, args.port, args.http_port, models=models)
    http = f"http://127.0.0.1:{stack.http_port}" if stack.http_port > 0 else ""
    info = {"target": stack.target, "api_key": stack.api_key, "http": http, "home": str(home)}
    if out.json:
        out.emit(info)
    else:
        print(f"\ndreamsight is up: gRPC {stack.target}")
        if http:
            print(f"  HTTP (Ollama /api, OpenAI /v1): {http}")
        print(f"  export DREAMSIGHT_HOST={stack.target}")
        print(f"  export DREAMSIGHT_API_KEY={stack.api_key}")
        if demo:
            print("  (demo models: toys that know one flat shape on white; see docs/quality.md)")
        print("press Ctrl-C to stop", flush=True)
    sys.stdout.flush()
    _up.run_forever(stack)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used for --help output)."""
    parser = argparse.ArgumentParser(
        prog="dreamsight",
        description="dreamsight: chat with images, generate and fine-tune Stable Diffusion.",
        epilog=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", help="gateway address (default $DREAMSIGHT_HOST)")
    parser.add_argument("--api-key", help="API key (default $DREAMSIGHT_API_KEY)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="chat about images (interactive without a prompt)")
    chat.add_argument("prompt", nargs="*", help="one-shot prompt; omit for interactive chat")
    chat.add_argument("--image", action="append", help="attach an image (repeatable)")
    chat.add_argument("--model", default="", help="chat model (default: the served one)")
    chat.add_argument("--system", default="", help="system prompt")
    chat.add_argument("--temperature", type=float)
    chat.add_argument("--max-tokens", type=int)
    chat.add_argument("--seed", type=int)
    chat.add_argument("--format", help='"json" or a JSON schema')
    chat.set_defaults(run=cmd_chat)

    gen = sub.add_parser("generate", help="generate images from a prompt")
    gen.add_argument("prompt", nargs="+")
    gen.add_argument("--out", default=".", help="directory for the PNGs")
    gen.add_argument("--model", default="")
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--steps", type=int)
    gen.add_argument("--guidance-scale", type=float)
    gen.add_argument("--scheduler", default="")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--num-images", type=int)
    gen.set_defaults(run=cmd_generate)

    train = sub.add_parser("train", help="fine-tune on a subject (DreamBooth)")
    train.add_argument("--images", nargs="+", required=True, help="3-5 photos of the subject")
    train.add_argument("--instance-prompt", required=True, help='e.g. "a photo of sks dog"')
    train.add_argument("--class-prompt", default="", help='e.g. "a photo of a dog"')
    train.add_argument("--class-images", type=int, help="class-prior images (0: no prior)")
    train.add_argument("--base-model", default="")
    train.add_argument("--steps", type=int)
    train.add_argument("--learning-rate", type=float)
    train.add_argument("--resolution", type=int)
    train.add_argument("--seed", type=int)
    train.add_argument("--validation-prompt", default="")
    train.add_argument("--name", default="", help="name of the resulting model")
    train.add_argument(
        "--kind",
        choices=("lora", "full"),
        help="lora (the default: a small adapter served on the base model) or full",
    )
    train.add_argument("--rank", type=int, help="LoRA rank (default 4)")
    train.add_argument("--no-watch", action="store_true", help="return once the job is queued")
    train.set_defaults(run=cmd_train)

    sub.add_parser("jobs", help="list your training jobs").set_defaults(run=cmd_jobs)
    watch = sub.add_parser("watch", help="follow a training job (re-attach any time)")
    watch.add_argument("job_id")
    watch.set_defaults(run=cmd_watch)
    cancel = sub.add_parser("cancel", help="cancel a training job")
    cancel.add_argument("job_id")
    cancel.set_defaults(run=cmd_cancel)
    sub.add_parser("models", help="list models").set_defaults(run=cmd_models)
    sub.add_parser("usage", help="your tier, limits and GPU-seconds").set_defaults(run=cmd_usage)

    keys = sub.add_parser("keys", help="manage API keys (needs the admin token as --api-key)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create")
    create.add_argument("tenant")
    create.add_argument("tier")
    create.add_argument("--description", default="")
    listing = keys_sub.add_parser("list")
    listing.add_argument("--tenant", default="")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    revoke = keys_sub.add_parser("revoke")
    revoke.add_argument("key_id")
    keys.set_defaults(run=cmd_keys)

    up = sub.add_parser(
        "up", help="run gateway, vision and diffusion here (the demo models, or your own)"
    )
    up.add_argument(
        "--vision-model", default="", help="LLaVA directory or hub id (default: the demo model)"
    )
    up.add_argument(
        "--diffusion-model",
        default="",
        help="Stable Diffusion directory or hub id, or NAME=SOURCE (default: the demo model)",
    )
    up.add_argument("--quantization", default="", help="vLLM quantization, e.g. awq, gptq, fp8")
    up.add_argument("--kv-cache-dtype", default="", help="vLLM KV-cache dtype, e.g. fp8")
    up.add_argument(
        "--tool-call-parser",
        default="",
        help="vLLM's tool call parser for the vision model (e.g. llama3_json), so "
        "tool_choice auto calls tools",
    )
    up.add_argument("--max-model-len", type=int, default=2048, help="vision context length")
    up.add_argument("--home", help="state directory (default $DREAMSIGHT_HOME or .dreamsight)")
    up.add_argument("--port", type=int, default=50051, help="gateway port (0: any free port)")
    up.add_argument(
        "--http-port",
        type=int,
        default=11434,
        help="Ollama/OpenAI HTTP port (0: any free port, -1: off)",
    )
    up.set_defaults(run=cmd_up)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dreamsight`` command."""
    args = build_parser().parse_args(argv)
    out = Output(args.json)
    try:
        code: int = args.run(args, out)
        return code
    except DreamsightError as error:
        name = type(error).__name__
        if out.json:
            print(json.dumps({"error": name, "message": str(error)}), file=sys.stderr)
        else:
            print(f"{name}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
