// Where the leaf and the CA roots come from (docs/semantics.md#certificate-sources). A source
// pushes material into a sink that installs it (the sink throws when it rejects an update, and the
// last good material stays); everything downstream (TLS contexts, identity, enforcement) is the
// same whatever the source.
import { createPrivateKey, X509Certificate } from 'node:crypto'
import type { WatchLogger } from '../agent/watch'
import { parseSubjectAltNames } from '../spiffe'
import type { SubjectAltNames } from '../spiffe'

/** The service's own certificate: the chain it serves and its key. */
export interface LeafCertificate {
  /** The leaf followed by its intermediates, served as-is. */
  readonly chainPem: string
  readonly keyPem: string
  /** Colon-separated lower-case hex, as Consul writes it (`1d:4f`). */
  readonly serial: string
  /** The leaf's SPIFFE ID. */
  readonly uri: string
  /** RFC 3339. */
  readonly validAfter: string
  readonly validBefore: string
}

/** What to trust: the trust domain and every root, active or not. */
export interface TrustBundle {
  readonly trustDomain: string
  readonly rootPems: readonly string[]
  /** Intermediates that link leaves to the roots (cross-signed roots); never trusted on their own. */
  readonly intermediatePems: readonly string[]
  readonly activeRootId: string
  readonly rootIds: readonly string[]
}

/** How one part of a source is doing, as `status().watches` reports it. */
export interface SourceHealth {
  readonly lastSuccess: Date | null
  /** The current problem; null when healthy. */
  readonly lastError: Error | null
  /** Consecutive failures. */
  readonly failures: number
}

export type SourcePart = 'leaf' | 'roots'

export interface CertificateSink {
  /** Installs new material (either part or both at once); throws when it is rejected. */
  update (change: { leaf?: LeafCertificate, trust?: TrustBundle }): void
  /** A failed fetch or a rejected update: counted, emitted as `sync-error`, last good kept. */
  failure (part: SourcePart, error: Error): void
}

export interface CertificateSource {
  /** Who renews the leaf, for the expiry warning: `the agent`, `the Consul servers`, ... */
  readonly renewer: string
  /** Starts delivering into `sink`; never throws for a failure of the outside world. */
  start (sink: CertificateSink): void
  /** Stops every timer, stream and watcher it started. */
  stop (): void
  /** Health per part (`leaf`, `roots`), reported by `status().watches`. */
  health (): Record<SourcePart, SourceHealth>
}

export type SourceLogger = WatchLogger

/** Consul's serial spelling: colon-separated lower-case hex of the big-endian bytes. */
export function consulSerial (cert: X509Certificate): string {
  const hex = cert.serialNumber.toLowerCase()
  return hex.padStart(hex.length + (hex.length % 2), '0').replace(/(..)(?!$)/g, '$1:')
}

/** RFC 3339 without fractions, the form Consul's JSON uses. */
export function rfc3339 (date: Date): string {
  return date.toISOString().replace('.000Z', 'Z')
}

const PEM_BLOCK = /-----BEGIN ([A-Z0-9 ]+)-----\r?\n[\s\S]*?-----END \1-----\r?\n?/g

/** The PEM blocks of `text`, each with its type and newline-terminated text. */
export function pemBlocks (text: string): Array<{ type: string, pem: string }> {
  const blocks: Array<{ type: string, pem: string }> = []
  for (const match of text.matchAll(PEM_BLOCK)) {
    const pem = match[0]
    blocks.push({ type: match[1] as string, pem: pem.endsWith('\n') ? pem : `${pem}\n` })
  }
  return blocks
}

/**
 * A leaf from PEM text: the chain (leaf first) and a key that must belong to the leaf. Throws an
 * Error saying what is wrong, so a half-written or mismatched pair is never installed.
 */
export function leafFromPem (chainPem: string, keyPem: string): LeafCertificate {
  const certs = pemBlocks(chainPem).filter((block) => block.type === 'CERTIFICATE')
  if (certs.length === 0) throw new Error('no CERTIFICATE block')
  const chain = certs.map((block) => block.pem)
  const leaf = new X509Certificate(chain[0] as string)
  let key
  try {
    key = createPrivateKey(keyPem)
  } catch (err) {
    throw new Error(`private key unreadable: ${(err as Error).message}`, { cause: err })
  }
  if (!leaf.checkPrivateKey(key)) throw new Error('the private key does not belong to the leaf certificate')
  // Node prints subjectAltName in the grammar parseSubjectAltNames reads; a certificate without the extension gives no URIs.
  const uri = (parseSubjectAltNames(leaf.subjectAltName) as SubjectAltNames).uris.find((u) => u.startsWith('spiffe://'))
  if (uri === undefined) throw new Error('the leaf certificate has no spiffe:// URI SAN')
  return {
    chainPem: chain.join(''),
    keyPem,
    serial: consulSerial(leaf),
    uri,
    validAfter: rfc3339(new Date(leaf.validFrom)),
    validBefore: rfc3339(new Date(leaf.validTo))
  }
}
