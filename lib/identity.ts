// The caller's Consul service identity, read from its TLS client certificate once per connection
// and cached, so the per-request cost is a WeakMap lookup and a clock comparison.
// Rules (docs/semantics.md#identity): the chain verified against the current roots, exactly one URI SAN,
// a Consul *service* SPIFFE ID whose trust domain is the roots' TrustDomain, and a certificate that
// is valid at request time. Nothing the client chooses (SNI, headers) contributes.
// Cost (docs/semantics.md#identity-cache): a new connection from a leaf already seen under the current
// roots costs one read of the TLS session and a map lookup; parsing the certificate and walking its
// chain happen once per leaf and roots generation, not once per connection.
import { X509Certificate } from 'node:crypto'
import { LRUCache } from 'lru-cache'
import type { Socket } from 'node:net'
import type { TLSSocket, DetailedPeerCertificate } from 'node:tls'
import { newRuleMemo } from './intentions/policy'
import type { RuleMemo } from './intentions/policy'
import { parseSpiffeId, parseSubjectAltNames, serviceSpiffeId } from './spiffe'

/** A verified caller, exposed as `request.consulSource`. */
export interface ServiceIdentity {
  readonly uri: string
  readonly trustDomain: string
  readonly partition: string
  readonly namespace: string
  readonly datacenter: string
  readonly service: string
}

/** What the current CA roots say about whom to trust. */
export interface TrustAnchors {
  readonly trustDomain: string
  readonly roots: readonly X509Certificate[]
  /**
   * The roots' `IntermediateCerts` (cross-signed roots, datacenter intermediates): a resumed
   * session carries no peer chain, so a re-check links the leaf to a root through these.
   */
  readonly intermediates?: readonly X509Certificate[]
}

/** The outcome for one connection: an identity, or the reason there is none (for logs only). */
export interface PeerIdentity {
  readonly identity: ServiceIdentity | null
  readonly reason: string
  readonly notBefore: number
  readonly notAfter: number
  readonly epoch: number
  /** The decision engine's memo of this identity's rule (null without an identity). */
  readonly rules: RuleMemo | null
}

/** Anything Node gives as a request on a TLS connection (HTTP/1 `IncomingMessage`, HTTP/2 compat request). */
export interface TlsRequest {
  readonly socket: Socket | TLSSocket
  readonly stream?: { readonly session?: object & { readonly socket?: Socket | TLSSocket } }
}

const CLIENT_AUTH_OID = '1.3.6.1.5.5.7.3.2'
const EXPIRED: PeerIdentity = Object.freeze({ identity: null, reason: 'certificate expired or not yet valid', notBefore: 0, notAfter: Infinity, epoch: -1, rules: null })
// Distinct client leaves remembered per roots generation. Consul leaves rotate in days, so this
// is every instance of every caller many times over; an evicted leaf is only parsed again.
const LEAF_CACHE_MAX = 4096

/**
 * Resolves and caches peer identities per connection. The trust epoch changes with every roots
 * update; a connection whose handshake predates the current epoch has its chain re-checked
 * against the current roots before its identity is trusted again.
 */
export class IdentityResolver {
  #trust: TrustAnchors | null = null
  #epoch = 0
  #byConnection = new WeakMap<object, PeerIdentity>()
  #connectEpoch = new WeakMap<object, number>()
  /**
   * Outcome per exact client leaf (its DER), for the epoch in `PeerIdentity.epoch`: present only
   * once the leaf was shown to chain to that epoch's roots, by OpenSSL in a handshake under them
   * or by a chain walk. A stale epoch is never used.
   */
  readonly #byLeaf = new LRUCache<string, PeerIdentity>({ max: LEAF_CACHE_MAX })
  /** False once a session was found whose certificate is not the peer's: Node's slower API from then on. */
  #sessionReadable = true

  /** Installs new roots; identities cached under older roots are re-validated on their next use. */
  setTrust (trust: TrustAnchors): void {
    this.#trust = trust
    this.#epoch++
  }

  /** Called from each server's `connection` event: the raw socket is about to handshake with the current context. */
  noteConnection (rawSocket: object): void {
    this.#connectEpoch.set(rawSocket, this.#epoch)
  }

