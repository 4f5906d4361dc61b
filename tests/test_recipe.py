"""Recipes: presets equal the --name methods, set operations, validation before any work."""

import os

import numpy as np
import pytest
from reference_impl import load_pool, top_k

from varalign import filter_pool
from varalign.cli import main
from varalign.errors import VaralignError
from varalign.recipe import list_presets, load_recipe
from varalign.uids import hex_to_uids, sort_uids


def _write(tmp_path, text: str, name: str = "r.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_preset_equals_name_flags(synth_pool, tmp_path) -> None:
    pool, files = synth_pool / "pool", synth_pool / "files"
    a = filter_pool(pool, tmp_path / "a.npy", recipe="vas_small", files_path=str(files), quiet=True)
    b = filter_pool(pool, tmp_path / "b.npy", "vas", arch="l14", fraction=0.45, fraction_vas=0.3,
                    target_variance_name="imagenet_1k", files_path=str(files), quiet=True)
    assert np.array_equal(a.uids, b.uids) and a.counts == b.counts


def test_recipe_file_with_relative_target_and_threshold(synth_pool, tmp_path) -> None:
    target = synth_pool / "files" / "variance" / "variance_imagenet_1k.npy"
    (tmp_path / "t.npy").write_bytes(target.read_bytes())
    path = _write(tmp_path, """
name = "mine"
description = "threshold then VAS"
[[stages]]
score = "clip_score"
arch = "l14"
threshold = 0.25
[[stages]]
score = "vas"
arch = "l14"
target = "t.npy"
fraction = 0.1
""")
    res = filter_pool(synth_pool / "pool", tmp_path / "m.npy", recipe=str(path), quiet=True)
    assert res.counts["vas"] == 300 and res.thresholds["clip_score"] == 0.25


def test_union_and_intersection(synth_pool, tmp_path) -> None:
    uids, scores, _ = load_pool(synth_pool / "pool")
    _, b32, _ = load_pool(synth_pool / "pool", "b32")
    body = """
[[parts]]
name = "l14"
[[parts.stages]]
score = "clip_score"
arch = "l14"
fraction = 0.2
[[parts]]
name = "b32"
[[parts.stages]]
score = "clip_score"
arch = "b32"
fraction = 0.2
"""
    a = set(top_k(scores, 600).tolist())
    b = set(top_k(b32, 600).tolist())
    for op, rows in (("union", a | b), ("intersection", a & b)):
        path = _write(tmp_path, f'name = "{op}"\nop = "{op}"\n' + body, f"{op}.toml")
        res = filter_pool(synth_pool / "pool", tmp_path / f"{op}.npy", recipe=str(path), quiet=True)
        expected = sort_uids(hex_to_uids([uids[i] for i in sorted(rows)]))
        assert np.array_equal(res.uids, expected)
        assert res.counts["l14.clip_score"] == 600 and res.counts["b32.clip_score"] == 600


def test_recipe_paths_are_relative_to_the_recipe_file_only(synth_pool, tmp_path, monkeypatch, capsys) -> None:
    """A relative target is looked for beside the recipe, never in the current folder (a file of that name
    there is not silently used); `~` and URLs are kept."""
    (tmp_path / "recipes").mkdir()
    recipe = tmp_path / "recipes" / "r.toml"
    recipe.write_text('[[stages]]\nscore = "vas"\narch = "l14"\ntarget = "t.npy"\nfraction = 0.3\n'
                      '[[stages]]\nscore = "vas"\narch = "l14"\ntarget = "s3://bucket/t.npy"\nfraction = 0.2\n'
                      'label = "remote"\n[[stages]]\nscore = "vas"\narch = "l14"\ntarget = "~/t.npy"\n'
                      'fraction = 0.1\nlabel = "home"\n')
    stages = load_recipe(recipe).stages
    assert stages[0].params["target"] == str(tmp_path / "recipes" / "t.npy")
    assert stages[1].params["target"] == "s3://bucket/t.npy"
    assert stages[2].params["target"] == os.path.expanduser("~/t.npy")
    several = tmp_path / "recipes" / "several.toml"  # NormSim's targets, image_based's centroids: lists and paths
    several.write_text('[[stages]]\nscore = "normsim"\narch = "l14"\ntarget = ["a.npy", "/abs/b.npy"]\n'
                       'fraction = 0.3\n[[stages]]\nscore = "image_based"\ncentroids = "c.npy"\n'
                       'target_features = ["f.npy"]\nlabel = "ib"\n')
    st = load_recipe(several).stages
    assert st[0].params["target"] == [str(tmp_path / "recipes" / "a.npy"), "/abs/b.npy"]
    assert st[1].params["centroids"] == str(tmp_path / "recipes" / "c.npy")
    assert st[1].params["target_features"] == [str(tmp_path / "recipes" / "f.npy")]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.npy").write_bytes((synth_pool / "files" / "variance" / "variance_imagenet_1k.npy").read_bytes())
    code = main(["filter", "--recipe", str(recipe), "--metadata_dir", str(synth_pool / "pool"),
                 "--save_path", str(tmp_path / "out.npy"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and str(tmp_path / "recipes" / "t.npy") in err, err
    assert not (tmp_path / "out.npy").exists()


@pytest.mark.parametrize("text, message", [
    ('[[stages]]\nscore = "nope"\nfraction = 0.1', "unknown score 'nope'"),
    ('[[stages]]\nscore = "clip_score"\narch = "l14"', "exactly one of fraction or threshold"),
    ('[[stages]]\nscore = "clip_score"\narch = "l14"\nfraction = 0.2\n[[stages]]\nscore = "vas"\narch = "l14"\n'
     'target = "x.npy"\nfraction = 0.3', "exceeds the previous stage"),
    ('[[stages]]\nscore = "clip_score"\narch = "l14"\nfraction = 1.5', "fraction must be in (0, 1]"),
    ('[[stages]]\nscore = "clip_score"\narch = "l14"\nfraction = 0.2\nselect = "best"', "select must be one of"),
    ('op = "xor"\n[[parts]]\n[[parts]]', "op must be"),
    ('stages = 3 =', "not valid TOML"),
    ('colour = "red"', "unknown recipe key 'colour'"),
    # values of the wrong type, and recipes that select nothing: one line, before any work
    ('[[stages]]\nscore = "clip_score"\narch = "l14"\nfraction = "lots"', "fraction must be a number, got 'lots'"),
    ('[[stages]]\nscore = "clip_score"\narch = "l14"\nfraction = true', "fraction must be a number, got True"),
    ('[[stages]]\nscore = "clip_score"\narch = "l14"\nthreshold = "x"', "threshold must be a number, got 'x'"),
    ('[[stages]]\nscore = "vas"\narch = "l14"\nthreshold = [1, 2]', "threshold must be a number, got [1, 2]"),
    ('[[stages]]\nscore = "vas"\narch = "l14"\ntarget = 7\nfraction = 0.3', "target must be a path (a string)"),
    ('[[stages]]\nscore = "normsim"\narch = "l14"\ntarget = [1]\nfraction = 0.3', "or a list of paths, got [1]"),
    ('[[stages]]\nscore = 5\nfraction = 0.3', "`score` must be a string, got 5"),
    ('stages = [1, 2]', "`stages` must be a list of tables"),
    ('name = 5\n[[stages]]\nscore = "clip_score"\narch = "l14"\nfraction = 0.3', "`name` must be a string"),
    ('', "has no stages"),
    ('name = "x"\nstages = []', "recipe 'x' has no stages"),
    ('op = "union"\n[[parts]]\nname = "a"\n[[parts]]\nname = "b"', "recipe 'a' has no stages"),
])
def test_bad_recipe_one_line_error(synth_pool, tmp_path, capsys, text, message) -> None:
    path = _write(tmp_path, text)
    code = main(["filter", "--recipe", str(path), "--metadata_dir", str(synth_pool / "pool"),
                 "--save_path", str(tmp_path / "out" / "x.npy"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_presets_listed_and_loadable(capsys) -> None:
    presets = list_presets()
    assert {"vas_small", "vas_d_small", "clip_score_l14_30"} <= set(presets)
    assert main(["filter", "--list"]) == 0
    out = capsys.readouterr().out
    assert "preset:vas_small" in out and "score:vas" in out
    assert load_recipe("vas_d_medium").stages[1].params["num_iters"] == 500


def test_missing_recipe() -> None:
    with pytest.raises(VaralignError, match="recipe not found"):
        load_recipe("no_such_preset")


@pytest.mark.parametrize("flags, message", [
    (["--fraction", "0.5"], "--fraction does not apply with --recipe vas_small (a recipe's stages set their own"),
    (["--arch", "b32"], "--arch does not apply with --recipe vas_small (the recipe sets it)"),
    (["--centroid_path", "c.npy"], "--centroid_path does not apply with --recipe vas_small (no stage of the recipe"),
])
def test_flags_a_recipe_would_ignore_are_refused(synth_pool, tmp_path, capsys, flags, message) -> None:
    """With --recipe, a method flag fills what the recipe leaves unset; one that would change nothing is refused,
    not silently ignored. A flag the recipe leaves open (here --files_path, a run option) still applies."""
    files = synth_pool / "files"
    argv = ["filter", "--recipe", "vas_small", "--metadata_dir", str(synth_pool / "pool"), "--save_path",
            str(tmp_path / "s.npy"), "--files_path", str(files), "--quiet"]
    assert main([*argv, *flags]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "s.npy").exists()
    assert main(argv) == 0
