"""Terraform for tests: the real `terraform` binary, offline, with the machine's provider mirror.

- `tf` (session): a `Terraform` runner with a CLI configuration of our own (in a temp folder;
  `TF_CLI_CONFIG_FILE` on these machines names a file that does not exist) whose
  `provider_installation` uses the filesystem mirror of `hashicorp/aws` carried by the machine
  image, and a shared plugin cache so each copy of a configuration installs the provider once.
- `moto_http` (session): moto's own server as a separate process on 127.0.0.1 (real HTTP, as the
  provider talks to AWS), with `/moto-api/reset` for each test that applies.

A missing `terraform` or provider mirror fails the tests: CI's machines carry both.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cloudbuild import retry, runner

REPO = Path(__file__).resolve().parents[2]
TERRAFORM = REPO / "terraform"
MIRROR_ROOTS = (
    Path("/opt/tf-plugins"),
    Path("/usr/share/terraform/plugins"),
    Path.home() / ".terraform.d/plugins",
)


def provider_mirror() -> Path:
    """The folder holding registry.terraform.io/hashicorp/aws/<version>/<platform>/."""
    for root in MIRROR_ROOTS:
        if any(root.glob("registry.terraform.io/hashicorp/aws/*/*/terraform-provider-aws*")):
            return root
    found = runner.run(
        ["find", "/", "-xdev", "-name", "terraform-provider-aws*", "-path", "*registry.terraform.io*"],
        check=False,
    ).stdout.split()
    if not found:
        pytest.fail("no filesystem mirror of hashicorp/aws: the machine image should carry one")
    # .../<root>/registry.terraform.io/hashicorp/aws/<version>/<platform>/<binary>
    return Path(found[0]).parents[5]


@dataclass
class Terraform:
    binary: str
    env: dict[str, str]

    def run(
        self, *args: str, cwd: Path, check: bool = True, timeout: float = 900
    ) -> subprocess.CompletedProcess[str]:
        proc = runner.run([self.binary, *args], cwd=cwd, env=self.env, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            pytest.fail(f"terraform {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def json(self, *args: str, cwd: Path) -> Any:
        command, *rest = args  # options go before a plan file's name
        return json.loads(self.run(command, "-json", *rest, cwd=cwd).stdout)


@pytest.fixture(scope="session")
def tf(tmp_path_factory: pytest.TempPathFactory) -> Terraform:
    binary = shutil.which("terraform")
    if binary is None:
        pytest.fail("terraform is not installed: the machine image should carry Terraform 1.11")
    home = tmp_path_factory.mktemp("tfcli")
    (home / "plugin-cache").mkdir()
    config = home / "cli.tfrc"
    config.write_text(
        "provider_installation {\n"
        f'  filesystem_mirror {{\n    path    = "{provider_mirror()}"\n'
        '    include = ["registry.terraform.io/hashicorp/aws"]\n  }\n'
        '  direct {\n    exclude = ["registry.terraform.io/hashicorp/aws"]\n  }\n}\n'
        f'plugin_cache_dir = "{home / "plugin-cache"}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TF_"))}
    env.update(TF_CLI_CONFIG_FILE=str(config), TF_IN_AUTOMATION="1", CHECKPOINT_DISABLE="1", NO_COLOR="1")
    return Terraform(binary, env)


def copy_config(source: Path, dest: Path) -> Path:
    """A copy of a configuration folder without local state, so tests never write into the repo."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(".terraform*", "*.tfstate*"))
    return dest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def moto_http() -> Iterator[str]:
    port = free_port()
    env = dict(os.environ, MOTO_EC2_LOAD_DEFAULT_AMIS="false")
    server = runner.spawn(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=2):
                return True
        except OSError:
            return False

    try:
        retry.wait_for(answers, what="moto's server to answer", timeout=30, interval=0.1, max_interval=0.5)
        yield url
    finally:
        runner.terminate(server)


def reset_moto(url: str) -> None:
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=30).close()
