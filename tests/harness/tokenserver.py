"""A small Docker token server (the Bearer flow distribution delegates auth to).

distribution verifies each JWT against `auth.token.rootcertbundle`: the signing
key's self-signed certificate goes in the JWT `x5c` header and in that bundle.
containerd with credentials first POSTs an OAuth2 password-grant form to the
realm; skopeo/podman and anonymous clients GET with Basic auth. Both are served.

Runs aiohttp on its own event loop in a thread so sync fixtures can own it.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from .ports import LOOPBACK, free_port

ISSUER = "fleetp2p-test-issuer"
SERVICE = "fleetp2p-test-registry"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenRequest:
    """What a client asked for; tests assert on who authenticated how."""

    method: str
    grant_type: str | None
    username: str | None
    scopes: list[str]
    status: int


@dataclass
class SigningKey:
    """An ES256 key and its self-signed certificate (the registry's trust root)."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def generate(cls) -> "SigningKey":
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleetp2p test token signer")])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            # distribution rejects an x5c leaf without the digitalSignature usage.
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def sign_jwt(self, claims: dict) -> str:
        header = {"typ": "JWT", "alg": "ES256",
                  "x5c": [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()]}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        der = self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)  # JWS wants raw r||s, not DER
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def parse_scope(scope: str) -> dict | None:
    """`repository:team/app:pull,push` → an access claim; None if malformed."""
    head, sep, actions = scope.rpartition(":")
    rtype, sep2, name = head.partition(":")
    if not sep or not sep2 or not name:
        return None
    return {"type": rtype, "name": name, "actions": [a for a in actions.split(",") if a]}


@dataclass
class TokenServer:
    """Issues registry tokens; `users=None` means anonymous clients get tokens too."""

    users: dict[str, str] | None
    issuer: str = ISSUER
    service: str = SERVICE
    ttl: int = 300
    signing: SigningKey = field(default_factory=SigningKey.generate)
    port: int = 0
    requests: list[TokenRequest] = field(default_factory=list)

    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _runner: web.AppRunner | None = None

    @property
    def realm(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/token"

    def write_cert(self, path: Path) -> Path:
        path.write_bytes(self.signing.cert_pem())
        return path

    # HTTP --------------------------------------------------------------

    def _check_user(self, username: str | None, password: str | None) -> bool:
        if self.users is None:
            return True
        return username is not None and self.users.get(username) == password

    def _issue(self, subject: str, scopes: list[str]) -> dict:
        now = int(time.time())
        access = [a for a in (parse_scope(s) for s in scopes) if a is not None]
        claims = {"iss": self.issuer, "sub": subject, "aud": self.service, "exp": now + self.ttl,
                  "nbf": now - 10, "iat": now, "jti": uuid.uuid4().hex, "access": access}
        token = self.signing.sign_jwt(claims)
        issued = dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat()
        return {"token": token, "access_token": token, "expires_in": self.ttl, "issued_at": issued}

    async def _handle(self, request: web.Request) -> web.Response:
        username = password = grant_type = None
        if request.method == "POST":
            form = await request.post()
            grant_type = form.get("grant_type")
            scopes = " ".join(form.getall("scope", [])).split()
            if grant_type == "password":
                username, password = form.get("username"), form.get("password")
            elif grant_type == "refresh_token":
                # Refresh tokens are never handed out here; treat as anonymous.
                pass
            else:
                return self._deny(request, grant_type, None, scopes, 400, "unsupported_grant_type")
        else:
            scopes = [s for value in request.query.getall("scope", []) for s in value.split()]
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("basic ") and username is None:
            try:
                username, _, password = base64.b64decode(auth[6:].strip()).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return self._deny(request, grant_type, None, scopes, 400, "bad basic header")
        if not self._check_user(username, password):
            return self._deny(request, grant_type, username, scopes, 401, "invalid credentials")
        self.requests.append(TokenRequest(request.method, grant_type, username, scopes, 200))
        return web.json_response(self._issue(username or "", scopes))

    def _deny(self, request: web.Request, grant_type: str | None, username: str | None,
              scopes: list[str], status: int, why: str) -> web.Response:
        self.requests.append(TokenRequest(request.method, grant_type, username, scopes, status))
        headers = {"WWW-Authenticate": 'Basic realm="fleetp2p-test-token"'} if status == 401 else {}
        return web.json_response({"errors": [{"code": "UNAUTHORIZED", "message": why}]},
                                 status=status, headers=headers)

    # Lifecycle -----------------------------------------------------------

    def start(self) -> "TokenServer":
        self.port = self.port or free_port()
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        async def serve() -> None:
            app = web.Application()
            app.router.add_route("GET", "/token", self._handle)
            app.router.add_route("POST", "/token", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, LOOPBACK, self.port).start()

        def main() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(serve())
            except BaseException as e:  # surfaced to start()
                failure.append(e)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=main, name="token-server", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise RuntimeError(f"token server failed to start: {failure[0]!r}")
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        if self._runner is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = self._thread = self._runner = None

    def __enter__(self) -> "TokenServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
