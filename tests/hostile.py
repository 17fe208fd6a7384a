"""Hostile requests against an ASGI app, generated from its own OpenAPI schema (schemathesis).

Shared by the scorer's and the label app's tests. Each operation gets a
bounded number of generated requests, valid and invalid ones (schemathesis's
positive and negative modes), each sent with one of the given header sets
(no token, a wrong one, the right one...). A response fails when it is a 5xx
or an unhandled error, when its status is not one the schema declares, or
when its body or content type does not match the schema.
"""

import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import HypothesisDeprecationWarning
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.routing import Mount, Route

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def fuzz_app(
    app: Any,
    header_sets: Sequence[dict[str, str]],
    *,
    examples: int = 25,
    cookies: dict[str, str] | None = None,
) -> list[str]:
    """Runs generated requests against every operation; returns the operations tested.

    Raises:
        AssertionError (via hypothesis): the first failing request, shrunk, with its check.
    """
    deeper = os.environ.get("WINNOW_FUZZ_EXAMPLES")  # a longer, random run when asked
    examples = int(deeper) if deeper else examples
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    tested = []
    try:
        for result in schema.get_all_operations():
            operation = result.ok()
            cases = st.one_of(
                operation.as_strategy(GenerationMode.POSITIVE),
                operation.as_strategy(GenerationMode.NEGATIVE),
            )
            _run(cases, header_sets, examples, cookies, random=bool(deeper))
            tested.append(f"{operation.method.upper()} {operation.path}")
    finally:
        asgi.shutdown_lifespans()  # the app's lifespan started with the first request
    return tested


def _run(
    cases: st.SearchStrategy[Any],
    header_sets: Sequence[dict[str, str]],
    examples: int,
    cookies: dict[str, str] | None,
    random: bool = False,
) -> None:
    @given(case=cases, headers=st.sampled_from(list(header_sets)))
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=not random,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    def check(case: schemathesis.Case, headers: dict[str, str]) -> None:
        sent = dict(headers)  # schemathesis adds its own headers to the dict it is given
        response = case.call(headers=sent, cookies=dict(cookies or {}))
        case.validate_response(response, checks=CHECKS, headers=sent)

    with warnings.catch_warnings():
        # schemathesis draws from `random` inside its strategies; the suite makes warnings errors
        warnings.simplefilter("ignore", HypothesisDeprecationWarning)
        check()


READS = frozenset({"GET", "HEAD", "OPTIONS"})


def write_routes(app: Any) -> list[tuple[str, str]]:
    """``(method, path)`` of every route of ``app`` that is not a read, included routers too.

    Read from the app itself (not its OpenAPI, which may leave routes out), so a write
    route added later is found; a kind of route this walk does not know fails loudly.
    """
    return sorted(
        (method, path) for path, methods in _walk(app.routes, "") for method in methods - READS
    )


def _walk(routes: Sequence[Any], prefix: str) -> Iterator[tuple[str, set[str]]]:
    for route in routes:
        if isinstance(route, Mount) and route.path == "/static":
            continue  # StaticFiles answers GET and HEAD only
        if isinstance(route, Route):  # APIRoute too
            yield prefix + route.path, set(route.methods or ())
        elif hasattr(route, "original_router"):  # FastAPI's included router
            context = getattr(route, "include_context", None)
            yield from _walk(route.original_router.routes, prefix + getattr(context, "prefix", ""))
        else:
            raise AssertionError(f"unknown kind of route {route!r}: teach write_routes about it")


__all__ = ["CHECKS", "fuzz_app", "write_routes"]