  /** The verified identity behind a request (`identity` null, with the `reason`, when none). `now` is `Date.now()`. */
  peer (req: TlsRequest, now: number): PeerIdentity {
    const session = req.stream?.session
    const key = connectionOf(req)
    let cached = this.#byConnection.get(key)
    if (cached === undefined || cached.epoch !== this.#epoch) {
      const socket = (session?.socket ?? req.socket) as TLSSocket
      cached = this.#resolve(socket, now)
      this.#byConnection.set(key, cached)
    }
    if (now < cached.notBefore || now >= cached.notAfter) return EXPIRED
    return cached
  }

  #resolve (socket: TLSSocket, now: number): PeerIdentity {
    const epoch = this.#epoch
    const trust = this.#trust
    if (trust === null) return noIdentity('no CA roots loaded yet', epoch)
    if (typeof socket.getPeerX509Certificate !== 'function') return noIdentity('not a TLS connection', epoch)
    if (socket.authorized !== true) {
      // Node reports a client that sent no certificate as unverified too (UNABLE_TO_GET_ISSUER_CERT).
      if (socket.getPeerX509Certificate() === undefined) return noIdentity('no client certificate', epoch)
      return noIdentity(`client certificate not verified: ${String(socket.authorizationError ?? 'no reason given')}`, epoch)
    }
    // A leaf already shown to chain to the current roots needs nothing more: this connection
    // proved it holds the leaf's key (in its handshake, or in the one its session resumes).
    const sessionLeaf = this.#sessionReadable ? leafOfSession(socket) : undefined
    const known = sessionLeaf === undefined ? undefined : this.#byLeaf.get(sessionLeaf)
    if (known !== undefined && known.epoch === epoch) return known

    // The handshake verified the chain against the roots of its time. If the roots changed since
    // (or we cannot tell when it happened), or the session was resumed (verified when it was first
    // established, perhaps under older roots), check the chain against the current roots.
    const handshakeEpoch = this.#connectEpoch.get((socket as unknown as { _parent?: object })._parent ?? socket)
    const resumed = socket.isSessionReused()
    const recheck = handshakeEpoch !== epoch || resumed
    // Node drops the detailed chain once getPeerX509Certificate() was called: read it first. A
    // resumed session has none; the roots' intermediates stand in for it.
    const peerChain = recheck && !resumed ? peerChainOf(socket) : []
    // A resumed TLS 1.3 session that never carried a certificate reports authorized === true.
    const cert = socket.getPeerX509Certificate()
    if (cert === undefined) return noIdentity('no client certificate', epoch)
    const der = cert.raw.toString('latin1')
    if (sessionLeaf !== der) {
      // No session to read (or, never seen, a build whose session holds another certificate
      // than the peer's: it is not read again). The leaf may still be known.
      if (sessionLeaf !== undefined) this.#sessionReadable = false
      const seen = this.#byLeaf.get(der)
      if (seen !== undefined && seen.epoch === epoch) return seen
    }
    if (recheck && !chainsToCurrentRoots(cert, [...peerChain, ...(trust.intermediates ?? [])], trust.roots, now)) {
      return noIdentity('client certificate does not chain to the current CA roots', epoch)
    }
    const peer = identityFromCertificate(cert, trust.trustDomain, epoch)
    this.#byLeaf.set(der, peer)
    return peer
  }
}

/**
 * The DER of the peer's certificate (as a latin1 string, the leaf cache's key) from the connection's
 * TLS session, or undefined. Much cheaper than getPeerX509Certificate() on a fresh connection:
 * OpenSSL's session encoding (`SSL_SESSION_ASN1`) is a SEQUENCE whose `[3]` element is the peer
 * certificate, the same one OpenSSL verified and Node reports. The session holds the session's
 * secrets too: the copy is zeroed once read.
 */
export function leafOfSession (socket: TLSSocket): string | undefined {
  const session = typeof socket.getSession === 'function' ? socket.getSession() : undefined
  if (session === undefined) return undefined
  const leaf = peerCertificateOfSession(session)
  const key = leaf === undefined ? undefined : session.toString('latin1', leaf.start, leaf.end)
  session.fill(0)
  return key
}

