"""Both clients against the real gateway, vision and diffusion services."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dreamsight
import grpc
import pytest
from PIL import Image

from dreamsight_server.lifecycle import ServerOptions
from gateway.config import GatewaySettings
from gateway.server import start_gateway
from tests.conftest import VisionHandle
from tests.gateway_helpers import ADMIN_TOKEN, Stack, new_key

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
async def stack(
    tmp_path_factory: pytest.TempPathFactory, vision: VisionHandle, diffusion_backend: Any
) -> AsyncIterator[Stack]:
    diffusion = diffusion_backend
    tmp = tmp_path_factory.mktemp("client")
    gateway = await start_gateway(
        GatewaySettings(
            vision_target=f"127.0.0.1:{vision.service.port}",
            diffusion_target=f"127.0.0.1:{diffusion.port}",
            database=str(tmp / "gw.sqlite3"),
            admin_token=ADMIN_TOKEN,
            queue_length=0,
            queue_wait_s=1.0,
            server=ServerOptions(metrics_port=None, grace_s=1.0),
        )
    )
    key = await new_key(gateway, "client-tests", "pro")
    yield Stack(gateway, f"127.0.0.1:{gateway.port}", key)
    await gateway.stop(0)


def _png(color: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (48, 40), color).save(out, format="PNG")
    return out.getvalue()


GREEDY: dreamsight.Options = {"temperature": 0.0, "max_tokens": 6}


async def test_sync_chat_streaming_and_not(stack: Stack) -> None:
    def run() -> tuple[list[dreamsight.ChatChunk], dreamsight.ChatResponse]:
        with dreamsight.Client(stack.target, api_key=stack.key) as client:
            message: dreamsight.MessageDict = {
                "role": "user",
                "content": "What is it?",
                "images": [_png("red")],
            }
            chunks = list(client.chat("llava-demo", [message], options=GREEDY, stream=True))
            reply = client.chat("llava-demo", [message], options=GREEDY)
            return chunks, reply

    chunks, reply = await asyncio.to_thread(run)
    assert chunks[-1].done and chunks[-1].response is not None
    assert "".join(c.text for c in chunks[:-1]) == chunks[-1].response.text == reply.text
    assert reply.completion_tokens >= 1 and reply.gpu_seconds > 0
    assert reply.finish_reason in ("length", "stop")
    assert reply.raw.model == "llava-demo"


async def test_async_chat_streaming_and_not(stack: Stack) -> None:
    async with dreamsight.AsyncClient(stack.target, api_key=stack.key) as client:
        message = dreamsight.Message("user", "What is it?", (_png("blue"),))
        chunks = [c async for c in await client.chat("", [message], options=GREEDY, stream=True)]
        reply = await client.chat("", [message], options=GREEDY)
    assert chunks[-1].response is not None and chunks[-1].response.text == reply.text


async def test_tools_through_the_gateway_with_the_typed_client(stack: Stack) -> None:
    colour = dreamsight.Tool(
        "report_colour",
        "say the colour",
        {"type": "object", "properties": {"colour": {"enum": ["red", "blue"]}},
         "required": ["colour"]},
    )  # fmt: skip
    asked = dreamsight.Message("user", "What colour is it?", (_png("red"),))
    options: dreamsight.Options = {"temperature": 0.0, "max_tokens": 48}
    async with dreamsight.AsyncClient(stack.target, api_key=stack.key) as client:
        called = await client.chat(
            "llava-demo", [asked], options=options, tools=[colour], tool_choice=colour
        )
        (call,) = called.tool_calls
        answered = await client.chat(
            "llava-demo",
            [
                asked,
                dreamsight.Message("assistant", tool_calls=called.tool_calls),
                dreamsight.Message("tool", "red", tool_call_id=call.id, tool_name=call.name),
            ],
            options=GREEDY,
            tools=[colour],
            tool_choice="none",
        )
        with pytest.raises(dreamsight.InvalidRequest) as caught:
            await client.chat("llava-demo", [asked], tool_choice="required")
    assert called.finish_reason == "stop" and called.text == ""
    assert call.name == "report_colour" and call.parsed_arguments()["colour"] in ("red", "blue")
    assert answered.text and not answered.tool_calls
    assert answered.prompt_tokens > called.prompt_tokens
    assert "tool_choice" in str(caught.value)


async def test_each_kind_of_image_input_gives_the_same_answer(stack: Stack, tmp_path: Path) -> None:
    path = tmp_path / "red.png"
    path.write_bytes(_png("red"))
    pil = Image.open(io.BytesIO(_png("red"))).convert("RGB")
    async with dreamsight.AsyncClient(stack.target, api_key=stack.key) as client:
        answers = []
        for image in (str(path), path, _png("red"), pil):
            reply = await client.chat(
                "", [dreamsight.Message("user", "Describe.", (image,))], options=GREEDY
            )
            answers.append(reply.text)
        other = await client.chat(
            "", [dreamsight.Message("user", "Describe.", (_png("green"),))], options=GREEDY
        )
    assert len(set(answers)) == 1
    assert other.text != answers[0]


async def test_generate_sync_and_async(stack: Stack, tmp_path: Path) -> None:
    def run() -> tuple[list[Any], dreamsight.GenerateResult]:
        with dreamsight.Client(stack.target, api_key=stack.key) as client:
            events = list(client.generate_image("a red circle", steps=3, seed=7, stream=True))
            return events, client.generate_image("a red circle", steps=3, seed=7)

    events, result = await asyncio.to_thread(run)
    progress = [e for e in events if isinstance(e, dreamsight.GenerateProgress)]
    assert [p.step for p in progress] == [1, 2, 3]
    assert isinstance(events[-1], dreamsight.GenerateResult)
    assert events[-1].images[0].png == result.images[0].png, "same seed, same bytes"
    assert result.images[0].seed == 7 and result.gpu_seconds > 0
    saved = result.images[0].save(tmp_path / "out.png")
    assert result.images[0].to_pil().size == (64, 64) and saved.stat().st_size > 0
    async with dreamsight.AsyncClient(stack.target, api_key=stack.key) as client:
        again = await client.generate_image("a red circle", steps=3, seed=7)
    assert again.images[0].png == result.images[0].png


async def test_models_and_usage(stack: Stack) -> None:
    async with dreamsight.AsyncClient(stack.target, api_key=stack.key) as client:
        models = await client.models()
        usage = await client.usage()
    assert {(m.name, m.kind) for m in models} >= {
        ("llava-demo", "vision"),
        ("sd-demo", "diffusion"),
    }
    assert all(m.demo for m in models)
    assert usage.tenant == "client-tests" and usage.tier == "pro"
    assert usage.max_concurrent_requests == 3 and {w.name for w in usage.windows} == {"5h", "7d"}


async def test_each_exception_class_from_a_real_status(stack: Stack) -> None:
    async with dreamsight.AsyncClient(stack.target, api_key="ds_0123456789ab_" + "z" * 30) as bad:
        with pytest.raises(dreamsight.AuthenticationError):
            await bad.usage()
    async with dreamsight.AsyncClient(
        stack.target, api_key=stack.key, retry=dreamsight.RetryPolicy(max_attempts=1)
    ) as client:
        with pytest.raises(dreamsight.InvalidRequest) as invalid:
            await client.chat("", [dreamsight.Message("user", "hi", (b"junk",))])
        assert invalid.value.field == "messages[0].images[0]"
        with pytest.raises(dreamsight.NotFound):
            await client.chat("no-such-model", ["hi"])
        with pytest.raises(dreamsight.InvalidRequest) as steps:
            await client.generate_image("x", steps=100_000)
        assert steps.value.field == "steps"
        with pytest.raises(dreamsight.PermissionDenied):
            await client.create_key("someone", "free")
        with pytest.raises(dreamsight.DeadlineExceeded):
            await client.generate_image("slow", steps=40, timeout=0.3)
    async with dreamsight.AsyncClient(
        "127.0.0.1:1", api_key=stack.key, retry=dreamsight.RetryPolicy(max_attempts=2)
    ) as nowhere:
        with pytest.raises(dreamsight.Unavailable):
            await nowhere.usage()


async def test_rate_limited_carries_retry_after_and_quota(stack: Stack) -> None:
    free = await new_key(stack.gateway, "one-slot", "free")
    async with dreamsight.AsyncClient(
        stack.target, api_key=free, retry=dreamsight.RetryPolicy(max_attempts=1)
    ) as client:
        long = asyncio.ensure_future(client.generate_image("slow", steps=25))
        await asyncio.sleep(0.3)
        with pytest.raises(dreamsight.RateLimited) as caught:
            await client.chat("", ["hi"], options=GREEDY)
        await long
    assert caught.value.retry_after is not None and caught.value.retry_after > 0
    assert caught.value.quota[0].subject == "tenant:one-slot"


async def test_retry_honours_retry_info(stack: Stack) -> None:
    """With retries on, a call refused with RetryInfo waits and then succeeds."""
    free = await new_key(stack.gateway, "patient", "free")
    policy = dreamsight.RetryPolicy(max_attempts=20, max_backoff=2.0)
    async with dreamsight.AsyncClient(stack.target, api_key=free, retry=policy) as client:
        long = asyncio.ensure_future(client.generate_image("slow", steps=15))
        await asyncio.sleep(0.3)
        started = asyncio.get_running_loop().time()
        reply = await client.chat("", ["hi"], options=GREEDY)
        waited = asyncio.get_running_loop().time() - started
        await long
    assert reply.completion_tokens >= 1
    assert waited >= 1.0, "it waited out at least one RetryInfo delay (1 s)"
    assert long.result().images


def _cli(stack: Stack, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dreamsight.cli", "--host", stack.target, "--api-key", stack.key,
         *args],
        capture_output=True, text=True, input=stdin, timeout=120,
    )  # fmt: skip


async def test_cli_one_shot_commands(stack: Stack, tmp_path: Path) -> None:
    image = tmp_path / "cat.png"
    image.write_bytes(_png("red"))
    chat = await asyncio.to_thread(
        _cli, stack, "--json", "chat", "--image", str(image), "--max-tokens", "5",
        "--temperature", "0", "What is this?",
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    final = json.loads(chat.stdout.strip().splitlines()[-1])
    assert final["completion_tokens"] >= 1 and final["model"] == "llava-demo"

    out = tmp_path / "gen"
    gen = await asyncio.to_thread(
        _cli, stack, "--json", "generate", "a red circle", "--out", str(out), "--steps", "2",
        "--seed", "5",
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    result = json.loads(gen.stdout.strip().splitlines()[-1])
    assert result["seeds"] == [5] and Path(result["images"][0]).is_file()

    models = await asyncio.to_thread(_cli, stack, "--json", "models")
    assert {m["name"] for m in json.loads(models.stdout)} >= {"llava-demo", "sd-demo"}
    usage = await asyncio.to_thread(_cli, stack, "--json", "usage")
    assert json.loads(usage.stdout)["tenant"] == "client-tests"

    bad = await asyncio.to_thread(_cli, stack, "generate", "x", "--steps", "100000")
    assert bad.returncode == 2 and "InvalidRequest" in bad.stderr and "steps" in bad.stderr


async def test_cli_keys_need_the_admin_token(stack: Stack) -> None:
    def admin(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dreamsight.cli", "--host", stack.target, "--api-key",
             ADMIN_TOKEN, "--json", "keys", *args],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    created = await asyncio.to_thread(admin, "create", "cli-co", "free")
    assert created.returncode == 0, created.stderr
    key_id = json.loads(created.stdout)["key"]["key_id"]
    listed = await asyncio.to_thread(admin, "list", "--tenant", "cli-co")
    assert [k["key_id"] for k in json.loads(listed.stdout)] == [key_id]
    revoked = await asyncio.to_thread(admin, "revoke", key_id)
    assert json.loads(revoked.stdout)["revoked"] is not None
    denied = await asyncio.to_thread(_cli, stack, "keys", "list")
    assert denied.returncode == 2 and "PermissionDenied" in denied.stderr


async def test_cli_interactive_chat_through_a_pty(stack: Stack, tmp_path: Path) -> None:
    import os
    import pty

    image = tmp_path / "dog.png"
    image.write_bytes(_png("yellow"))

    def session() -> str:
        pid, fd = pty.fork()
        if pid == 0:  # the child: the CLI on a terminal
            os.execv(
                sys.executable,
                [sys.executable, "-m", "dreamsight.cli", "--host", stack.target, "--api-key",
                 stack.key, "chat", "--max-tokens", "4", "--temperature", "0"],
            )  # fmt: skip
        output = b""

        def read_until(marker: bytes, count: int = 1) -> None:
            nonlocal output
            while output.count(marker) < count:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise AssertionError(output.decode(errors="replace"))
                output += chunk

        read_until(b">>> ")
        os.write(fd, f"/image {image}\n".encode())
        read_until(b"attached")
        read_until(b">>> ", 2)
        os.write(fd, b"What is this?\n")
        read_until(b">>> ", 3)
        os.write(fd, b"And again?\n")
        read_until(b">>> ", 4)
        os.write(fd, b"/bye\n")
        _, status = os.waitpid(pid, 0)
        os.close(fd)
        assert os.waitstatus_to_exitcode(status) == 0
        return output.decode(errors="replace")

    transcript = await asyncio.to_thread(session)
    assert "attached" in transcript and transcript.count(">>> ") >= 4


def test_dreamsight_up_starts_and_stops_cleanly(tmp_path: Path) -> None:
    import os
    import signal
    import time

    home = tmp_path / "home"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dreamsight.cli", "--json", "up", "--home", str(home),
         "--port", "0", "--http-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["http"].startswith("http://127.0.0.1:"), "up prints the HTTP address"
        with dreamsight.Client(info["target"], api_key=info["api_key"]) as client:
            assert client.usage().tenant == "demo"
            reply = client.chat("", ["hi"], options=GREEDY)
            assert reply.completion_tokens >= 1
        assert (home / "models" / "llava-demo" / "dreamsight_demo.json").is_file()
        children = subprocess.run(
            ["pgrep", "-f", str(home)], capture_output=True, text=True
        ).stdout.split()
        assert len(children) >= 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        time.sleep(1)
        left = subprocess.run(["pgrep", "-f", str(home)], capture_output=True, text=True)
        assert left.stdout.split() == [], "no process left behind"
        assert not any(Path(f"/proc/{pid}").exists() for pid in children if int(pid) != os.getpid())
    finally:
        if proc.poll() is None:
            proc.kill()


def test_dreamsight_up_serves_a_users_own_models(tmp_path: Path) -> None:
    """``dreamsight up --vision-model ... --diffusion-model ...`` passes them on
    and puts no demo model in place for a model the user named."""
    from dreamsight import _up
    from dreamsight.cli import build_parser

    args = build_parser().parse_args(
        ["up", "--vision-model", "org/llava", "--diffusion-model", "sd15=org/sd",
         "--quantization", "awq", "--kv-cache-dtype", "fp8", "--max-model-len", "8192",
         "--tool-call-parser", "llama3_json"]
    )  # fmt: skip
    models = _up.Models(
        args.vision_model, args.diffusion_model, args.quantization, args.kv_cache_dtype,
        args.max_model_len, args.tool_call_parser,
    )  # fmt: skip
    ports = _up.Ports(gateway=1, http=2, vision=3, diffusion=4)
    commands = _up.service_commands(tmp_path, models, ports, "token", "backend-secret")
    vision, _ = commands["vision"]
    assert {"--model=org/llava", "--quantization=awq", "--kv-cache-dtype=fp8",
            "--tool-call-parser=llama3_json"} <= set(vision)  # fmt: skip
    assert "--max-model-len=8192" in vision and "--port=3" in vision
    assert "--model=sd15=org/sd" in commands["diffusion"][0]
    assert _up.demo_targets(tmp_path, models) == []
    demo = _up.Models()
    assert len(_up.demo_targets(tmp_path, demo)) == 2
    assert (
        f"--model={tmp_path / 'models' / 'llava-demo'}"
        in _up.service_commands(tmp_path, demo, ports, "token", "s")["vision"][0]
    )
    gateway_env = commands["gateway"][1]
    assert gateway_env["DREAMSIGHT_GATEWAY_HTTP_PORT"] == "2"
    for name, (argv, env) in commands.items():
        module = argv[1]
        parse = {
            "vision_service": "vision_service.config",
            "diffusion_service": "diffusion_service.config",
            "gateway": "gateway.config",
        }[module]
        settings = __import__(parse, fromlist=["parse_settings"]).parse_settings(argv[2:], env)
        secret = settings.backend_secret if module == "gateway" else settings.gateway_secret
        assert secret == "backend-secret", f"{name}: only the gateway may call the backends"


def test_mypy_understands_the_overloads(tmp_path: Path) -> None:
    sample = tmp_path / "user_code.py"
    sample.write_text(
        "import dreamsight\n"
        "client = dreamsight.Client()\n"
        'reply = client.chat("m", ["hi"])\n'
        "reveal_type(reply)\n"
        'for chunk in client.chat("m", ["hi"], stream=True):\n'
        "    reveal_type(chunk)\n"
        'result = client.generate_image("a cat")\n'
        "reveal_type(result.images[0].png)\n"
        "async def main() -> None:\n"
        "    aclient = dreamsight.AsyncClient()\n"
        '    reveal_type(await aclient.chat("m", ["hi"]))\n'
        '    async for c in await aclient.chat("m", ["hi"], stream=True):\n'
        "        reveal_type(c)\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(sample)],
        capture_output=True, text=True,
    )  # fmt: skip
    revealed = [line.split('Revealed type is "')[1].rstrip('"') for line in
                result.stdout.splitlines() if "Revealed type" in line]  # fmt: skip
    assert revealed == [
        "dreamsight._types.ChatResponse",
        "dreamsight._types.ChatChunk",
        "bytes",
        "dreamsight._types.ChatResponse",
        "dreamsight._types.ChatChunk",
    ], result.stdout
    assert result.returncode == 0, result.stdout
    _ = grpc  # the client is grpc underneath
