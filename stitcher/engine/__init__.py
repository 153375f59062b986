"""The pure join engine: frames in, spans out, state behind a StateStore interface."""

from stitcher.engine.config import EngineConfig
from stitcher.engine.core import Engine, EngineStats
from stitcher.engine.model import Resource, Span
from stitcher.engine.store import StateStore

__all__ = ["Engine", "EngineConfig", "EngineStats", "Resource", "Span", "StateStore"]
