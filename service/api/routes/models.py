"""GET /models and GET /models/{name}."""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import APIRouter

from schemas import (
    AcceptsInfo,
    CodeInfo,
    InputInfo,
    ModelInfo,
    ModelsResponse,
    TargetLayerInfo,
    UnavailableModel,
)
from service.api.deps import ApiKey, RepositoryDep
from service.api.docs import ERRORS
from service.methods import METHODS
from service.models.ensemble import Ensemble
from service.models.repository import LoadedModel, Repository, Served
from service.models.spec import LabelCode

router = APIRouter(prefix="/models", tags=["models"], dependencies=[ApiKey],
                   responses={401: ERRORS[401]})


def _methods(model: LoadedModel) -> list[str]:
    unavailable = model.unavailable
    return [name for name in METHODS if name not in unavailable]


def model_info(model: Served, repository: Repository) -> ModelInfo:
    if isinstance(model, Ensemble):
        return ensemble_info(model, repository)
    config, split = model.config, model.engine.split
    spec = config.input
    return ModelInfo(
        name=model.name,
        version=config.version,
        description=config.description,
        default=model.name == repository.default,
        labels=list(config.labels),
        input=InputInfo(size=[spec.height, spec.width], channels=spec.channels,
                        mean=list(spec.mean), std=list(spec.std), layout=spec.layout.value),
        activation=config.activation.value,
        target_layer=TargetLayerInfo(name=split.layer, shape=list(split.target_shape),
                                     detected=config.target_layer is None),
        methods=_methods(model),
        unavailable_methods=model.unavailable,
        execution_providers=list(model.engine.providers),
        execution_fallback=model.engine.fallback,
        sha256=model.sha256,
        accepts=AcceptsInfo(**{key: sorted(getattr(config.accepts, key))
                               for key in AcceptsInfo.model_fields}),
        codes=_codes(config.codes),
    )


def _codes(codes: Mapping[str, LabelCode]) -> dict[str, CodeInfo]:
    return {label: CodeInfo(scheme=c.scheme, value=c.value, meaning=c.meaning)
            for label, c in codes.items()}


def ensemble_info(model: Ensemble, repository: Repository) -> ModelInfo:
    """Methods: those every member offers; providers: every member's, first use first."""
    available = [set(_methods(m)) for m in model.members]
    providers = [p for m in model.members for p in m.engine.providers]
    return ModelInfo(
        name=model.name,
        version=model.config.version,
        description=model.config.description,
        default=model.name == repository.default,
        labels=list(model.config.labels),
        input=None,
        activation=None,
        target_layer=None,
        methods=[name for name in METHODS if all(name in a for a in available)],
        unavailable_methods={name: f"member {m.name}: {reason}" for m in model.members
                             for name, reason in m.unavailable.items()},
        execution_providers=list(dict.fromkeys(providers)),
        execution_fallback="; ".join(f"member {m.name}: {m.engine.fallback}"
                                     for m in model.members if m.engine.fallback) or None,
        sha256=model.sha256,
        members=list(model.config.members),
        codes=_codes(model.config.codes),
    )


@router.get("", response_model=ModelsResponse, summary="Every served model")
async def list_models(repository: RepositoryDep) -> ModelsResponse:
    return ModelsResponse(
        default=repository.default,
        models=[model_info(m, repository) for m in repository.served.values()],
        unavailable=[UnavailableModel(name=name, reason=reason)
                     for name, reason in repository.unavailable.items()],
    )


@router.get("/{name}", response_model=ModelInfo, responses={404: ERRORS[404], 503: ERRORS[503]},
            summary="One model: labels, input, target layer, methods, execution provider")
async def get_model(name: str, repository: RepositoryDep) -> ModelInfo:
    return model_info(repository.get(name), repository)
