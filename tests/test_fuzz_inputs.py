"""Seeded fuzz of everything a user hands keystep: the manifest, the engine index, and the CLI's argument values.

Target (issue 14): no exception escapes the CLI's user-error path. Every run exits 0, or exits 2 with exactly one
line ``keystep: error: ...`` (argparse's own errors: one ``keystep generate: error: ...`` line). An internal error
(exit 3) or a raised exception fails the test with the mutation that caused it.
"""

import copy
import json
import shutil

import numpy as np
import pytest

from keystep.tools.cli import main

VALUES = [None, -1, 0, 10**12, 1.5, "x", "", [], {}, True, float("nan")]


@pytest.fixture(scope="module")
def fuzz_bundle(tmp_path_factory, digits_dit_bundle):
    """A private copy of the digits-dit bundle whose manifest each case rewrites (the graphs stay)."""
    path = tmp_path_factory.mktemp("fuzz") / "b"
    shutil.copytree(digits_dit_bundle, path)
    return path


def paths(obj, prefix=()):
    """Every key/index path into a JSON value (not the root)."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list):
        items = enumerate(obj)
    else:
        return
    for key, value in items:
        yield prefix + (key,)
        yield from paths(value, prefix + (key,))


def mutate(data, rng) -> tuple[object, list[str]]:
    """One or two random edits: a key/element deleted, or a value replaced by one of VALUES."""
    data = copy.deepcopy(data)
    edits = []
    for _ in range(rng.integers(1, 3)):
        candidates = list(paths(data))
        if not candidates:
            break
        path = candidates[rng.integers(len(candidates))]
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        if rng.random() < 0.3:
            del parent[path[-1]]
            edits.append(f"delete {'.'.join(map(str, path))}")
        else:
            value = VALUES[rng.integers(len(VALUES))]
            parent[path[-1]] = copy.deepcopy(value)
            edits.append(f"{'.'.join(map(str, path))} = {value!r}")
    return data, edits


def run_cli(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err
    return code, err


def check_outcome(code, err, what, escapes):
    lines = err.strip().splitlines()
    ok = code == 0 or (code == 2 and len(lines) == 1 and ": error: " in lines[0] and "Traceback" not in err)
    if not ok:
        escapes.append(f"{what}: exit {code}: {err.strip()[:300]}")


def test_manifest_fuzz_never_escapes(fuzz_bundle, tmp_path, capsys):
    manifest_path = fuzz_bundle / "manifest.json"
    original = manifest_path.read_text()
    data = json.loads(original)
    rng = np.random.default_rng(14)
    escapes, refused = [], 0
    try:
        for case in range(300):
            if rng.random() < 0.1:
                cut = int(rng.integers(1, len(original)))
                manifest_path.write_text(original[:cut])
                what = f"case {case}: truncated at {cut}"
            else:
                mutant, edits = mutate(data, rng)
                manifest_path.write_text(json.dumps(mutant))
                what = f"case {case}: {'; '.join(edits)}"
            try:
                code, err = run_cli(["generate", str(fuzz_bundle), "--class", "3", "--steps", "2",
                                     "--save-latents", str(tmp_path / "z.npy")], capsys)
            except Exception as exc:  # noqa: BLE001 - the point: nothing may escape
                escapes.append(f"{what}: {type(exc).__name__}: {exc}")
                continue
            refused += code == 2
            check_outcome(code, err, what, escapes)
    finally:
        manifest_path.write_text(original)
    assert escapes == [], f"{len(escapes)} of 300 escaped:\n" + "\n".join(escapes[:20])
    assert refused > 200  # most mutations break the manifest; they must be refused, not sampled


def fake_engine_index(bundle) -> dict:
    """An engines/index.json as `keystep engines` writes it (for a GPU this machine does not have)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    engines = {}
    for stage in ("encoder", "decoder", "full"):
        engines[stage] = {
            "stage": stage, "file": f"{stage}.0123456789abcdef.plan", "key": "0123456789abcdef" * 4,
            "onnx_sha256": manifest["stages"][stage]["files"][0]["sha256"],
            "profile": {"min": 2, "opt": 2, "max": 4, "batches": [2, 4], "counts": [50, 1],
                        "shapes": {"latent": [[2, 1, 16, 16], [2, 1, 16, 16], [4, 1, 16, 16]]}},
            "options": {"opt_level": 3, "tf32": False, "refit": False}, "engine_sha256": "",
        }
    return {"tensorrt_version": "11.4.0", "gpu": "NVIDIA L4", "axes": {},
            "targets": {"plans": ["default", "all"], "images": [1]}, "engines": engines}


