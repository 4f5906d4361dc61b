"""The architecture's promises, checked: the README's "Adding a method" example is a working method
(through `filter_pool`, a recipe, the command line and an entry-point plugin), the engine names no
method, nothing imports the package face, and argparse lives only in the command modules."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from varalign import filter_pool
from varalign.cli import main
from varalign.methods import METHODS, NAMES
from varalign.uids import hex_to_uids, sort_uids

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "varalign"


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Adding a method"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def caption_words(tmp_path):
    """The README's example, imported as a module (registers the method), removed afterwards."""
    path = tmp_path / "caption_words_example.py"
    path.write_text(readme_example())
    spec = importlib.util.spec_from_file_location("caption_words_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    METHODS.pop("caption_words", None)
    NAMES.pop("caption_words", None)


def _brute(pool: Path, min_chars: int, fraction: float) -> np.ndarray:
    """Top ⌊N·f⌋ rows by word count (ties: the exact top-k's lowest-index rule is not needed here: we
    compare with a threshold-free check below)."""
    tables = [pq.read_table(p, columns=["uid", "text"]) for p in sorted(pool.glob("*.parquet"))]
    uids = [u for t in tables for u in t.column("uid").to_pylist()]
    words = np.array([sum(len(w) >= min_chars for w in (x or "").split()) for t in tables
                      for x in t.column("text").to_pylist()], dtype=np.float32)
    return np.array(uids), words


def test_readme_example_is_a_method(caption_words, synth_pool, tmp_path, capsys) -> None:
    pool = synth_pool / "pool"
    uids, words = _brute(pool, 3, 0.3)
    k = int(len(words) * 0.3)
    res = filter_pool(pool, tmp_path / "a.npy", "caption_words", fraction=0.3, min_chars=3, quiet=True,
                      save_scores=str(tmp_path / "a.parquet"))
    assert len(res.uids) == k
    kept = set(map(tuple, np.asarray(res.uids).tolist()))
    kept_words = words[[tuple(u) in kept for u in hex_to_uids(list(uids)).tolist()]]
    assert kept_words.min() >= np.sort(words)[::-1][k - 1]  # exactly the top-k by word count (ties aside)
    scores = pq.read_table(tmp_path / "a.parquet")
    assert np.array_equal(scores.column("caption_words").to_numpy(), words)
    # a recipe stage, with the parameter set in the recipe
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "long"\n[[stages]]\nscore = "caption_words"\nmin_chars = 3\nfraction = 0.3\n')
    via_recipe = filter_pool(pool, tmp_path / "b.npy", recipe=str(recipe), quiet=True)
    assert np.array_equal(via_recipe.uids, res.uids)
    # the command line: --name and its generated --min_chars flag, and --list
    assert main(["filter", "--metadata_dir", str(pool), "--save_path", str(tmp_path / "c.npy"), "--name",
                 "caption_words", "--fraction", "0.3", "--min_chars", "3", "--quiet"]) == 0
    assert np.array_equal(np.load(tmp_path / "c.npy"), np.asarray(res.uids))
    assert main(["filter", "--list"]) == 0
    assert "score:caption_words" in capsys.readouterr().out
    assert main(["filter", "--metadata_dir", str(pool), "--save_path", str(tmp_path / "d.npy"), "--name",
                 "caption_words", "--fraction", "0.3", "--min_chars", "0", "--quiet"]) == 1
    assert "--min_chars must be an integer >= 1" in capsys.readouterr().err


def test_readme_example_as_an_entry_point_plugin(synth_pool, tmp_path) -> None:
    """A package declares the module under `varalign.methods`: the command line finds it."""
    site = tmp_path / "site"
    (site / "caption_words_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "caption_words_plugin.py").write_text(readme_example())
    (site / "caption_words_plugin-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: caption-words-plugin\nVersion: 0.1\n")
    (site / "caption_words_plugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[varalign.methods]\ncaption_words = caption_words_plugin\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(SRC.parent)]))
    listed = subprocess.run([sys.executable, "-m", "varalign", "filter", "--list"], env=env, capture_output=True,
                            text=True)
    assert listed.returncode == 0 and "caption_words" in listed.stdout, listed.stderr
    out = tmp_path / "p.npy"
    run = subprocess.run([sys.executable, "-m", "varalign", "filter", "--metadata_dir", str(synth_pool / "pool"),
                          "--save_path", str(out), "--name", "caption_words", "--threshold", "4", "--quiet"],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    uids, words = _brute(synth_pool / "pool", 1, 1.0)
    assert np.array_equal(np.load(out), sort_uids(hex_to_uids(list(uids[words >= 4]))))


def test_the_engine_names_no_method() -> None:
    names = set(METHODS) | set(NAMES)
    for path in (SRC / "engine").glob("*.py"):
        words = set(re.findall(r"[a-z_0-9]+", path.read_text()))
        assert not (words & names), f"{path.name} names {sorted(words & names)}"


def _modules() -> list[Path]:
    return [p for p in SRC.rglob("*.py") if "__pycache__" not in p.parts]


def test_nothing_imports_the_package_face() -> None:
    for path in _modules():
        rel = path.relative_to(SRC.parent)
        package = list(rel.parent.parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target == "varalign":  # `from varalign import x` / `from .. import x`: only submodules
                    for alias in node.names:
                        assert (SRC / alias.name).exists() or (SRC / f"{alias.name}.py").exists(), \
                            f"{rel} imports {alias.name!r} from the package face"


def test_argparse_only_in_command_modules() -> None:
    for path in _modules():
        uses = any(isinstance(n, (ast.Import, ast.ImportFrom)) and "argparse" in
                   ([a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""])
                   for n in ast.walk(ast.parse(path.read_text())))
        if uses:
            assert path.name in ("cli.py", "report_cli.py"), f"{path.relative_to(SRC)} imports argparse"
