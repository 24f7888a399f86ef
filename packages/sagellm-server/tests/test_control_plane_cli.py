"""``sagellm-control-plane``'s flags: the secret is required, keys come from the environment."""

from __future__ import annotations

from typing import Any

import pytest
import uvicorn

from sagellm_server.control_plane import cli


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """uvicorn.Server.run replaced: records the app it would serve, and reports it started."""
    apps: list[Any] = []

    def run(self: uvicorn.Server) -> None:
        apps.append(self.config.app)
        self.started = True

    monkeypatch.setattr(uvicorn.Server, "run", run)
    for name in ("SAGELLM_API_KEY", "SAGELLM_CONTROL_PLANE_SECRET", "SAGELLM_ENGINE_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    return apps


def test_the_registration_secret_is_required(served: list[Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--port", "0"]) == 2
    assert "registration secret is required" in capsys.readouterr().err
    assert served == []


def test_negative_counts_are_refused(served: list[Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--registration-secret", "s", "--max-retries", "-1"]) == 2
    assert "--max-retries must be >= 0" in capsys.readouterr().err


def test_settings_reach_the_app(served: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGELLM_CONTROL_PLANE_SECRET", "from-env")
    monkeypatch.setenv("SAGELLM_API_KEY", "client-key")
    assert cli.main(["--drop-after", "7", "--missed-heartbeats", "2", "--affinity-prefix-chars", "32",
                     "--overload-factor", "3"]) == 0
    app = served[0]
    policy = app.state.registry.policy
    assert (policy.drop_after, policy.missed_heartbeats) == (7.0, 2)
    # The middleware stack holds the API key check; the engine key defaults to the client key.
    guard = next(m for m in app.user_middleware if m.cls.__name__ == "GuardMiddleware")
    assert guard.kwargs["api_key"] == "client-key"
    assert guard.kwargs["public_prefixes"] == ("/internal/engines",)


def test_help_never_prints_secrets(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SAGELLM_CONTROL_PLANE_SECRET", "do-not-print-me")
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "do-not-print-me" not in capsys.readouterr().out
