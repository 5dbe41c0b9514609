"""The TLS channel binding a handshake is bound to: ``tls-server-end-point``.

Why this one. The binding must be something both ends compute on their own
and a relay that terminates TLS on both sides cannot make equal. RFC 9266's
``tls-exporter`` (RFC 5705 keying material) is the right tool for TLS 1.3,
but Python's ssl module has no exporter (CPython issue gh-82133, open
since 2019; its pull request #25255 is unmerged);
``tls-unique`` (``SSLObject.get_channel_binding``) is defined only up to TLS
1.2 (RFC 8446 C.5), and our links negotiate 1.3. What remains well defined
for every version is ``tls-server-end-point`` (RFC 5929 section 4): a hash
of the server's certificate. The client reads it from the connection
(``getpeercert(binary_form=True)`` returns it even without verification);
the server knows its own. A relay cannot present the server's certificate
without the server's private key, so the two ends see different
certificates, their proofs cover different bindings and the handshake
fails. We hash with SHA-256 whatever the certificate's signature algorithm
(RFC 5929 picks the signature's hash; both ends here are patio).

The server side. Python cannot read the certificate a server context
presents, so :func:`server_certificate` asks it: an in-memory TLS handshake
(``MemoryBIO``, no socket) between the context and a throwaway client, which
reads the certificate the server sent. It costs a few milliseconds, so it is
remembered per context; a listener whose certificate is reloaded in place
(``load_cert_chain`` on the same context, as the worker does on rotation)
is probed again by ``TCPBroker.set_ssl_contexts`` (the worker calls it after
reloading), and otherwise when a proof fails (at most once a second), so
only the first connection after an unannounced reload fails.
"""

from __future__ import annotations

import hashlib
import ssl
import time
import weakref
from typing import Final

_PREFIX: Final = b"tls-server-end-point:"
#: Least time between two probes of one context after a failed proof.
REPROBE_INTERVAL: Final = 1.0

_certificates: weakref.WeakKeyDictionary[ssl.SSLContext, tuple[bytes, float]] = (
    weakref.WeakKeyDictionary()
)


def end_point(certificate: bytes) -> bytes:
    """The binding for a server presenting ``certificate`` (DER)."""
    return _PREFIX + hashlib.sha256(certificate).digest()


def _probe(context: ssl.SSLContext) -> bytes:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    ours = client.wrap_bio(to_client, to_server)
    theirs = context.wrap_bio(server_in, server_out, server_side=True)
    error: Exception | None = None
    for _ in range(8):  # a TLS handshake takes two or three flights
        for side in (ours, theirs):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                error = exc
        server_in.write(to_server.read())
        to_client.write(server_out.read())
        try:
            certificate = ours.getpeercert(binary_form=True)
        except ValueError:  # the client's handshake is not done yet
            continue
        if certificate:
            return certificate
    raise ValueError(
        "cannot read the certificate this TLS server context presents, which the "
        f"handshake is bound to ({error or 'no certificate was sent'}); give the listener a "
        "context with a certificate (load_cert_chain) that allows TLS 1.3"
    )


def server_certificate(context: ssl.SSLContext, *, refresh: bool = False) -> bytes:
    """The certificate (DER) ``context`` presents to a client.

    ``refresh`` probes again (a proof failed: the certificate may have been
    reloaded in place), at most once per :data:`REPROBE_INTERVAL`.
    """
    known = _certificates.get(context)
    now = time.monotonic()
    if known is not None and not (refresh and now - known[1] >= REPROBE_INTERVAL):
        return known[0]
    return reload(context)


def reload(context: ssl.SSLContext) -> bytes:
    """Read the certificate ``context`` presents now (after ``load_cert_chain``)."""
    certificate = _probe(context)
    _certificates[context] = (certificate, time.monotonic())
    return certificate


def for_client(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> bytes:
    """The binding of a TLS connection as its client computes it."""
    certificate = ssl_object.getpeercert(binary_form=True)
    if not certificate:
        raise ValueError("the TLS server sent no certificate to bind the handshake to")
    return end_point(certificate)
