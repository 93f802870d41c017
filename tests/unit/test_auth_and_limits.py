"""The sans-IO parts of the edge's defences: the token bucket, the tokens file, log redaction, config checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.auth import read_tokens, token_hash
from gateway.limits import RateLimiter
from tether.config import Config
from tether.errors import ConfigError
from tether.logs import redact


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_gives_its_burst_then_refills_at_the_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)  # empty: the next token is half a second away
    assert limiter.take("b") == 0.0  # every key has its own bucket
    clock.now += 0.5
    assert limiter.take("a") == 0.0
    clock.now += 60
    assert [limiter.take("a") for _ in range(4)][-1] > 0  # never more than the burst saved up


def test_rate_zero_is_no_limit_and_idle_buckets_are_dropped() -> None:
    assert all(RateLimiter(rate=0, burst=1).take("a") == 0.0 for _ in range(100))
    limiter = RateLimiter(rate=1.0, burst=1, clock=Clock(), max_keys=10)
    for i in range(100):
        limiter.take(f"k{i}")
    assert len(limiter) == 10


def test_the_tokens_file_holds_hashes_and_names_the_bad_line(tmp_path: Path) -> None:
    good = tmp_path / "tokens"
    good.write_text(f"# who\nalice {token_hash('t1')}\nci bot {token_hash('t2')}\n\n")
    assert read_tokens(str(good)) == {token_hash("t1"): "alice", token_hash("t2"): "ci bot"}
    bad = tmp_path / "bad"
    bad.write_text(f"alice {token_hash('t1')}\nbob plaintext-token\n")
    with pytest.raises(ConfigError, match="line 2"):
        read_tokens(str(bad))
    with pytest.raises(ConfigError, match="does not|No such file"):
        read_tokens(str(tmp_path / "missing"))


def test_logs_mask_credentials() -> None:
    line = ("auth failed for 'Authorization': 'Bearer tt_abc-123', x-api-key: k_456, "
            "jwt eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln and X-Tether-Secret=s3cret")
    masked = redact(line)
    for secret in ("tt_abc-123", "k_456", "eyJhbGciOiJSUzI1NiJ9", "s3cret"):
        assert secret not in masked
    assert masked.count("[redacted]") == 4 and "auth failed for" in masked
    assert redact("Redis at redis://:hunter2@10.0.0.1:6379/0 is unreachable") == \
        "Redis at redis://[redacted]@10.0.0.1:6379/0 is unreachable"


@pytest.mark.parametrize(("settings", "says"), [
    ({"auth": ("token",)}, "auth_tokens_file"),
    ({"auth": ("jwt",)}, "jwt_jwks"),
    ({"auth": ("jwt",), "jwt_jwks": "keys.json", "jwt_issuer": "https://idp"}, "jwt_audience"),
    ({"auth": ("password",)}, "expected token, jwt or both"),
    ({"auth": ("jwt",), "jwt_jwks": "k.json", "jwt_issuer": "i", "jwt_audience": "a",
      "jwt_algorithms": ("HS256",)}, "public-key"),
    ({"upstream_env": ("NOT A NAME",)}, "NAME or NAME=VALUE"),
])
def test_unsafe_settings_are_refused(settings: dict[str, object], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        Config(**settings)  # type: ignore[arg-type]