/** Where the `[3]` peer certificate lies in an encoded OpenSSL session, or undefined. */
export function peerCertificateOfSession (der: Uint8Array): { start: number, end: number } | undefined {
  const outer = readTlv(der, 0)
  if (outer === null || outer.tag !== 0x30 || outer.end !== der.length) return undefined
  for (let at = outer.start; at < outer.end;) {
    const field = readTlv(der, at)
    if (field === null || field.end > outer.end) return undefined
    if (field.tag === 0xa3) {
      const cert = readTlv(der, field.start)
      return cert !== null && cert.tag === 0x30 && cert.end === field.end ? { start: field.start, end: cert.end } : undefined
    }
    at = field.end
  }
  return undefined
}

/** One DER tag-length-value at `at`: the tag, where its content starts and where it ends. Definite lengths only. */
function readTlv (der: Uint8Array, at: number): { tag: number, start: number, end: number } | null {
  if (at + 2 > der.length) return null
  const tag = der[at] as number
  let length = der[at + 1] as number
  let start = at + 2
  if (length > 0x80) {
    const bytes = length - 0x80
    if (bytes > 3 || start + bytes > der.length) return null
    length = 0
    for (let i = 0; i < bytes; i++) length = length * 256 + (der[start + i] as number)
    start += bytes
  } else if (length === 0x80) {
    return null
  }
  const end = start + length
  return end > der.length ? null : { tag, start, end }
}

/** The connection a request came on: HTTP/2 gives a new socket proxy per stream, so there it is the session. */
export function connectionOf (req: TlsRequest): object {
  return req.stream?.session ?? req.socket
}

/** Identity from a verified leaf certificate (pure; exported for tests). */
export function identityFromCertificate (cert: X509Certificate, trustDomain: string, epoch = 0): PeerIdentity {
  const sans = parseSubjectAltNames(cert.subjectAltName)
  if (sans === null) return noIdentity('unreadable subjectAltName', epoch)
  if (sans.uris.length !== 1 || sans.quotedUris !== 0) {
    return noIdentity(`expected exactly one URI SAN, found ${sans.uris.length}${sans.quotedUris > 0 ? ' (quoted)' : ''}`, epoch)
  }
  // A CA certificate is never a caller, whatever it names (docs/semantics.md#paths-canonical-identity).
  // (X509Certificate#ca is not this: OpenSSL also requires keyCertSign when a key usage is present.)
  if (isCaCertificate(cert.raw)) return noIdentity('client certificate is a CA certificate (basicConstraints CA:TRUE)', epoch)
  // Consul leaves carry clientAuth; OpenSSL checks it too, this keeps the rule explicit.
  const eku = cert.keyUsage
  if (eku !== undefined && !eku.includes(CLIENT_AUTH_OID)) return noIdentity('certificate lacks the clientAuth extended key usage', epoch)
  const uri = sans.uris[0] as string
  const id = parseSpiffeId(uri)
  if (id === null) return noIdentity(`not a Consul SPIFFE ID: ${uri}`, epoch)
  if (id.kind !== 'service') return noIdentity(`not a service identity (${id.kind}): ${uri}`, epoch)
  if (id.trustDomain !== trustDomain.toLowerCase()) {
    return noIdentity(`trust domain ${id.trustDomain} is not ${trustDomain}`, epoch)
  }
  // One identity, one spelling: the ID must be written exactly as Consul writes it (docs/semantics.md#paths-canonical-identity).
  const canonical = serviceSpiffeId(id.trustDomain, id)
  if (uri !== canonical) return noIdentity(`SPIFFE ID ${uri} is not in Consul's canonical form (${canonical})`, epoch)
  const identity: ServiceIdentity = Object.freeze({
    uri,
    trustDomain: id.trustDomain,
    partition: id.partition,
    namespace: id.namespace,
    datacenter: id.datacenter,
    service: id.service
  })
  const notBefore = Date.parse(cert.validFrom)
  const notAfter = Date.parse(cert.validTo)
  // An unreadable date must not mean "never expires".
  if (Number.isNaN(notBefore) || Number.isNaN(notAfter)) return noIdentity('unreadable certificate validity dates', epoch)
  return Object.freeze({ identity, reason: 'verified', notBefore, notAfter, epoch, rules: newRuleMemo() })
}

