// What any certificate source's material must be before it is put in force (docs/semantics.md#last-good):
// checks of data, no I/O. lib/sync.ts rejects or holds back what fails them.
import { createPrivateKey, X509Certificate } from 'node:crypto'
import { chainsToCurrentRoots } from '../identity'
import { pemBlocks } from './source'
import type { LeafCertificate, TrustBundle } from './source'

/**
 * Why a leaf cannot be served with `roots`: it becomes valid later, or the roots do not sign it
 * (both may change), or it has expired (it never will).
 */
export type LeafHold = { readonly kind: 'not-yet-valid', readonly until: number, readonly reason: string }
  | { readonly kind: 'unsigned' | 'expired', readonly reason: string }

/** The leaf's first certificate; throws when the chain has none. */
export function leafCertificateOf (leaf: Pick<LeafCertificate, 'chainPem' | 'serial'>): X509Certificate {
  const first = pemBlocks(leaf.chainPem).find((block) => block.type === 'CERTIFICATE')
  if (first === undefined) throw new Error(`the leaf (serial ${leaf.serial}) has no CERTIFICATE block`)
  return new X509Certificate(first.pem)
}

/** Throws for a leaf that can never be served: a chain that does not parse, expired, or its key is not the certificate's. */
export function checkLeaf (leaf: LeafCertificate, now: number): void {
  const cert = leafCertificateOf(leaf)
  try {
    chainOf(leaf)
  } catch (err) {
    throw new Error(`the leaf's (serial ${leaf.serial}) chain is unreadable: ${(err as Error).message}`, { cause: err })
  }
  const expired = expiry(leaf, cert, now)
  if (expired !== null) throw new Error(expired)
  let key
  try {
    key = createPrivateKey(leaf.keyPem)
  } catch (err) {
    throw new Error(`the leaf's (serial ${leaf.serial}) private key is unreadable: ${(err as Error).message}`, { cause: err })
  }
  if (!cert.checkPrivateKey(key)) throw new Error(`the leaf's (serial ${leaf.serial}) private key does not belong to its certificate`)
}

function expiry (leaf: Pick<LeafCertificate, 'serial'>, cert: X509Certificate, now: number): string | null {
  return Date.parse(cert.validTo) <= now ? `the leaf (serial ${leaf.serial}) expired at ${cert.validTo}` : null
}

/**
 * Null when `leaf` can be served with `roots` now; otherwise why it waits. Not a rejection: during a
 * CA rotation the new leaf may arrive before the roots that sign it.
 */
export function leafHold (leaf: LeafCertificate, roots: TrustBundle, now: number): LeafHold | null {
  const cert = leafCertificateOf(leaf)
  // Held until it expired: it will never serve.
  const expired = expiry(leaf, cert, now)
  if (expired !== null) return { kind: 'expired', reason: expired }
  const validFrom = Date.parse(cert.validFrom)
  if (validFrom > now) return { kind: 'not-yet-valid', until: validFrom, reason: `the leaf (serial ${leaf.serial}) is not valid before ${cert.validFrom}` }
  const domain = hostOf(leaf.uri)
  if (domain.toLowerCase() !== roots.trustDomain.toLowerCase()) {
    return { kind: 'unsigned', reason: `the leaf (serial ${leaf.serial}) names ${leaf.uri}, outside trust domain ${roots.trustDomain}` }
  }
  const intermediates = [...chainOf(leaf), ...roots.intermediatePems.map((pem) => new X509Certificate(pem))]
  if (!chainsToCurrentRoots(cert, intermediates, roots.rootPems.map((pem) => new X509Certificate(pem)), now)) {
    return { kind: 'unsigned', reason: `the leaf (serial ${leaf.serial}) does not chain to the CA roots in force` }
  }
  return null
}

/** The certificates after the leaf's own in its chain (checkLeaf has parsed them once already). */
function chainOf (leaf: LeafCertificate): X509Certificate[] {
  return pemBlocks(leaf.chainPem).filter((block) => block.type === 'CERTIFICATE').slice(1).map((block) => new X509Certificate(block.pem))
}

/** The authority of a `spiffe://` URI. */
function hostOf (uri: string): string {
  return uri.slice('spiffe://'.length).split('/', 1)[0] as string
}
