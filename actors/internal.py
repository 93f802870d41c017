"""The internal link's contract: paths and headers gateways, nodes and the store share.

Every internal call carries the shared secret; `authorized` checks it in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

SECRET_HEADER = "X-Tether-Secret"
NODE_HEADER = "X-Tether-Node"
EPOCH_HEADER = "X-Tether-Epoch"
INCARNATION_HEADER = "X-Tether-Incarnation"
CREATE_HEADER = "X-Tether-Create"
DECLINED_HEADER = "X-Tether-Declined"
# The session's principal (a tag, "" for anonymous): the node answers 404 when it is not the owner's.
PRINCIPAL_HEADER = "X-Tether-Principal"
QUOTA_HEADER = "X-Tether-Quota"  # on a create: whose session quota it counts against (a tag)

INTERNAL_PREFIX = "/_tether/"  # every path under it needs the secret
STORE_PATH = INTERNAL_PREFIX + "store"


def authorized(headers: Mapping[str, str], secret: str) -> bool:
    """True if the request carries the internal secret."""
    given = headers.get(SECRET_HEADER, "")
    return bool(secret) and hmac.compare_digest(given.encode(), secret.encode())

RESPONSE_HEADER = "X-Tether-Response"  # "sse", "json", "auto" or "channel": how the client takes its answers
BATCH_HEADER = "X-Tether-Batch"  # "1" when the client sent a JSON-RPC batch
