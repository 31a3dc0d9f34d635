"""Issue 12 §4: secrets stay off the wire in clear and out of the logs."""

from __future__ import annotations

from typing import Any

import pytest

from shared.config import ConfigError, config_from_document, redact


def new_relic_document(url: str, **own: Any) -> dict[str, Any]:
    return {
        "Butler-SOS": {
            "newRelic": {
                "enable": True,
                "event": {"url": url, "header": [{"name": "X-Auth", "value": "${HDR}"}]},
            },
            "userEvents": {"sendToNewRelic": {"enable": True, "destinationAccount": ["a"]}},
            "thirdPartyToolsCredentials": {
                "newRelic": [{"accountName": "a", "insertApiKey": "key-1234", "accountId": "1"}]
            },
        },
        "senseflow": own,
    }


def test_new_relic_refuses_a_plain_http_url_unless_allowed() -> None:
    env = {"HDR": "header-secret-99"}
    with pytest.raises(ConfigError) as error:
        config_from_document(new_relic_document("http://nr-proxy.local:8080"), env)
    assert error.value.problems == [
        "Butler-SOS.newRelic.event.url: expected an https:// URL (API keys must not travel in "
        "clear; senseflow.newRelicAllowHttp: true allows http://), found "
        "'http://nr-proxy.local:8080'"
    ]
    allowed = new_relic_document("http://nr-proxy.local:8080", newRelicAllowHttp=True)
    assert config_from_document(allowed, env).pipeline.new_relic_allow_http
    config_from_document(new_relic_document("https://insights-collector.eu01.nr-data.net"), env)


def test_new_relic_custom_header_values_are_redacted() -> None:
    config = config_from_document(
        new_relic_document("https://nr.example"), {"HDR": "header-secret-99"}
    )
    assert redact("sent X-Auth: header-secret-99", config) == "sent X-Auth: ***"
