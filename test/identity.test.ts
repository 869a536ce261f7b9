// Identity rules on certificates and connection objects, without a network: each branch that the
// real-socket tests in plugin-identity.test.ts cannot reach on demand.
import t from 'tap'
import { X509Certificate } from 'node:crypto'
import { DevCertificateAuthority } from '../lib/dev-agent/ca'
import { chainsToCurrentRoots, IdentityResolver, identityFromCertificate } from '../lib/identity'
import type { TlsRequest } from '../lib/identity'
import { serviceSpiffeId } from '../lib/spiffe'

function fakeSocket (opts: { authorized?: boolean, cert?: X509Certificate, error?: string, chain?: X509Certificate[], resumed?: boolean }): TlsRequest {
  // Mirrors the parts of tls.TLSSocket the resolver reads.
  const chain = opts.chain ?? []
  const detailed = (i: number): object | undefined => {
    const cert = chain[i]
    if (cert === undefined) return undefined
    return { raw: cert.raw, issuerCertificate: detailed(i + 1) }
  }
  const socket = {
    authorized: opts.authorized ?? true,
    authorizationError: opts.error,
    getPeerX509Certificate: () => opts.cert,
    isSessionReused: () => opts.resumed ?? false,
    getPeerCertificate: () => ({ raw: opts.cert?.raw, issuerCertificate: detailed(0) })
  }
  return { socket: socket as never }
}

t.test('identityFromCertificate applies the service-identity rules', async (t) => {
  const ca = await DevCertificateAuthority.create()
  const td = ca.trustDomain
  const leaf = new X509Certificate((await ca.signLeaf('web')).certPem)
  const ok = identityFromCertificate(leaf, td)
  t.equal(ok.identity?.service, 'web')
  t.equal(ok.reason, 'verified')
  t.ok(ok.notAfter > Date.now())
  // Each verified record has a rule memo of its own (it names one caller); a record without an identity has none.
  t.same(ok.rules, { serial: -1, rule: null })
  t.not(identityFromCertificate(leaf, td).rules, ok.rules, 'never shared between records')
  t.equal(identityFromCertificate(leaf, 'other.consul').rules, null)

  const partitioned = new X509Certificate((await ca.signLeaf('web', { partition: 'eu', namespace: 'team' })).certPem)
  t.match(identityFromCertificate(partitioned, td).identity, { partition: 'eu', namespace: 'team', service: 'web' })

  t.match(identityFromCertificate(leaf, 'other.consul').reason, /trust domain/)
  const agentCert = new X509Certificate((await ca.issueCertificate({ uris: [`spiffe://${td}/agent/client/dc/dc1/id/n1`] })).certPem)
  t.match(identityFromCertificate(agentCert, td).reason, /not a service identity \(agent\)/)
  const notConsul = new X509Certificate((await ca.issueCertificate({ uris: ['spiffe://example.org/workload'] })).certPem)
  t.match(identityFromCertificate(notConsul, td).reason, /not a Consul SPIFFE ID/)
  const quoted = new X509Certificate((await ca.issueCertificate({ uris: [`spiffe://${td}/ns/default/dc/dc1/svc/a,b`] })).certPem)
  t.match(identityFromCertificate(quoted, td).reason, /exactly one URI SAN, found 1 \(quoted\)/)
  const serverOnly = new X509Certificate((await ca.issueCertificate({ uris: [serviceSpiffeId(td, { datacenter: 'dc1', service: 'web' })], extKeyUsage: ['serverAuth'] })).certPem)
  t.match(identityFromCertificate(serverOnly, td).reason, /clientAuth/)
  const noEku = new X509Certificate((await ca.issueCertificate({ uris: [serviceSpiffeId(td, { datacenter: 'dc1', service: 'web' })], extKeyUsage: [] })).certPem)
  t.equal(identityFromCertificate(noEku, td).identity?.service, 'web', 'no EKU extension means no restriction')
  const fakeSan = { subjectAltName: 'URI:"unterminated' } as unknown as X509Certificate
  t.match(identityFromCertificate(fakeSan, td).reason, /unreadable subjectAltName/)
})