def test_engine_index_fuzz_never_escapes(fuzz_bundle, capsys):
    from keystep.runtime.engine_plan import EngineIndex, EnginePlanError

    index_path = EngineIndex.path(fuzz_bundle)
    index_path.parent.mkdir(exist_ok=True)
    data = fake_engine_index(fuzz_bundle)
    index_path.write_text(json.dumps(data))
    assert main(["inspect", str(fuzz_bundle), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["gpu"]["engines"]
    assert shown["gpu"] == "NVIDIA L4" and shown["stages"]["decoder"]["max"] == 4
    rng = np.random.default_rng(15)
    escapes = []
    try:
        for case in range(200):
            mutant, edits = mutate(data, rng)
            index_path.write_text(json.dumps(mutant))
            what = f"case {case}: {'; '.join(edits)}"
            try:
                EngineIndex.load(fuzz_bundle)
            except EnginePlanError as exc:
                assert "\n" not in str(exc) and str(index_path) in str(exc)
            except Exception as exc:  # noqa: BLE001
                escapes.append(f"{what}: {type(exc).__name__}: {exc}")
                continue
            try:
                code, err = run_cli(["inspect", str(fuzz_bundle)], capsys)
            except Exception as exc:  # noqa: BLE001
                escapes.append(f"{what}: inspect: {type(exc).__name__}: {exc}")
                continue
            check_outcome(code, err, what, escapes)
    finally:
        shutil.rmtree(index_path.parent)
    assert escapes == [], f"{len(escapes)} of 200 escaped:\n" + "\n".join(escapes[:20])


ARG_VALUES = ["-1", "0", "1", "2", "7", str(10**12), str(2**70), "nan", "inf", "-inf", "1e308", "0.5", "-2.5", "x", "",
              "0,", "0,1,1", "uniform:0", "uniform:x", "all", "default", "0,2,5", "blocks1-3:uniform:2",
              "blocks1-3:quad:9", "deep0:uniform:3", "blocks1-3:uniform:2@9", "@@", "a red cat"]
FLAGS = ["--steps", "--seed", "--guidance", "--threads", "--class", "--key-steps", "--cache", "--height", "--width",
         "--images", "--max-decoder-batch", "--init-noise", "--scheduler", "--negative-prompt", "--prompt",
         "--control-image", "--control-scale", "--out", "--save-latents", "--backend", "--precision"]


def test_cli_argument_fuzz_never_escapes(digits_dit_bundle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "noise.npy", np.zeros((2, 1, 16, 16), np.float32))
    (tmp_path / "text.npy").write_text("not numpy")
    files = ["noise.npy", "text.npy", "missing.npy", ".", "a.png", "a.jpg", "a.xyz", "sub/a.png", "z.npy"]
    rng = np.random.default_rng(16)
    escapes, refused = [], 0
    for case in range(250):
        argv = ["generate", str(digits_dit_bundle), "--steps", "3"]
        for _ in range(rng.integers(1, 4)):
            flag = FLAGS[rng.integers(len(FLAGS))]
            pool = files if flag in ("--init-noise", "--control-image", "--out", "--save-latents") else ARG_VALUES
            argv += [flag, pool[rng.integers(len(pool))]]
        if "--images" in argv or "--class" in argv:  # keep each sampling run small
            argv += ["--steps", "2"]
        try:
            code, err = run_cli(argv, capsys)
        except Exception as exc:  # noqa: BLE001
            escapes.append(f"{argv[2:]}: {type(exc).__name__}: {exc}")
            continue
        refused += code == 2
        check_outcome(code, err, str(argv[2:]), escapes)
    assert escapes == [], f"{len(escapes)} of 250 escaped:\n" + "\n".join(escapes[:20])
    assert refused > 100
