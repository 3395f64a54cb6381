"""Which server of a sharded deployment owns a parameter.

The owner of ``name`` among ``count`` servers is a stable hash of the name (BLAKE2b, not
Python's per-process salted ``hash``), so every client and every server, in any process and
any Python run, agree. ``client/sharding.py`` holds the same three lines for the client (which
never imports the server); a test checks that the two agree.
"""

from __future__ import annotations

import hashlib


def shard_of(name: str, count: int) -> int:
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % count