t.test('IdentityResolver: connection rules, caching, expiry and roots changes', async (t) => {
  const ca = await DevCertificateAuthority.create()
  const root = new X509Certificate(ca.roots()[0]?.RootCert as string)
  const leafPem = (await ca.signLeaf('web')).certPem
  const leaf = new X509Certificate(leafPem)
  const resolver = new IdentityResolver()
  const now = Date.now()

  t.match(resolver.peer(fakeSocket({ cert: leaf }), now).reason, /no CA roots/, 'nothing is trusted before the roots load')
  resolver.setTrust({ trustDomain: ca.trustDomain, roots: [root] })

  t.match(resolver.peer({ socket: {} as never }, now).reason, /not a TLS connection/)
  t.match(resolver.peer(fakeSocket({ authorized: false, error: 'UNABLE_TO_GET_ISSUER_CERT', cert: leaf }), now).reason, /not verified: UNABLE_TO_GET_ISSUER_CERT/)
  t.match(resolver.peer(fakeSocket({ authorized: false }), now).reason, /^no client certificate$/, 'Node reports a missing certificate as unverified too')
  t.match(resolver.peer(fakeSocket({ authorized: false, cert: leaf }), now).reason, /not verified: no reason given/)
  t.match(resolver.peer(fakeSocket({ authorized: true }), now).reason, /no client certificate/, 'resumed TLS 1.3 session without a certificate')

  // Connections that were not seen connecting (or predate the roots) have their chain checked.
  const unseen = fakeSocket({ cert: leaf, chain: [root] })
  t.equal(resolver.peer(unseen, now).identity?.service, 'web')
  t.equal(resolver.peer(unseen, now).identity?.service, 'web', 'cached')
  t.equal(resolver.peer(unseen, Date.parse(leaf.validTo) + 1).identity, null, 'expired at request time')
  t.equal(resolver.peer(unseen, Date.parse(leaf.validFrom) - 1).identity, null, 'not yet valid')

  // HTTP/2: the session is the connection.
  const session = { socket: fakeSocket({ cert: leaf, chain: [root] }).socket }
  t.equal(resolver.peer({ socket: {} as never, stream: { session } }, now).identity?.service, 'web')

  // A connection noted at connect time under the current roots skips the chain walk.
  const raw = {}
  resolver.noteConnection(raw)
  const noted = fakeSocket({ cert: leaf })
  ;(noted.socket as unknown as { _parent: object })._parent = raw
  t.equal(resolver.peer(noted, now).identity?.service, 'web')

  // New roots without the old one: cached identities are re-checked and dropped.
  await ca.rotate()
  const other = await DevCertificateAuthority.create({ clusterId: ca.clusterId })
  resolver.setTrust({ trustDomain: ca.trustDomain, roots: [new X509Certificate(other.roots()[0]?.RootCert as string)] })
  t.match(resolver.peer(unseen, now).reason, /does not chain to the current CA roots/)
  t.match(resolver.peer(noted, now).reason, /does not chain/)

  // Roots that still include the signer keep the identity; a cross-signed chain counts.
  const newRoot = new X509Certificate(ca.roots()[0]?.RootCert as string)
  resolver.setTrust({ trustDomain: ca.trustDomain, roots: [newRoot] })
  const rotatedLeaf = (await ca.signLeaf('web')).certPem
  const [leafPart, crossSigned] = rotatedLeaf.split(/(?<=-----END CERTIFICATE-----\n)/)
  const rotated = fakeSocket({ cert: new X509Certificate(leafPart as string), chain: [new X509Certificate(crossSigned as string), root] })
  t.equal(resolver.peer(rotated, now).identity?.service, 'web', 'the new leaf verifies against the new root')
  resolver.setTrust({ trustDomain: ca.trustDomain, roots: [root] })
  t.equal(resolver.peer(rotated, now).identity?.service, 'web', 'and, through the cross-signed certificate, against the old one')
  resolver.setTrust({ trustDomain: ca.trustDomain, roots: [root, newRoot] })
  t.equal(resolver.peer(fakeSocket({ cert: root, chain: [] }), now).identity, null, 'a root is no service identity')
  const loop = fakeSocket({ cert: leaf, chain: [leaf] })
  resolver.setTrust({ trustDomain: ca.trustDomain, roots: [new X509Certificate(other.roots()[0]?.RootCert as string)] })
  t.equal(resolver.peer(loop, now).identity, null, 'a chain that loops ends the walk')
})

