// `certificates: { source: 'agent' }` (the default): the local agent's leaf and roots endpoints,
// kept current by blocking queries (docs/semantics.md#leaf, docs/semantics.md#roots).
import type { AgentClient } from '../agent/client'
import { BlockingWatch } from '../agent/watch'
import type { IndexedCARoots, IssuedCert } from '../agent/wire'
import { parseSpiffeId, parseSubjectAltNames } from '../spiffe'
import type { SubjectAltNames } from '../spiffe'
import { leafCertificateOf } from './checks'
import type { CertificateSink, CertificateSource, LeafCertificate, SourceHealth, SourceLogger, SourcePart, TrustBundle } from './source'

export class AgentCertificateSource implements CertificateSource {
  readonly renewer = 'the agent'
  readonly #leaf: BlockingWatch<IssuedCert>
  readonly #roots: BlockingWatch<IndexedCARoots>
  #sink: CertificateSink | null = null

  constructor (client: AgentClient, service: string, waitMs: number, log: SourceLogger) {
    const sink = (): CertificateSink => this.#sink as CertificateSink
    this.#leaf = new BlockingWatch<IssuedCert>({
      name: 'leaf',
      waitMs,
      log,
      fetch: async (q) => pick(await client.leaf(service, q)),
      differs: (a, b) => a.SerialNumber !== b.SerialNumber || a.CertPEM !== b.CertPEM,
      accept: (leaf) => sink().update({ leaf: leafOf(leaf, service) })
    })
    this.#roots = new BlockingWatch<IndexedCARoots>({
      name: 'roots',
      waitMs,
      log,
      fetch: async (q) => pick(await client.roots(q)),
      differs: (a, b) => a.TrustDomain !== b.TrustDomain || a.Roots.map((r) => r.ID).join() !== b.Roots.map((r) => r.ID).join(),
      accept: (roots) => sink().update({ trust: trustOf(roots) })
    })
  }

  start (sink: CertificateSink): void {
    this.#sink = sink
    this.#leaf.onFailure((error) => sink.failure('leaf', error))
    this.#roots.onFailure((error) => sink.failure('roots', error))
    this.#leaf.start()
    this.#roots.start()
  }

  stop (): void {
    this.#leaf.stop()
    this.#roots.stop()
  }

  health (): Record<SourcePart, SourceHealth> {
    return { leaf: healthOf(this.#leaf), roots: healthOf(this.#roots) }
  }
}

function healthOf<T> (watch: BlockingWatch<T>): SourceHealth {
  return { lastSuccess: watch.lastSuccess, lastError: watch.lastError, failures: watch.failures }
}

/**
 * The agent's answer as the certificate the plugin will serve. The answer's fields describe the
 * certificate; the certificate itself must agree: its one SPIFFE ID is the answer's `ServiceURI`,
 * and names the service asked for (parse.ts checked the answer's `Service`). Throws otherwise, so
 * the watch rejects it and the last good leaf stays.
 */
function leafOf (leaf: IssuedCert, service: string): LeafCertificate {
  const cert = leafCertificateOf({ chainPem: leaf.CertPEM, serial: leaf.SerialNumber })
  // Node prints subjectAltName in the grammar parseSubjectAltNames reads (a certificate without the extension gives no URIs).
  const uris = (parseSubjectAltNames(cert.subjectAltName) as SubjectAltNames).uris.filter((uri) => uri.startsWith('spiffe://'))
  if (uris.length !== 1 || uris[0] !== leaf.ServiceURI) {
    throw new Error(`the leaf (serial ${leaf.SerialNumber}) names ${uris.join(', ') || 'no SPIFFE ID'}, not its ServiceURI ${leaf.ServiceURI}`)
  }
  const id = parseSpiffeId(leaf.ServiceURI)
  if (id === null || id.kind !== 'service' || id.service !== service) {
    throw new Error(`the leaf (serial ${leaf.SerialNumber}) is for ${leaf.ServiceURI}, not for service ${service}`)
  }
  return {
    chainPem: leaf.CertPEM,
    keyPem: leaf.PrivateKeyPEM,
    serial: leaf.SerialNumber,
    uri: leaf.ServiceURI,
    validAfter: leaf.ValidAfter,
    validBefore: leaf.ValidBefore
  }
}

function trustOf (roots: IndexedCARoots): TrustBundle {
  return {
    trustDomain: roots.TrustDomain,
    rootPems: roots.Roots.map((root) => root.RootCert),
    intermediatePems: roots.Roots.flatMap((root) => root.IntermediateCerts ?? []),
    activeRootId: roots.ActiveRootID,
    rootIds: roots.Roots.map((root) => root.ID)
  }
}

function pick<T> (res: { index: number | null, body: T }): { index: number | null, value: T } {
  return { index: res.index, value: res.body }
}
