"""The dcml application: the `dcml` command, local runs, studies, comparisons.

``dcml_app.train(...)`` runs the pipeline from Python (dcml_app/python_api.py), loaded on first use so the
`dcml` command stays fast.
"""

__all__ = ["train", "Trained"]


def __getattr__(name: str):
    if name in __all__:
        from dcml_app import python_api

        return getattr(python_api, name)
    raise AttributeError(f"module 'dcml_app' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(__all__) | {name for name in globals() if name.startswith("__")})
