"""Test-only node: several CONDITIONINGs as one list output (what list-mode graphs give a node with several prompts)."""
from __future__ import annotations


class ConditioningList:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"c0": ("CONDITIONING",)},
                "optional": {f"c{i}": ("CONDITIONING",) for i in range(1, 4)}}

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_IS_LIST = (True,)
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, **conditionings):
        return ([conditionings[k] for k in sorted(conditionings)],)
