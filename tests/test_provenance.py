"""environment.json: what a run was made with, and the label tables group runs by."""

import json

from training.provenance import environment_key, git_state, package_versions, run_environment


def test_run_environment_names_code_packages_and_kernels():
    env = run_environment()
    json.dumps(env)  # written as JSON next to metrics.json
    assert env["packages"]["torch"] and env["hardware"]["torch_cpu_capability"]
    assert env["git"]["commit"] is None or len(env["git"]["commit"]) == 40


def test_missing_package_and_missing_git_are_none(tmp_path):
    assert package_versions(("no-such-distribution-xyz",)) == {"no-such-distribution-xyz": None}
    assert git_state(tmp_path) == {"commit": None, "dirty": None}


def test_environment_key_separates_what_moves_a_seeded_run():
    base = {"git": {"commit": "a" * 40, "dirty": False}, "packages": {"torch": "2.13.0"},
            "hardware": {"torch_cpu_capability": "AVX2", "torch_threads": 1, "cuda_devices": []}, "host": "node1"}
    assert environment_key(base) == "aaaaaaa, torch 2.13.0, AVX2 x1, cpu"
    assert environment_key({**base, "host": "node2"}) == environment_key(base)  # same kind of machine
    for other in ({"torch_cpu_capability": "DEFAULT", "torch_threads": 1}, {"torch_cpu_capability": "AVX2", "torch_threads": 2}):
        assert environment_key({**base, "hardware": {**other, "cuda_devices": []}}) != environment_key(base)
    dirty = environment_key({**base, "git": {"commit": "a" * 40, "dirty": True}})
    assert dirty.startswith("aaaaaaa+dirty")
    gpus = {**base, "hardware": {"torch_cpu_capability": "AVX2", "cuda_devices": ["NVIDIA H100", "NVIDIA H100"]}}
    assert environment_key(gpus).endswith("NVIDIA H100")
    assert environment_key({}) == "no-git, torch None, None xNone, cpu"
