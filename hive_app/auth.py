"""Who is calling: signed session tokens, sign-in, guest accounts, role checks.

A token is ``payload.signature`` (HMAC-SHA256 with a secret kept in HIVE_HOME), so sessions
need no server memory, survive an app restart, and work the same from the browser and from
`gradio_client`. Accounts and password hashes live in the database (`db.feedback`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from db import feedback as fb
from db.config import hive_home
from db.engine import session_scope
from db.models import User

TOKEN_LIFETIME_S = 14 * 24 * 3600


class AuthError(PermissionError):
    """The caller may not do this; the message says why and what to do."""


@dataclass(frozen=True)
class Principal:
    """The signed-in account (or guest account) behind a request."""

    user_id: int
    name: str
    role: str
    guest: bool

    @property
    def can_rank(self) -> bool:
        return self.role in fb.RANKER_ROLES

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class Signer:
    """HMAC signing of small JSON payloads (session tokens, blind A/B pairs)."""

    def __init__(self, secret: bytes):
        self.secret = secret

    @staticmethod
    def from_home(home: Path | None = None) -> "Signer":
        """The secret from env HIVE_APP_SECRET, else HIVE_HOME/app_secret (created once, mode 600)."""
        env = os.environ.get("HIVE_APP_SECRET")
        if env:
            return Signer(env.encode())
        path = (home or hive_home()) / "app_secret"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".app_secret.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
            try:
                os.link(tmp, path)  # first writer wins; others read its secret
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
        return Signer(path.read_text().strip().encode())

    def sign(self, payload: dict) -> str:
        body = base64.urlsafe_b64encode(json.dumps(payload, sort_keys=True).encode()).decode().rstrip("=")
        mac = hmac.new(self.secret, body.encode(), hashlib.sha256).hexdigest()[:40]
        return f"{body}.{mac}"

    def verify(self, token: str) -> dict | None:
        if not isinstance(token, str) or token.count(".") != 1:
            return None
        body, mac = token.split(".")
        good = hmac.new(self.secret, body.encode(), hashlib.sha256).hexdigest()[:40]
        if not hmac.compare_digest(mac, good):
            return None
        try:
            return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        except ValueError:
            return None


class Auth:
    """Sign-in, guest accounts and token checks against the users table."""

    def __init__(self, signer: Signer, anonymous_edit: bool, anonymous_rank: bool):
        self.signer = signer
        self.anonymous_edit = anonymous_edit
        self.anonymous_rank = anonymous_rank

    def token_for(self, user: User) -> str:
        return self.signer.sign({"u": user.id, "exp": int(time.time()) + TOKEN_LIFETIME_S})

    def login(self, name: str, password: str) -> str:
        """A session token for a correct name and password (same message for either mistake)."""
        if not isinstance(name, str) or not isinstance(password, str) or not name.strip() or not password:
            raise AuthError("give a user name and a password")
        with session_scope(write=False) as s:
            user = fb.authenticate(s, name.strip(), password)
        if user is None:
            raise AuthError("wrong user name or password")
        return self.token_for(user)

    def guest(self) -> str:
        """A new guest account and its token, when anonymous use is switched on.

        A guest who may rank gets the annotator role (the database lets only annotators rank);
        the ``guest-`` name prefix and the missing password mark it as anonymous."""
        if not (self.anonymous_edit or self.anonymous_rank):
            raise AuthError("anonymous use is switched off on this server: sign in")
        role = "annotator" if self.anonymous_rank else "visitor"
        with session_scope() as s:
            user = fb.create_user(s, f"guest-{secrets.token_hex(6)}", role)
        return self.token_for(user)

    def principal(self, token: str | None) -> Principal | None:
        """The account behind a token; None for no token; AuthError for a bad or stale one."""
        if not token:
            return None
        payload = self.signer.verify(token)
        if payload is None or not isinstance(payload.get("u"), int):
            raise AuthError("invalid session token: sign in again")
        if payload.get("exp", 0) < time.time():
            raise AuthError("your session has expired: sign in again")
        with session_scope(write=False) as s:
            user = s.get(User, payload["u"])
        if user is None:
            raise AuthError("this account no longer exists")
        return Principal(user.id, user.name, user.role, user.name.startswith("guest-") and user.password_hash is None)

    # -- checks used by every action ---------------------------------------------------------
    def for_edit(self, token: str | None) -> Principal:
        who = self.principal(token)
        if who is None:
            raise AuthError("sign in, or get a guest session, to edit")
        if who.guest and not self.anonymous_edit:
            raise AuthError("anonymous editing is switched off on this server: sign in to edit")
        return who

    def for_rank(self, token: str | None) -> Principal:
        who = self.principal(token)
        if who is None:
            raise AuthError("sign in, or get a guest session, to rank")
        if who.guest and not self.anonymous_rank:
            raise AuthError("anonymous ranking is switched off on this server: sign in as an annotator")
        if not who.can_rank:
            raise AuthError(f"{who.name} is a {who.role} account; ranking and A/B votes need an annotator account")
        return who

    def for_admin(self, token: str | None) -> Principal:
        who = self.principal(token)
        if who is None or not who.is_admin:
            raise AuthError("admins only: sign in with an admin account")
        return who
