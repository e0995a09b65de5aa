"""``hf_chts.topology`` exports the documented pure functions (the objects of their own modules)."""

import importlib

import hf_chts.topology as topology


def test_topology_package_exports_every_listed_name_from_its_module():
    from hf_chts.topology import ch_l3n_scores, percolate, regrow, soft_removal  # noqa: F401 - the documented import

    assert topology.__all__ and len(set(topology.__all__)) == len(topology.__all__)
    for name in topology.__all__:
        exported = getattr(topology, name)
        owner = getattr(exported, "__module__", None)
        if owner is not None and owner.startswith("hf_chts.topology."):
            assert getattr(importlib.import_module(owner), name) is exported, name


def test_every_public_function_of_the_topology_modules_is_exported():
    missing = []
    for module_name in ("bsf", "budgets", "ch_scores", "init", "percolation", "regrowth", "removal", "sampling"):
        module = importlib.import_module(f"hf_chts.topology.{module_name}")
        for name in getattr(module, "__all__", []):
            if getattr(topology, name, None) is not getattr(module, name):
                missing.append(f"{module_name}.{name}")
    assert not missing, missing
