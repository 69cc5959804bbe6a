"""The gateway's routes, one module per resource. Handlers are module-level functions that receive the
settings, model card, inference and store as FastAPI dependencies (``common``); each module's
``add_routes`` registers them with what only the app knows (the model's bounds, the auth scopes)."""

from __future__ import annotations

from fastapi import APIRouter

from core.model_card import ModelCard

from ..auth import Access
from . import collections, demo, embeddings, items, search, segment, system


def api_router(card: ModelCard, access: Access) -> APIRouter:
    """Every route: ``/v1`` behind the read scope (changes to collections also need the write scope); the
    health routes and the demo page open."""
    v1 = APIRouter(dependencies=access.read, responses=access.read_responses)
    embeddings.add_routes(v1)
    system.add_model_routes(v1)
    segment.add_routes(v1, card)
    collections.add_routes(v1, access)
    items.add_routes(v1, access)
    search.add_routes(v1)
    router = APIRouter()
    system.add_health_routes(router)
    router.include_router(v1)
    demo.add_routes(router)
    return router
