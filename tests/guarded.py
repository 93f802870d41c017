"""A `tether up` run as a public edge would be: authentication on, tagged session ids, tight limits.

Its credentials are real: tokens made by `tether token`, and JWTs signed with
an RSA key whose public half is the JWKS file the gateway reads.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support import TetherUp
from tests.topology import LIGHT

ISSUER = "https://issuer.tether.test"
AUDIENCE = "tether-tests"
KID = "test-key-1"
SECRET = "guarded-internal-secret-0123456789"
SESSION_KEY = "guarded-session-id-key-0123456789"
# Limits small enough for a test to pass them with a few bytes.
LIMITS = {"max_json_depth": 16, "max_header_bytes": 2048, "max_body_bytes": 65536,
          "client_header_timeout": 2.0, "client_body_timeout": 2.0}


def make_token(principal: str) -> tuple[str, str]:
    """(token, tokens-file line), from `tether token` as an operator would run it."""
    out = subprocess.run([sys.executable, "-m", "tether", "token", principal], capture_output=True, check=True,
                         text=True, timeout=60).stdout.splitlines()
    return out[0], out[1]


@dataclass
class Guarded:
    up: TetherUp
    tokens: dict[str, str]  # principal -> token
    key: rsa.RSAPrivateKey
    extra: dict[str, Any] = field(default_factory=dict)

    def auth(self, principal: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[principal]}"}

    def jwt(self, subject: str, *, key: rsa.RSAPrivateKey | None = None, kid: str = KID, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": subject, "iat": now, "exp": now + 300, **claims}
        return jwt.encode(body, key or self.key, algorithm="RS256", headers={"kid": kid})


def start_guarded(workdir: Path, *extra: str) -> Guarded:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwks = workdir / "jwks.json"
    jwks.write_bytes(orjson.dumps({"keys": [{**public, "kid": KID, "alg": "RS256", "use": "sig"}]}))
    tokens: dict[str, str] = {}
    lines = ["# principal sha256:hex"]
    for principal in ("alice", "bob"):
        tokens[principal], line = make_token(principal)
        lines.append(line)
    token_file = workdir / "tokens.txt"
    token_file.write_text("\n".join(lines) + "\n")
    args = ["--upstream-command", LIGHT, "--auth", "token,jwt", "--auth-tokens-file", str(token_file),
            "--jwt-jwks", str(jwks), "--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE,
            "--session-id-key", SESSION_KEY, "--internal-secret", SECRET, "--log-level", "debug"]
    for name, value in LIMITS.items():
        args += ["--" + name.replace("_", "-"), str(value)]
    up = TetherUp([*args, *extra], workdir / "up.log").start()
    return Guarded(up, tokens, key)
