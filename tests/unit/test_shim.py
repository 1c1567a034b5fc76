"""What is particular to the Python shim: the installed single file, run under `python3 -IS`.

The protocol every shim must follow (VERSION, the request, the relay, the spool) is tested in
test_shim_conformance.py, against this shim and any other named in PLEXUS_SHIM.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from cnispec import cni
from metaplugin import shim
from metaplugin.config import DaemonConfig
from tests.unit.test_shim_conformance import INTERPRETER, install_python_shim


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    return install_python_shim(tmp_path)


def test_installed_shim_has_an_isolated_single_argument_shebang(installed: Path) -> None:
    first = installed.read_text().splitlines()[0]
    assert first == f"#!{INTERPRETER} -IS"
    assert installed.stat().st_mode & 0o777 == 0o755


def test_shim_imports_only_the_standard_library() -> None:
    """Run the module under -I -S with sys.modules watched: nothing outside the stdlib."""
    code = (
        "import sys, runpy; sys.argv=['plexus'];\n"
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('s', {str(Path(shim.__file__))!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "bad = [n for n in sys.modules if n.split('.')[0] in "
        "('pydantic','pyroute2','kubernetes','structlog','yaml','metaplugin','delegates')]\n"
        "print(bad)\n"
    )
    out = subprocess.run(
        [INTERPRETER, "-I", "-S", "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert out.stdout.strip() == "[]"


def test_constants_match_the_protocol_module() -> None:
    assert tuple(shim.SUPPORTED_VERSIONS) == cni.SUPPORTED_VERSIONS
    assert shim.CNI_KEYS == cni.CNI_ENV_KEYS
    assert DaemonConfig().socket_path == shim.DEFAULT_SOCKET
    assert DaemonConfig().spool_path == shim.DEFAULT_SPOOL
    assert DaemonConfig().shim_timeout == shim.DEFAULT_TIMEOUT
    # The daemon never writes a deadline into the conflist that the shim would not honour.
    assert DaemonConfig.model_validate({"shimTimeout": shim.MAX_TIMEOUT}).shim_timeout > 0
    for unusable in (shim.MAX_TIMEOUT + 1, float("inf"), float("nan"), 0):
        with pytest.raises(ValidationError):
            DaemonConfig.model_validate({"shimTimeout": unusable})


@pytest.mark.parametrize(
    "value",
    [
        {
            "cniVersion": "1.0.0",
            "socketPath": "/run/p.sock",
            "shimTimeout": 2.5,
            "n": 0,
            "t": True,
            "f": False,
            "z": None,
            "list": [1, "two", {"three": [3.25]}],
        },
        {"unicode": 'gr\u00fc\u00df \u2603 "quoted" back\\slash\nnewline\ttab'},
        [],
        "plain",
    ],
)
def test_the_shims_json_matches_the_json_module(value: object) -> None:
    assert json.loads(shim.dumps(value)) == value
    assert shim.loads(json.dumps(value)) == value
    assert shim.loads("  \n" + json.dumps(value, indent=2) + "\n ") == value


@pytest.mark.parametrize("text", ["{nope", "", "{} extra", '{"a": }', "[1,]"])
def test_the_shims_json_rejects_what_json_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        shim.loads(text)


def test_the_compiled_shims_constants_match_too() -> None:
    """shim/plexus-shim.c's defaults and limits are the Python shim's (and so the daemon's)."""
    source = (Path(shim.__file__).parents[1] / "shim" / "plexus-shim.c").read_text()

    def define(name: str) -> str:
        match = re.search(rf"^#define {name} (.+?)(\s+/\*.*)?$", source, re.MULTILINE)
        assert match, name
        return match.group(1)

    assert json.loads(define("DEFAULT_SOCKET")) == shim.DEFAULT_SOCKET
    assert json.loads(define("DEFAULT_SPOOL")) == shim.DEFAULT_SPOOL
    assert float(define("DEFAULT_TIMEOUT")) == shim.DEFAULT_TIMEOUT
    assert float(define("MAX_TIMEOUT")) == shim.MAX_TIMEOUT
    assert int(define("MAX_DEPTH")) == shim.MAX_DEPTH
    assert define("MAX_STDIN") == "(4u * 1024 * 1024)" and shim.MAX_STDIN == 4 * 1024 * 1024
    assert define("MAX_REPLY") == "(16u * 1024 * 1024)" and shim.MAX_REPLY == 16 * 1024 * 1024
    supported = re.search(r'SUPPORTED\[\] = "(.*)";', source)
    assert supported and json.loads(supported.group(1).replace('\\"', '"')) == list(
        cni.SUPPORTED_VERSIONS
    )
    keys = re.search(r"CNI_KEYS\[\] = \{(.*?)\};", source, re.DOTALL)
    assert keys and tuple(re.findall(r'"(\w+)"', keys.group(1))) == cni.CNI_ENV_KEYS
