"""Patient keys for grouped splits: salted hashes, never raw identifiers.

The salt is ``$MEDPRETRAIN_SALT`` when set, else a public project default. With the default, short
Patient IDs can be recovered by trying candidates: set ``MEDPRETRAIN_SALT`` for real patient data.
"""

from __future__ import annotations

import hashlib
import os

SALT_ENV = "MEDPRETRAIN_SALT"
DEFAULT_SALT = "medpretrain-group"


def project_salt() -> str:
    """``$MEDPRETRAIN_SALT`` if set and non-empty, else :data:`DEFAULT_SALT`."""
    return os.environ.get(SALT_ENV) or DEFAULT_SALT


def salted_key(text: str, salt: str | None = None) -> str:
    """``sha256("<salt>:<text>")`` as 16 hex digits; ``salt=None`` uses :func:`project_salt`."""
    salt = project_salt() if salt is None else salt
    return hashlib.sha256(f"{salt}:{text}".encode()).hexdigest()[:16]
