"""The import graph: one direction between the Hydra plugin and the package, no cycle."""

import json
import subprocess
import sys
from pathlib import Path


def _modules_after(statement: str) -> set:
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_package_never_imports_the_hydra_plugin():
    loaded = _modules_after(
        "import fusion_bench_ace.mini, fusion_bench_ace.compare, fusion_bench_ace.bench, "
        "fusion_bench_ace.cli; fusion_bench_ace.mini.settings('gpt2', 'reduced'); "
        "fusion_bench_ace.compare.available_benchmarks()"
    )
    assert not any(name.startswith("hydra_plugins") for name in loaded)


def test_hydra_plugin_imports_only_the_light_part_of_the_package():
    # Hydra imports every plugin while it scans, in any Hydra application: keep that cheap
    loaded = _modules_after("import hydra_plugins.fusion_bench_ace_searchpath")
    assert "fusion_bench_ace.paths" in loaded
    assert "torch" not in loaded and "fusion_bench" not in loaded


def _package_modules(package: str) -> list:
    """Every module of ``fusion_bench_ace.<package>``, found on disk (no hand-kept list)."""
    root = Path(__file__).resolve().parents[1] / "fusion_bench_ace" / package
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_the_math_and_the_engine_import_no_fusion_bench():
    modules = _package_modules("methods") + _package_modules("engine")
    loaded = _modules_after("import " + ", ".join(modules))
    assert set(modules) <= loaded
    assert not [name for name in loaded if name.split(".")[0] in ("fusion_bench", "hydra_plugins")]
    # the math is the bottom layer: it imports nothing else of the package
    ours = {name for name in loaded if name.startswith("fusion_bench_ace.")}
    math_only = _modules_after("import " + ", ".join(_package_modules("methods")))
    assert {n for n in math_only if n.startswith("fusion_bench_ace.")} <= {
        "fusion_bench_ace", *[m for m in ours if m.startswith("fusion_bench_ace.methods")]
    }


def test_open_clip_pools_leave_the_typing_module_as_it_was():
    code = (
        "import typing; before = hasattr(typing, 'override'); "
        "from fusion_bench_ace.taskpools.openclip import OpenCLIPVisionModelPool; "
        "print(before, hasattr(typing, 'override'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = done.stdout.split()[-2:]
    assert before == after
