"""Explanation methods, registered in one place."""

from __future__ import annotations

from service.errors import UnknownMethod
from service.methods.base import Captures, Graphs, Method, RawMap, Row, Target, rows
from service.methods.crm import Crm, CrmCombined
from service.methods.fixations import CnnFixations
from service.methods.fixations_summed import SummedFixations
from service.methods.gradcam import GradCam
from service.methods.guided import GuidedBackprop, GuidedGradCam

METHODS: dict[str, Method] = {
    m.name: m for m in (Crm(), CrmCombined(), GradCam(), GuidedBackprop(), GuidedGradCam(),
                        CnnFixations(), SummedFixations())
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethod(
            f"unknown method {name!r}; available: {', '.join(METHODS)}"
        ) from None


__all__ = ["METHODS", "Captures", "Graphs", "Method", "RawMap", "Row", "Target", "get_method",
           "rows"]