t.test('a resumed session is re-checked against the current roots; a broken or stale chain is refused', async (t) => {
  const ca = await DevCertificateAuthority.create()
  const root = new X509Certificate(ca.roots()[0]?.RootCert as string)
  const leaf = new X509Certificate((await ca.signLeaf('web')).certPem)
  const resolver = new IdentityResolver()
  resolver.setTrust({ trustDomain: ca.trustDomain, roots: [root] })
  const now = Date.now()
  const raw = {}
  resolver.noteConnection(raw)
  const resumed = fakeSocket({ cert: leaf, chain: [], resumed: true })
  ;(resumed.socket as unknown as { _parent: object })._parent = raw
  t.equal(resolver.peer(resumed, now).identity?.service, 'web', 'checked, and signed by a current root')

  const other = await DevCertificateAuthority.create({ clusterId: ca.clusterId })
  const stranger = new X509Certificate(other.roots()[0]?.RootCert as string)
  const brokenLink = fakeSocket({ cert: leaf, chain: [stranger], resumed: true })
  resolver.setTrust({ trustDomain: ca.trustDomain, roots: [new X509Certificate((await DevCertificateAuthority.create()).roots()[0]?.RootCert as string)] })
  t.match(resolver.peer(brokenLink, now).reason, /does not chain/, 'a chain element that did not issue the leaf ends the walk')
})

t.test('chainsToCurrentRoots: expired links and unreadable dates fail closed', async (t) => {
  const ca = await DevCertificateAuthority.create()
  const root = new X509Certificate(ca.roots()[0]?.RootCert as string)
  const leaf = new X509Certificate((await ca.signLeaf('web')).certPem)
  t.equal(chainsToCurrentRoots(leaf, [], [root], Date.now()), true)
  t.equal(chainsToCurrentRoots(leaf, [], [root], Date.parse(leaf.validTo) + 1), false, 'an expired leaf')
  const undated = { ...leaf, raw: leaf.raw, subjectAltName: leaf.subjectAltName, keyUsage: leaf.keyUsage, validFrom: 'garbage', validTo: 'garbage' } as unknown as X509Certificate
  t.match(identityFromCertificate(undated, ca.trustDomain).reason, /unreadable certificate validity dates/)
})

t.test('a resumed session (no peer chain) links through the roots\' intermediates', async (t) => {
  const ca = await DevCertificateAuthority.create()
  const oldRoot = new X509Certificate(ca.roots()[0]?.RootCert as string)
  await ca.rotate()
  const crossSigned = new X509Certificate(ca.roots()[0]?.IntermediateCerts?.[0] as string)
  const [leafPem] = (await ca.signLeaf('web')).certPem.split(/(?<=-----END CERTIFICATE-----\n)/)
  const leaf = new X509Certificate(leafPem as string)
  const resolver = new IdentityResolver()
  const resumed = (): TlsRequest => fakeSocket({ cert: leaf, chain: [], resumed: true })
  resolver.setTrust({ trustDomain: ca.trustDomain, roots: [oldRoot] })
  t.match(resolver.peer(resumed(), Date.now()).reason, /does not chain/, 'without the intermediate, no link to the old root')
  resolver.setTrust({ trustDomain: ca.trustDomain, roots: [oldRoot], intermediates: [crossSigned] })
  t.equal(resolver.peer(resumed(), Date.now()).identity?.service, 'web', 'leaf → cross-signed intermediate → old root')
})
