"""Cross-site request protection: for the page's one form, "Verify now" (a POST), and against other
sites loading the pages as images, scripts or frames.

Verification walks the whole chain and changes what the badge says, so no other site may make the
operator's browser run it (`<img src=…/verify>`, an auto-submitted form, a fetch). What serious
applications do is layered, and so is this: Django's CsrfViewMiddleware checks the Origin (or Referer)
and a token, Rails checks a token and, with `forgery_protection_origin_check`, the Origin; Go 1.25's
`net/http.CrossOriginProtection` relies on `Sec-Fetch-Site` and `Origin` alone; OWASP's cheat sheet
recommends a token with fetch metadata as defence in depth.

1. Fetch metadata: every current browser says in `Sec-Fetch-Site` where a request comes from. A POST
   is refused unless it says `same-origin` (our own page) or `none` (the user's own doing, e.g. typed);
   `cross-site` and `same-site` (another port on this machine, a sibling subdomain, whose requests carry
   even a SameSite=Strict cookie) are refused.
2. Origin: when present it must name this page's host and port (the Host header); `null` (a sandboxed
   frame, a cross-origin redirect) is refused. Browsers without fetch metadata still send it on a POST.
   (The pages use `Referrer-Policy: same-origin`: under `no-referrer` a browser sends `Origin: null`
   even for a page's own form.)
3. A per-page token (the synchronizer token, kept stateless): each rendered page carries
   `issued.nonce.mac`, mac = HMAC-SHA256 of `issued.nonce` under a secret drawn when the process starts,
   and the POST must return one at most `MAX_AGE` old. Another site cannot read our pages (same-origin
   policy; the Host check refuses DNS rebinding), so it cannot get one, and a client that sends neither
   header (an old browser, a plugin) is stopped all the same. The page has no accounts (whoever may load
   it is the operator), so the token is not bound to a session: it proves that the form came from a page
   this process served. A restart draws a new secret; an old page's button then answers 403, saying to
   reload.

aiohttp has no CSRF protection of its own, and the add-ons for it on PyPI are barely kept (aiohttp-csrf's
last release is from 2020, aiohttp-csrf2 has had one since); these few lines are easier to review.

GET requests change nothing, but each one is a database read (a search over every row's data, a
whole-log download), so another site may not make the browser load them in the background either: a
request that fetch metadata marks as coming from another site is refused unless it is a top-level
navigation (a link followed, which stays allowed: links to a run are shared in chat). This is the
"resource isolation policy" of web.dev's fetch-metadata guide.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from urllib.parse import urlsplit

from aiohttp import web

MAX_AGE = 12 * 3600  # seconds a page's form stays usable (a page left open overnight asks for a reload)
FIELD = "csrf"
ALLOWED_SITES = ("same-origin", "none")


class FormTokens:
    """Issues and checks the per-page tokens under this process's secret."""

    def __init__(self) -> None:
        self._secret = secrets.token_bytes(32)

    def issue(self) -> str:
        body = f"{int(time.time())}.{secrets.token_urlsafe(12)}"
        return f"{body}.{self._mac(body)}"

    def valid(self, token: str) -> bool:
        body, _, mac = token.rpartition(".")
        issued = body.partition(".")[0]
        if not (issued.isascii() and issued.isdigit()) or not hmac.compare_digest(mac, self._mac(body)):
            return False
        return 0 <= time.time() - int(issued) <= MAX_AGE

    def _mac(self, body: str) -> str:
        return hmac.new(self._secret, f"chatops audit form|{body}".encode(), hashlib.sha256).hexdigest()


def foreign_origin(request: web.Request) -> str | None:
    """Why this request did not come from one of our own pages (by its fetch metadata and Origin), or None."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site.lower() not in ALLOWED_SITES:
        return f"the browser says it came from another site (Sec-Fetch-Site: {site[:40]})"
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    parts = urlsplit(origin)
    if origin == "null" or parts.scheme not in ("http", "https") or parts.netloc.lower() != request.host.lower():
        return f"it came from another origin ({origin[:80]})"
    return None


def foreign_load(request: web.Request) -> bool:
    """Whether another site is loading this page in the background (not a link the user followed)."""
    site = request.headers.get("Sec-Fetch-Site", "none").lower()
    if site in ALLOWED_SITES:
        return False
    navigation = request.headers.get("Sec-Fetch-Mode", "").lower() == "navigate"
    return not (navigation and request.headers.get("Sec-Fetch-Dest", "").lower() == "document")
