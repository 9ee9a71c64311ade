"""Choosing between Transformer Engine modules and megatron-core's local modules.

One switch (`model.transformer_impl`): "auto" takes TE when it imports and falls back to the
local modules otherwise, logging which path runs; "transformer_engine" insists on TE.
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger(__name__)


@functools.cache
def te_available() -> bool:
    """True when Transformer Engine's PyTorch modules import and megatron-core sees them."""
    try:
        import transformer_engine.pytorch  # noqa: F401
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except Exception:  # ImportError, or a TE build that fails to load its library
        return False
    return bool(HAVE_TE)


@functools.cache
def resolve_transformer_impl(requested: str) -> str:
    """Map the config value to megatron-core's `transformer_impl` ("transformer_engine"/"local")."""
    if requested == "local":
        impl = "local"
    elif requested == "transformer_engine":
        if not te_available():
            raise RuntimeError(
                "model.transformer_impl=transformer_engine but transformer_engine does not import; "
                "install the `te` extra or set model.transformer_impl=auto (or local)"
            )
        impl = "transformer_engine"
    elif requested == "auto":
        impl = "transformer_engine" if te_available() else "local"
    else:
        raise ValueError(
            f"model.transformer_impl={requested!r}: choose auto, transformer_engine or local"
        )
    logger.info("layers use %s", describe_transformer_impl(requested, impl))
    return impl


def describe_transformer_impl(requested: str, impl: str | None = None) -> str:
    """Which modules the layers are built from, for logs and the start-up banner: "Transformer
    Engine modules (model.transformer_impl=auto)" or "megatron-core local modules (...)". impl:
    the resolved value, resolved here when not given."""
    impl = impl or resolve_transformer_impl(requested)
    name = "Transformer Engine" if impl == "transformer_engine" else "megatron-core local"
    return f"{name} modules (model.transformer_impl={requested})"
