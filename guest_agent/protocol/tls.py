"""
Mutual authentication of the channel: TLS 1.3, both ends pinned to the other's certificate.

Sans-I/O, standard library only (the guest has Python and Twisted, nothing more):
:class:`TLSSession` runs one ``ssl.SSLObject`` over two ``ssl.MemoryBIO`` buffers, so the
protocol engine feeds it the payloads of TLS frames and gets plaintext back, and the reverse.

Each VM has its own pair of self-signed certificates, minted on the host
(:mod:`vmcontroller.credentials`): the host's and the agent's.  Each end holds its own key
and certificate and *exactly one* certificate it accepts from the peer: a peer with any
other certificate, even a valid one of another VM, fails the handshake.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import ssl
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, cast

from guest_agent.protocol.errors import AuthenticationFailed, TamperingDetected

#: The version of the serialised credentials (:meth:`Credentials.to_json`).
CREDENTIALS_FORMAT = 1
#: The most plaintext one TLS record carries (RFC 8446, 5.1): each read takes one record.
RECORD_PLAINTEXT_MAX = 16384
#: The most ciphertext a record may carry (RFC 8446, 5.2), after its 5-byte header.
RECORD_CIPHERTEXT_MAX = RECORD_PLAINTEXT_MAX + 256
RECORD_HEADER_SIZE = 5
#: Plaintext encrypted per ``SSLObject.write``: four full records, whose ciphertext (with
#: their headers and tags) is taken out at once, so the memory BIO never grows past it.
SEAL_SPAN = 4 * RECORD_PLAINTEXT_MAX


@dataclass(frozen=True, repr=False)
class Credentials:
    """
    One end's identity: its private key (PKCS#8 DER), its certificate (DER) and the one
    certificate (DER) it accepts from the peer.  ``repr`` leaves the key out, so a
    credentials object in a log or a traceback shows no secret.
    """

    private_key: bytes
    certificate: bytes
    peer_certificate: bytes

    def __repr__(self) -> str:
        return f"<Credentials certificate sha256 {_fingerprint(self.certificate)[:16]}...>"

    def to_json(self) -> bytes:
        """Compact enough for a VirtualBox guest property (under 1 KiB with Ed25519)."""
        return json.dumps(
            {
                "format": CREDENTIALS_FORMAT,
                "key": base64.b64encode(self.private_key).decode(),
                "certificate": base64.b64encode(self.certificate).decode(),
                "peer_certificate": base64.b64encode(self.peer_certificate).decode(),
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Credentials:
        """
        :raises ValueError: ``data`` is not credentials of this format (the message never
            quotes the data: it may hold a key).
        """
        try:
            fields = json.loads(data)
            if not isinstance(fields, dict) or fields.get("format") != CREDENTIALS_FORMAT:
                raise ValueError
            return cls(
                base64.b64decode(fields["key"], validate=True),
                base64.b64decode(fields["certificate"], validate=True),
                base64.b64decode(fields["peer_certificate"], validate=True),
            )
        except (ValueError, KeyError, TypeError, binascii.Error, RecursionError):
            raise ValueError(
                f"not vmcontroller credentials of format {CREDENTIALS_FORMAT} "
                "(JSON with key, certificate and peer_certificate in base64)"
            ) from None


def _fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def _pem(label: str, der: bytes) -> bytes:
    body = base64.b64encode(der).decode()
    lines = "\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return f"-----BEGIN {label}-----\n{lines}\n-----END {label}-----\n".encode()


@contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """
    A path to ``data`` that exists only in memory (``memfd_create``): ``load_cert_chain``
    wants a file name, and the key must not touch a disk.
    """
    fd = os.memfd_create("vmcontroller-credentials", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


class Authenticator:
    """
    The TLS configuration of one end, built once and used for every session.

    :param context: the ``ssl.SSLContext`` (TLS 1.3 only, peer certificate required).
    :param pinned: the DER certificate the peer must present, byte for byte.
    :param server_side: True for the agent.
    """

    def __init__(self, context: ssl.SSLContext, pinned: bytes, server_side: bool) -> None:
        self.context = context
        self.pinned = pinned
        self.server_side = server_side

    @classmethod
    def from_credentials(cls, credentials: Credentials, *, server_side: bool) -> Authenticator:
        """
        :raises AuthenticationFailed: the credentials do not load (a damaged file, a key
            that does not match its certificate).
        """
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
        # TLS 1.3 only: an older version is refused by the handshake itself.
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.maximum_version = ssl.TLSVersion.TLSv1_3
        context.verify_mode = ssl.CERT_REQUIRED
        context.check_hostname = False  # the certificate is pinned; there is no host name
        # No resumption: every session proves both keys afresh; tickets would also be bytes
        # sent after the handshake that the peer never asked for.
        context.options |= ssl.OP_NO_TICKET
        if server_side:
            context.num_tickets = 0
        try:
            with _memory_file(
                _pem("PRIVATE KEY", credentials.private_key) + _pem("CERTIFICATE", credentials.certificate)
            ) as path:
                context.load_cert_chain(path)
            context.load_verify_locations(cadata=credentials.peer_certificate)
        except (ssl.SSLError, ValueError) as e:
            raise AuthenticationFailed(
                f"these credentials do not load ({e}): mint new ones for the VM "
                "(vmcontroller.credentials.CredentialStore.rotate)"
            ) from None
        return cls(context, credentials.peer_certificate, server_side)

    def session(self) -> TLSSession:
        return TLSSession(self)


class _RecordCounter:
    """
    Counts the TLS records that have arrived whole, from their 5-byte headers (type,
    version, length), so that ``SSLObject.read`` is called once per record and never just
    to learn that nothing is left: that call raises ``SSLWantReadError``, which costs as
    much as decrypting a small record (under TCG some 25 us; a ping would pay it twice).
    """

    def __init__(self) -> None:
        self._header = bytearray()
        self._body_left = 0

    def count(self, data: bytes | bytearray | memoryview) -> int:
        """How many records ``data`` (the next bytes of the stream) completes."""
        whole = 0
        at = 0
        end = len(data)
        while at < end:
            if not self._body_left:
                if not self._header and at + RECORD_HEADER_SIZE <= end:
                    # The common case, a header within ``data``: two indexings, no copy
                    # (a bulk transfer passes here once a record, 64 times a megabyte).
                    length = data[at + 3] << 8 | data[at + 4]
                    at += RECORD_HEADER_SIZE
                else:
                    take = min(RECORD_HEADER_SIZE - len(self._header), end - at)
                    self._header += data[at : at + take]
                    at += take
                    if len(self._header) < RECORD_HEADER_SIZE:
                        break
                    length = int.from_bytes(self._header[3:], "big")
                    self._header.clear()
                if not 0 < length <= RECORD_CIPHERTEXT_MAX:
                    # Nothing to wait for: OpenSSL takes an empty record, and refuses an
                    # oversized one, as soon as it reads the header.
                    whole += 1
                    continue
                self._body_left = length
            take = min(self._body_left, end - at)
            self._body_left -= take
            at += take
            if not self._body_left:
                whole += 1
        return whole


class PlaintextReceiver(Protocol):
    """Where :meth:`TLSSession.receive` puts the plaintext it decrypts."""

    def room(self) -> memoryview | None:
        """
        The place the next plaintext belongs, when it has one already (the rest of a frame
        being put together): it is decrypted straight into it, then :meth:`filled` says how
        much came.  None: it goes to :meth:`received` instead.
        """

    def filled(self, size: int) -> None:
        """``size`` bytes were decrypted into the start of the last :meth:`room`."""

    def received(self, plaintext: memoryview) -> None:
        """Plaintext in a buffer that is reused as soon as this returns."""


def _closed_by_peer() -> TamperingDetected:
    return TamperingDetected(
        "the peer closed its TLS session in the middle of ours (neither end of vmcontroller "
        "ever does): dropped the session"
    )


class TLSSession:
    """
    One TLS connection in memory: ciphertext in and out as bytes, plaintext likewise.
    Every failure is one of our exceptions, never ``ssl.SSLError``.
    """

    def __init__(self, authenticator: Authenticator) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._authenticator = authenticator
        self._tls = authenticator.context.wrap_bio(
            self._incoming, self._outgoing, server_side=authenticator.server_side
        )
        self._records = _RecordCounter()
        # Plaintext with no room of its own is decrypted into this buffer and handed on
        # from there: no bytes object per record, no joining them.
        self._plaintext = memoryview(bytearray(RECORD_PLAINTEXT_MAX))
        self.established = False

    def start(self) -> None:
        """Begin the handshake (the client's first flight)."""
        self._handshake()

    @property
    def cipher(self) -> str | None:
        """The cipher suite agreed (``TLS_AES_256_GCM_SHA384``, say), once established."""
        agreed = self._tls.cipher()
        return agreed[0] if agreed else None

    def ciphertext(self) -> bytes:
        """What must go to the peer, in order; the buffer is emptied."""
        return self._outgoing.read() if self._outgoing.pending else b""

    def receive(self, ciphertext: bytes | bytearray | memoryview, receiver: PlaintextReceiver) -> None:
        """
        Take bytes from the peer and give ``receiver`` the plaintext they complete (none
        during the handshake).  After it returns, :attr:`established` may have turned true.

        :raises AuthenticationFailed: the handshake failed: the peer's certificate is not
            the pinned one, it sent none, it offered no TLS 1.3, or its proof did not verify.
        :raises TamperingDetected: after the handshake, a record failed its integrity check.
        """
        self._incoming.write(ciphertext)
        records = self._records.count(ciphertext)
        if not self.established:
            self._handshake()
            if not self.established:
                return
            # The handshake took some of the records: read until OpenSSL has no more.
            records = -1
        tls = self._tls
        while True:
            # A read takes one record, or the part of it a room has space for: what is
            # left of a record is read before the next one.
            if not tls.pending():
                if not records:
                    return
                records -= 1
            room = receiver.room()
            target = self._plaintext if room is None else room
            try:
                # With a buffer, read returns the count (typeshed says bytes).
                size = cast(int, tls.read(len(target), target))
            except ssl.SSLWantReadError:
                # A record that carried no application data (a post-handshake message)
                # made one read take two records.
                return
            except ssl.SSLZeroReturnError:
                raise _closed_by_peer() from None
            except ssl.SSLError as e:
                if "ALERT" in (e.reason or ""):
                    # The peer refused us: in TLS 1.3 a client has finished its handshake
                    # before the server says it rejects the client's certificate.
                    raise AuthenticationFailed(self._explain(e)) from None
                raise TamperingDetected(
                    f"a record from the peer failed TLS's integrity check ({e.reason or e}): "
                    "the channel was tampered with, or bytes were lost"
                ) from None
            if not size:
                # The peer's close_notify.  Every read from now on would return nothing
                # and leave the records in the buffer: the session ends here.
                raise _closed_by_peer()
            if room is None:
                receiver.received(target[:size])
            else:
                receiver.filled(size)

    def seal(self, pieces: Iterable[bytes | memoryview]) -> list[bytes]:
        """
        Encrypt the concatenation of ``pieces`` into records; return their ciphertext in
        chunks of at most four full records (see :data:`SEAL_SPAN`).  Small pieces (frame
        headers, JSON) are joined into one record; a large payload is encrypted straight
        from its buffer, whole records at a time, without being copied first.
        """
        sealed: list[bytes] = []
        small: list[bytes | memoryview] = []
        small_size = 0
        for piece in pieces:
            view = memoryview(piece)
            while view:
                if not small:
                    whole = min(len(view), SEAL_SPAN) // RECORD_PLAINTEXT_MAX * RECORD_PLAINTEXT_MAX
                    if whole:
                        sealed.append(self._encrypt(view[:whole]))
                        view = view[whole:]
                        continue
                part = view[: RECORD_PLAINTEXT_MAX - small_size]
                small.append(part)
                small_size += len(part)
                view = view[len(part) :]
                if small_size == RECORD_PLAINTEXT_MAX:
                    sealed.append(self._encrypt(b"".join(small)))
                    small.clear()
                    small_size = 0
        if small:
            sealed.append(self._encrypt(b"".join(small)))
        return sealed

    def _encrypt(self, plaintext: bytes | memoryview) -> bytes:
        try:
            self._tls.write(plaintext)
        except ssl.SSLError as e:  # only after a fatal error of our own, which already raised
            raise TamperingDetected(f"the TLS session cannot send any more ({e})") from None
        return self._outgoing.read()

    def _handshake(self) -> None:
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            return
        except ssl.SSLCertVerificationError as e:
            raise AuthenticationFailed(
                f"the {self._peer_name} presented a certificate that is not the one pinned for this "
                f"VM ({e.verify_message}): it is another VM's, stale, or not ours"
            ) from None
        except ssl.SSLError as e:
            raise AuthenticationFailed(self._explain(e)) from None
        presented = self._tls.getpeercert(binary_form=True)
        if presented != self._authenticator.pinned:
            # The chain check already limits the peer to the pinned certificate; this is the
            # pin itself, byte for byte, so nothing else can ever pass.
            raise AuthenticationFailed(
                f"the {self._peer_name}'s certificate is not the one pinned for this VM"
            )
        self.established = True

    @property
    def _peer_name(self) -> str:
        return "host" if self._authenticator.server_side else "agent"

    def _explain(self, error: ssl.SSLError) -> str:
        reason = error.reason or str(error)
        hints = {
            "PEER_DID_NOT_RETURN_A_CERTIFICATE": f"the {self._peer_name} has no credentials for this VM",
            "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the agent requires a certificate and this end sent none",
            "UNSUPPORTED_PROTOCOL": f"the {self._peer_name} offered no TLS 1.3",
            "TLSV1_ALERT_PROTOCOL_VERSION": f"the {self._peer_name} refused our TLS version (only 1.3)",
            "DECRYPT_ERROR": "a handshake message did not verify: a replayed or altered handshake",
            "DECRYPTION_FAILED_OR_BAD_RECORD_MAC": "a handshake message did not verify: a replayed "
            "or altered handshake",
            "TLSV1_ALERT_DECRYPT_ERROR": "the peer could not verify our handshake",
            "TLSV1_ALERT_UNKNOWN_CA": f"the {self._peer_name} does not accept this end's certificate "
            "(credentials of another VM, or stale ones: rotate them)",
            "SSLV3_ALERT_BAD_CERTIFICATE": f"the {self._peer_name} rejected this end's certificate",
        }
        hint = hints.get(reason, "the handshake broke")
        return f"TLS handshake with the {self._peer_name} failed: {hint} ({reason})"


__all__ = ["CREDENTIALS_FORMAT", "Authenticator", "Credentials", "PlaintextReceiver", "TLSSession"]

