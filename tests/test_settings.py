"""Settings declared once (dreamsight_server/settings.py), as all three services parse them."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from diffusion_service.config import DiffusionSettings
from diffusion_service.config import parse_settings as parse_diffusion
from dreamsight_server import settings as settings_module
from dreamsight_server.settings import SettingsError
from gateway.config import GatewaySettings
from gateway.config import parse_settings as parse_gateway
from vision_service.config import VisionSettings
from vision_service.config import parse_settings as parse_vision

SERVICES: list[tuple[str, type, str, Callable[..., Any], list[str]]] = [
    ("vision_service", VisionSettings, "DREAMSIGHT_VISION_", parse_vision, ["--model=m"]),
    (
        "diffusion_service",
        DiffusionSettings,
        "DREAMSIGHT_DIFFUSION_",
        parse_diffusion,
        ["--model=m"],
    ),
    ("gateway", GatewaySettings, "DREAMSIGHT_GATEWAY_", parse_gateway, []),
]


@pytest.mark.parametrize(("module", "cls", "prefix", "parse", "base"), SERVICES)
def test_every_flag_has_help_naming_its_variable(
    module: str, cls: type, prefix: str, parse: Callable[..., Any], base: list[str]
) -> None:
    options = settings_module._options(cls, cls(), prefix)
    parser = settings_module.build_parser(options, module, "")
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert len(actions) == len(options) > 5
    for action in actions:
        assert action.help and len(action.help) > 20, action.option_strings
        assert prefix in action.help, f"{action.option_strings} names no variable"
    shared = {"--host", "--port", "--metrics-port", "--grace-seconds", "--tls-cert", "--tls-key"}
    flags = {s for a in actions for s in a.option_strings}
    assert shared <= flags, f"{module} lacks {shared - flags}"
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    for flag in flags:
        assert flag in done.stdout


def test_flags_win_over_variables_which_win_over_defaults() -> None:
    env = {"DREAMSIGHT_VISION_MAX_MODEL_LEN": "4096", "DREAMSIGHT_VISION_MAX_NUM_SEQS": "4"}
    s = parse_vision(["--model=m", "--max-num-seqs=8", "--enforce-eager"], env)
    assert (s.max_model_len, s.max_num_seqs, s.enforce_eager) == (4096, 8, True)
    assert s.default_max_tokens == VisionSettings().default_max_tokens
    assert parse_vision(["--model=m"], {"DREAMSIGHT_VISION_ENFORCE_EAGER": "yes"}).enforce_eager


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        ([], {"DREAMSIGHT_VISION_MAX_MODEL_LEN": "lots"}, "DREAMSIGHT_VISION_MAX_MODEL_LEN"),
        ([], {"DREAMSIGHT_VISION_ENFORCE_EAGER": "maybe"}, "DREAMSIGHT_VISION_ENFORCE_EAGER"),
        ([], {"DREAMSIGHT_VISION_MAX_MODLE_LEN": "1"}, "DREAMSIGHT_VISION_MAX_MODLE_LEN"),
        (["--max-num-seqs=0"], {}, "--max-num-seqs"),
        (["--kv-cache-gib=-1"], {}, "--kv-cache-gib"),
        (["--port=http"], {}, "--port"),
        (["--tls-cert=c.pem"], {}, "--tls-key"),
    ],
)
def test_malformed_or_unknown_settings_name_the_setting(
    argv: list[str], env: dict[str, str], named: str
) -> None:
    with pytest.raises(SettingsError, match=named):
        parse_vision(["--model=m", *argv], env)


def test_a_bad_setting_stops_the_process_with_status_2_naming_it() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway"],
        env={"DREAMSIGHT_GATEWAY_QUEUE_LENGTH": "eight", "PATH": "/usr/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "DREAMSIGHT_GATEWAY_QUEUE_LENGTH" in done.stderr
    unknown = subprocess.run(
        [sys.executable, "-m", "vision_service", "--model=m", "--no-such-flag"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert unknown.returncode == 2 and "--no-such-flag" in unknown.stderr


@pytest.mark.parametrize("module", ["vision_service", "diffusion_service"])
def test_a_backend_without_a_way_to_know_the_gateway_refuses_to_start(module: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DREAMSIGHT_")}
    done = subprocess.run(
        [sys.executable, "-m", module, "--model=m"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    assert "--gateway-secret" in done.stderr and "--trust-any-caller" in done.stderr


def test_secrets_come_from_a_file_or_the_environment_never_a_flag(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("from-file\n")
    for _, _, prefix, parse, base in SERVICES[:2]:
        env = {f"{prefix}GATEWAY_SECRET": "from-env"}
        assert parse(base, env).gateway_secret == "from-env"
        assert parse([*base, f"--gateway-secret-file={secret}"], env).gateway_secret == "from-file"
        by_env_file = parse(base, {f"{prefix}GATEWAY_SECRET_FILE": str(secret)})
        assert by_env_file.gateway_secret == "from-file"
        with pytest.raises(SystemExit):
            parse([*base, "--gateway-secret=shown-in-ps"], {})
        with pytest.raises(SettingsError, match="--gateway-secret-file"):
            parse([*base, f"--gateway-secret-file={tmp_path / 'missing'}"], {})
    g = parse_gateway([], {"DREAMSIGHT_GATEWAY_ADMIN_TOKEN_FILE": str(secret)})
    assert g.admin_token == "from-file"


@pytest.mark.parametrize(("module", "cls", "prefix", "parse", "base"), SERVICES)
def test_every_service_serves_tls_from_the_same_flags(
    module: str, cls: type, prefix: str, parse: Callable[..., Any], base: list[str]
) -> None:
    assert parse(base, {}).server.tls is None
    s = parse([*base, "--tls-cert=c.pem"], {f"{prefix}TLS_KEY": "k.pem"})
    assert s.server.tls is not None
    assert (s.server.tls.cert, s.server.tls.key, s.server.tls.client_ca) == ("c.pem", "k.pem", "")
    assert parse([*base, "--metrics-port=off"], {}).server.metrics_port is None


def test_the_service_specific_derivations_hold() -> None:
    d = parse_diffusion(
        ["--model=a=/a", "--max-steps=10", "--default-steps=30", "--grace-seconds=4"],
        {"DREAMSIGHT_DIFFUSION_MODELS": "ignored=/x"},
    )
    assert [m.name for m in d.models] == ["a"]
    assert d.limits.default_steps == 10, "the default never exceeds the maximum"
    assert d.training.stop_grace_s == 4
    with pytest.raises(SettingsError, match="--model"):
        parse_diffusion([], {})
    with pytest.raises(SettingsError, match="unique"):
        parse_diffusion(["--model=a=/a", "--model=a=/b"], {})
    with pytest.raises(SettingsError, match="--training-max-images"):
        parse_diffusion(["--model=a", "--training-max-images=21"], {})
    with pytest.raises(SettingsError, match="--model"):
        parse_vision([], {})
    v = parse_vision(["--model=m", "--max-images-per-request=2", "--max-image-bytes=1000"], {})
    assert v.server.max_receive_bytes == 2 * 1000 + (4 << 20)
    assert parse_gateway(["--http-port=-1"], {}).http_port is None
    assert parse_gateway(["--http-port=off"], {}).http_port is None
    with pytest.raises(SettingsError, match="--event-loop"):
        parse_gateway(["--event-loop=trio"], {})
