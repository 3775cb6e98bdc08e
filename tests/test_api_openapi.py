"""The OpenAPI document matches the route table and unknown routes answer in JSON."""

from __future__ import annotations

import httpx

from server.api import ROUTES
from server.api.openapi import REQUEST_BODIES, route_operations


async def test_openapi_matches_routes(api) -> None:
    async with httpx.AsyncClient(base_url=api.handle.api_url) as anon:
        response = await anon.get("/openapi.json")  # public
    assert response.status_code == 200
    doc = response.json()
    assert doc["openapi"].startswith("3.1")
    documented = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    expected = {(method, path) for method, path, _ in route_operations(ROUTES)}
    assert documented == expected
    assert ("put", "/v1/products/{product}/firmware/release") in documented
    assert ("get", "/v1/devices/{device_id}/events/{prefix}") in documented
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op["summary"] and op["responses"], (method, path)
            names = [p["name"] for p in op["parameters"]]
            assert names == [part[1:-1] for part in path.split("/") if part.startswith("{")]
            if method in ("post", "put") and op["operationId"] != "token_post":
                assert "requestBody" in op, (method, path)
    assert set(REQUEST_BODIES) <= {route.name for _, _, route in route_operations(ROUTES)}


async def test_unknown_route_and_method_are_json(api) -> None:
    response = await api.client.get("/v1/nothing")
    assert response.status_code == 404 and response.json()["ok"] is False
    response = await api.client.patch("/v1/products")
    assert response.status_code == 405 and response.json()["ok"] is False