function noIdentity (reason: string, epoch: number): PeerIdentity {
  return Object.freeze({ identity: null, reason, notBefore: -Infinity, notAfter: Infinity, epoch, rules: null })
}

/** The certificates the peer sent above its leaf (issuer first), from Node's detailed chain. */
export function peerChainOf (socket: TLSSocket): X509Certificate[] {
  const chain: X509Certificate[] = []
  const seen = new Set<DetailedPeerCertificate>()
  let node: DetailedPeerCertificate | undefined = socket.getPeerCertificate(true)?.issuerCertificate
  while (node?.raw !== undefined && !seen.has(node)) {
    seen.add(node)
    chain.push(new X509Certificate(node.raw))
    node = node.issuerCertificate
  }
  return chain
}

/**
 * True when `leaf` links, certificate by certificate, to one of the current roots: each is issued
 * and signed by the next (taken from `candidates`: the chain the peer sent, the roots'
 * intermediates) and valid at `now`, and the last is a current root or signed by one.
 */
export function chainsToCurrentRoots (leaf: X509Certificate, candidates: readonly X509Certificate[], roots: readonly X509Certificate[], now: number): boolean {
  const seen = new Set<string>([leaf.fingerprint256])
  let cert = leaf
  for (;;) {
    if (!validAt(cert, now)) return false
    for (const root of roots) {
      if (cert.fingerprint256 === root.fingerprint256) return true
      if (cert.checkIssued(root) && cert.verify(root.publicKey)) return true
    }
    const issuer = candidates.find((c) => !seen.has(c.fingerprint256) && cert.checkIssued(c) && cert.verify(c.publicKey))
    if (issuer === undefined) return false
    seen.add(issuer.fingerprint256)
    cert = issuer
  }
}

function validAt (cert: X509Certificate, now: number): boolean {
  return now >= Date.parse(cert.validFrom) && now < Date.parse(cert.validTo)
}

const BASIC_CONSTRAINTS_OID = Buffer.from([0x55, 0x1d, 0x13]) // 2.5.29.19

/**
 * Whether a DER certificate's basicConstraints says CA:TRUE, read by walking its structure:
 * Certificate → tbsCertificate → [3] extensions → the basicConstraints extension. A certificate
 * whose structure cannot be walked counts as a CA (fail closed); TLS already parsed it, so that
 * does not happen for a verified peer.
 */
export function isCaCertificate (der: Buffer): boolean {
  const certificate = tlv(der, 0)
  if (certificate === null) return true
  const tbs = tlv(der, certificate.start)
  if (tbs === null) return true
  for (let at = tbs.start; at < tbs.end;) {
    const field = tlv(der, at)
    if (field === null) return true
    if (der[at] === 0xa3) {
      const extensions = tlv(der, field.start)
      if (extensions === null) return true
      for (let e = extensions.start; e < extensions.end;) {
        const extension = tlv(der, e)
        if (extension === null) return true
        const oid = tlv(der, extension.start)
        if (oid === null) return true
        if (der.subarray(oid.start, oid.end).equals(BASIC_CONSTRAINTS_OID)) {
          const critical = der[oid.end] === 0x01 ? tlv(der, oid.end) : oid
          // An OCTET STRING holding BasicConstraints ::= SEQUENCE { cA BOOLEAN DEFAULT FALSE, ... }
          const value = critical === null ? null : tlv(der, critical.end)
          const sequence = value === null ? null : tlv(der, value.start)
          if (sequence === null) return true
          return sequence.start < sequence.end && der[sequence.start] === 0x01 && der[sequence.start + 2] !== 0x00
        }
        e = extension.end
      }
      return false
    }
    at = field.end
  }
  return false
}

/** One DER TLV at `at`: where its contents start and end, or null when malformed. */
function tlv (der: Buffer, at: number): { start: number, end: number } | null {
  if (at + 2 > der.length) return null
  let length = der[at + 1] as number
  let start = at + 2
  if (length >= 0x80) {
    const bytes = length & 0x7f
    if (bytes === 0 || bytes > 4 || start + bytes > der.length) return null
    length = 0
    for (let i = 0; i < bytes; i++) length = length * 256 + (der[start + i] as number)
    start += bytes
  }
  const end = start + length
  return end > der.length ? null : { start, end }
}
