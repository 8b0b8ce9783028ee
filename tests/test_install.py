"""A regular (non-editable) install works from any folder: recipes are package data."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Run in the installed copy, from a folder that holds neither the repository nor its recipes.
CHECK = textwrap.dedent("""
    import sys
    from pathlib import Path

    import qkformer
    from qkformer import train
    from qkformer.config import parse_with_config, recipe_names, resolve_config_path

    site = Path(sys.argv[1]).resolve()
    assert Path(qkformer.__file__).resolve().parent == site / "qkformer", qkformer.__file__
    names = recipe_names()
    assert names == ["cifar10", "cifar100", "cifar10_dvs", "dvs128_gesture", "imagenet"], names
    for name in names:
        path = Path(str(resolve_config_path(name)))
        assert path.resolve() == site / "qkformer" / "configs" / f"{name}.yml", path
        args = parse_with_config(train.build_parser(), ["--data-dir", "d"], name)
        train.check_args(args)
        assert args.dataset == name, (name, args.dataset)
    Path("mine.yml").write_text("epochs: 3\\nlr: 2.0e-3\\n")  # a user's own recipe, cwd-relative
    args = parse_with_config(train.build_parser(), ["-c", "mine.yml", "--data-dir", "d"])
    assert (args.epochs, args.lr) == (3, 2e-3)
    from qkformer import cpu  # the kernel sources (and their header) are package data too
    assert cpu.library() is not None, cpu.unavailable_reason()
    print("ok", len(names))
""")


def _installed_env(site: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    return env


@pytest.mark.slow
def test_regular_install_runs_from_another_folder(tmp_path):
    # Build from a copy of what setup.py packages, so no build/ or egg-info lands in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "qkformer", src / "qkformer",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                        "--no-index", "--quiet", "--target", str(site), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in (site / "qkformer" / "configs").glob("*.yml")) == [
        "cifar10.yml", "cifar100.yml", "cifar10_dvs.yml", "dvs128_gesture.yml", "imagenet.yml"]
    assert not (site / "qkformer" / "__editable__").exists()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _installed_env(site)

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True,
                              text=True, timeout=600)

    r = run("-c", CHECK, str(site))
    assert r.returncode == 0 and r.stdout.strip() == "ok 5", r.stdout + r.stderr
    r = run("-m", "qkformer.demo", "--help")
    assert r.returncode == 0 and "--epochs" in r.stdout, r.stderr
    # The recipe is read by the installed train entry point; the bad value is caught up front.
    r = run("-m", "qkformer.train", "--config", "cifar10", "--data-dir", "d", "--epochs", "0")
    assert r.returncode == 1 and r.stderr == "error: --epochs 0 is invalid: it must be at least 1\n"
    assert sorted(p.name for p in elsewhere.iterdir()) == ["mine.yml"]  # nothing else written
