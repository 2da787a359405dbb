"""Adding an attack adapter is one new file plus its entry point.

``tests/plugins/attack_plugin`` is a package certbench has never seen: one module registering
``example:fgsm`` with :func:`attacks.register_attack`, and one line in its own pyproject.toml
(``[project.entry-points."certbench.attacks"]``). Installed into a throwaway site directory,
it is listed next to the built-in adapters and runs through :func:`attacks.attack`, with no
edit to certbench.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "tests" / "plugins" / "attack_plugin"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = tmp_path_factory.mktemp("src") / "attack_plugin"
    shutil.copytree(PLUGIN, src)
    site = tmp_path_factory.mktemp("site")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--no-index",
        "--no-build-isolation",
        "--target",
        str(site),
        str(src),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.fail(f"installing the example attack plugin failed:\n{proc.stderr[-2000:]}")
    return site


def _python(code: str, site: Path, cwd: Path) -> dict:
    """Run ``code`` with the plugin site and this checkout on the path; its last stdout line
    is JSON."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("CERTBENCH_DISABLE_PLUGIN_AUTOLOAD", None)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


LIST = """
    import json
    import attacks
    from bench.registry import ATTACKS

    print(json.dumps({
        "attacks": attacks.list_attacks(),
        "libraries": attacks.attack_libraries(),
        "package": ATTACKS.package("example:fgsm"),
        "broken": ATTACKS.broken(),
        "described": attacks.describe_attack("example", "fgsm"),
    }))
"""


def test_attack_plugin_listed(plugin_site, tmp_path):
    out = _python(LIST, plugin_site, tmp_path)
    assert "example:fgsm" in out["attacks"]
    assert "certbench:pgd" in out["attacks"]  # the built-ins are still there
    assert "example" in out["libraries"]
    assert out["package"] == "certbench-attack-example"
    assert out["broken"] == {}
    assert out["described"] == {"library": "example", "name": "fgsm", "draws": 20}


RUN = """
    import json
    import torch
    import torch.nn.functional as F
    import attacks
    from bench.models import create_model
    from bench.registry import create_defense

    torch.manual_seed(0)
    d = create_defense("undefended")
    net = create_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=16)
    d.setup(net, input_shape=(1, 8, 8), num_classes=10)
    # Pixels in [0.25, 0.75] and eps = 1/8: no clipping, and the budget is a float32 value.
    x = 0.25 + 0.5 * torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8)
    x_adv = attacks.attack(d, x, y, norm="linf", eps=0.125, library="example", name="fgsm")

    # The same step computed here: x + eps * sign(grad CE).
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(d.model_(xg), y, reduction="sum"), xg)
    expected = x + 0.125 * g.sign()
    with torch.no_grad():
        loss = F.cross_entropy(d.model_(x), y, reduction="none")
        loss_adv = F.cross_entropy(d.model_(x_adv), y, reduction="none")
    unsupported = ""
    try:
        attacks.attack(d, x, y, norm="l2", eps=0.5, library="example", name="fgsm")
    except Exception as exc:
        unsupported = f"{type(exc).__name__}: {exc}"
    print(json.dumps({
        "max_dist": float((x_adv.double() - x.double()).abs().amax()),
        "max_from_expected": float((x_adv - expected).abs().amax()),
        "in_box": bool(((x_adv >= 0) & (x_adv <= 1)).all()),
        "loss_up": bool((loss_adv > loss).all()),
        "unsupported": unsupported,
    }))
"""


def test_attack_plugin_runs_through_attack(plugin_site, tmp_path):
    out = _python(RUN, plugin_site, tmp_path)
    assert 0.0 < out["max_dist"] <= 0.125  # within the budget, exactly
    assert out["max_from_expected"] <= 1e-6  # the plugin's step, up to the budget rounding
    assert out["in_box"]
    assert out["loss_up"]  # a signed-gradient step on a ReLU net raises every row's loss
    assert (
        out["unsupported"].startswith("ConfigError")
        and "supports norm(s) linf" in (out["unsupported"])
    )


SPEC = """
    import json
    from bench.spec import parse_spec

    spec = parse_spec({
        "name": "plugin-attack",
        "data": {"dataset": "digits", "limit_test": 20},
        "threat": {"norms": ["linf"], "radii": [0.0], "eps": [0.1]},
        "attack": {"library": "example", "name": "fgsm", "params": {"draws": 1}},
        "defenses": [{"name": "undefended"}],
    })
    print(json.dumps(spec.cells()[0].attack))
"""


def test_attack_plugin_in_a_spec(plugin_site, tmp_path):
    out = _python(SPEC, plugin_site, tmp_path)
    assert out["library"] == "example" and out["name"] == "fgsm"
    assert out["params"] == {"draws": 1}


def test_attack_plugin_absent_without_install(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = "import json, attacks; print(json.dumps(attacks.list_attacks()))"
    listed = _python(code, empty, tmp_path)
    assert "certbench:pgd" in listed
    assert not any(k.startswith("example:") for k in listed)
