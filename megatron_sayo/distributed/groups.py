"""Process groups by role: megatron's TP / DP group once parallel_state is initialised, else None (one rank).

Functions that reduce across ranks take a `group` argument whose default is the string "default";
`resolve_group` turns it into the megatron group for that role, so single-process callers need no set-up.
"""

from __future__ import annotations


def _megatron_group(getter: str):
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return getattr(parallel_state, getter)()
    return None


def tp_group_default():
    """The megatron tensor-parallel group, or None when parallel_state is not initialised."""
    return _megatron_group("get_tensor_model_parallel_group")


def dp_group_default():
    """The megatron data-parallel group, or None when parallel_state is not initialised."""
    return _megatron_group("get_data_parallel_group")


def resolve_group(group, role: str):
    """'default' -> megatron's group for `role` ('tp' or 'dp'); any other value is returned as given."""
    if isinstance(group, str) and group == "default":
        return {"tp": tp_group_default, "dp": dp_group_default}[role]()
    return group
