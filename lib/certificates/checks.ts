// What any certificate source's material must be before it is put in force (docs/semantics.md#last-good):
// checks of data, no I/O. lib/sync.ts rejects or holds back what fails them.
import { X509Certificate } from 'node:crypto'
import { chainsToCurrentRoots } from '../identity'
import { parseSubjectAltNames } from '../spiffe'
import type { SubjectAltNames } from '../spiffe'
import { pemBlocks } from './source'
import type { LeafCertificate, TrustBundle } from './source'

/** Why a leaf cannot be served with `roots` yet: it becomes valid later, or the roots do not sign it. */
export type LeafHold = { readonly kind: 'not-yet-valid', readonly until: number, readonly reason: string }
  | { readonly kind: 'unsigned', readonly reason: string }

/** The leaf's first certificate; throws when the chain has none. */
export function leafCertificateOf (leaf: Pick<LeafCertificate, 'chainPem' | 'serial'>): X509Certificate {
  const first = pemBlocks(leaf.chainPem).find((block) => block.type === 'CERTIFICATE')
  if (first === undefined) throw new Error(`the leaf (serial ${leaf.serial}) has no CERTIFICATE block`)
  return new X509Certificate(first.pem)
}

/** Throws for a leaf that can never be served: expired. */
export function checkLeaf (leaf: LeafCertificate, now: number): void {
  const cert = leafCertificateOf(leaf)
  if (Date.parse(cert.validTo) <= now) throw new Error(`the leaf (serial ${leaf.serial}) expired at ${cert.validTo}`)
}

/**
 * Null when `leaf` can be served with `roots` now; otherwise why it waits. Not a rejection: during a
 * CA rotation the new leaf may arrive before the roots that sign it.
 */
export function leafHold (leaf: LeafCertificate, roots: TrustBundle, now: number): LeafHold | null {
  const cert = leafCertificateOf(leaf)
  const validFrom = Date.parse(cert.validFrom)
  if (validFrom > now) return { kind: 'not-yet-valid', until: validFrom, reason: `the leaf (serial ${leaf.serial}) is not valid before ${cert.validFrom}` }
  const domain = hostOf(leaf.uri)
  if (domain.toLowerCase() !== roots.trustDomain.toLowerCase()) {
    return { kind: 'unsigned', reason: `the leaf (serial ${leaf.serial}) names ${leaf.uri}, outside trust domain ${roots.trustDomain}` }
  }
  const chain = pemBlocks(leaf.chainPem).filter((block) => block.type === 'CERTIFICATE').slice(1).map((block) => new X509Certificate(block.pem))
  const intermediates = [...chain, ...roots.intermediatePems.map((pem) => new X509Certificate(pem))]
  if (!chainsToCurrentRoots(cert, intermediates, roots.rootPems.map((pem) => new X509Certificate(pem)), now)) {
    return { kind: 'unsigned', reason: `the leaf (serial ${leaf.serial}) does not chain to the CA roots in force` }
  }
  return null
}

/**
 * Throws for roots that contradict themselves: an active root whose own SPIFFE ID (Consul's roots
 * carry `spiffe://<trust domain>`) names another trust domain than the bundle does.
 */
export function checkTrustBundle (trust: TrustBundle): void {
  const index = trust.rootIds.indexOf(trust.activeRootId)
  const pem = index === -1 ? undefined : trust.rootPems[index]
  if (pem === undefined) return
  // Node prints subjectAltName in the grammar parseSubjectAltNames reads (a certificate without the extension gives no URIs).
  const uris = (parseSubjectAltNames(new X509Certificate(pem).subjectAltName) as SubjectAltNames).uris
  const named = uris.filter((uri) => uri.startsWith('spiffe://')).map(hostOf)
  if (named.length > 0 && !named.some((domain) => domain.toLowerCase() === trust.trustDomain.toLowerCase())) {
    throw new Error(`the roots say trust domain ${trust.trustDomain}, but the active root ${trust.activeRootId} is for ${named.join(', ')}`)
  }
}

/** The authority of a `spiffe://` URI. */
function hostOf (uri: string): string {
  const rest = uri.slice('spiffe://'.length)
  const slash = rest.indexOf('/')
  return slash === -1 ? rest : rest.slice(0, slash)
}
