import t from 'tap'
import fc from 'fast-check'
import { X509Certificate } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { resolve } from 'node:path'
import { parseSpiffeId, parseSubjectAltNames, serviceSpiffeId } from '../lib/spiffe'
import type { ConsulSpiffeId } from '../lib/spiffe'
import { DevCertificateAuthority } from '../lib/dev-agent/ca'

const CAPTURED = resolve(__dirname, 'fixtures', 'consul')
const TD = '11111111-2222-3333-4444-555555555555.consul'

t.test('parses every Consul SPIFFE ID format', async (t) => {
  const cases: Array<[string, ConsulSpiffeId]> = [
    [`spiffe://${TD}/ns/default/dc/dc1/svc/web`,
      { kind: 'service', trustDomain: TD, partition: 'default', namespace: 'default', datacenter: 'dc1', service: 'web' }],
    [`spiffe://${TD}/ap/billing/ns/team/dc/dc2/svc/api`,
      { kind: 'service', trustDomain: TD, partition: 'billing', namespace: 'team', datacenter: 'dc2', service: 'api' }],
    [`spiffe://${TD}/ap/default/ns/default/dc/dc1/svc/web`,
      { kind: 'service', trustDomain: TD, partition: 'default', namespace: 'default', datacenter: 'dc1', service: 'web' }],
    [`spiffe://${TD}/agent/client/dc/dc1/id/node-1`,
      { kind: 'agent', trustDomain: TD, partition: 'default', datacenter: 'dc1', node: 'node-1' }],
    [`spiffe://${TD}/ap/p1/agent/client/dc/dc1/id/node-1`,
      { kind: 'agent', trustDomain: TD, partition: 'p1', datacenter: 'dc1', node: 'node-1' }],
    [`spiffe://${TD}/gateway/mesh/dc/dc1`,
      { kind: 'mesh-gateway', trustDomain: TD, partition: 'default', datacenter: 'dc1' }],
    [`spiffe://${TD}/ap/p1/gateway/mesh/dc/dc1`,
      { kind: 'mesh-gateway', trustDomain: TD, partition: 'p1', datacenter: 'dc1' }],
    [`spiffe://${TD}/agent/server/dc/dc1`,
      { kind: 'server', trustDomain: TD, datacenter: 'dc1' }],
    [`spiffe://${TD}`,
      { kind: 'signing', trustDomain: TD }]
  ]
  for (const [uri, want] of cases) t.same(parseSpiffeId(uri), want, uri)
})

t.test('unescapes path segments but not keywords, and lowercases only the trust domain', async (t) => {
  t.same(parseSpiffeId('spiffe://td.consul/ns/my%20ns/dc/dc%2F1/svc/w%C3%A9b'),
    { kind: 'service', trustDomain: 'td.consul', partition: 'default', namespace: 'my ns', datacenter: 'dc/1', service: 'wéb' })
  t.same(parseSpiffeId('spiffe://TD.Consul/ns/Default/dc/DC1/svc/Web'),
    { kind: 'service', trustDomain: 'td.consul', partition: 'default', namespace: 'Default', datacenter: 'DC1', service: 'Web' })
  t.equal(parseSpiffeId('spiffe://td/%6es/default/dc/dc1/svc/web'), null, 'an escaped keyword is not the keyword')
  t.same(parseSpiffeId("spiffe://td/ns/a-b_c.d~e!$&'()*+,;=:@/dc/dc1/svc/web")?.kind, 'service', 'every RFC 3986 pchar')
})

t.test('rejects anything that is not one of Consul\'s formats', async (t) => {
  const rejected = [
    '',
    'spiffe://',
    'spiffe:///ns/default/dc/dc1/svc/web',
    'SPIFFE://td/ns/default/dc/dc1/svc/web',
    'https://td/ns/default/dc/dc1/svc/web',
    'spiffe:td/ns/default/dc/dc1/svc/web',
    'spiffe://td/',
    'spiffe://td//ns/default/dc/dc1/svc/web',
    'spiffe://td/ns/default/dc/dc1/svc/web/',
    'spiffe://td/ns/default/dc/dc1/svc/web/extra',
    'spiffe://td/ns/default/dc/dc1/svc',
    'spiffe://td/ns/default/dc/dc1',
    'spiffe://td/ns//dc/dc1/svc/web',
    'spiffe://td/ns/default/dc//svc/web',
    'spiffe://td/ns/default/dc/dc1/svc/',
    'spiffe://td/nss/default/dc/dc1/svc/web',
    'spiffe://td/ns/default/dc/dc1/service/web',
    'spiffe://td/ns/default/dc/dc1/svc/web?x=1',
    'spiffe://td/ns/default/dc/dc1/svc/web#frag',
    'spiffe://td?x=1',
    'spiffe://td#frag',
    'spiffe://user@td/ns/default/dc/dc1/svc/web',
    'spiffe://td:8500/ns/default/dc/dc1/svc/web',
    'spiffe://t%64/ns/default/dc/dc1/svc/web',
    'spiffe://td/ns/de fault/dc/dc1/svc/web',
    'spiffe://td/ns/default/dc/dc1/svc/w%',
    'spiffe://td/ns/default/dc/dc1/svc/w%zz',
    'spiffe://td/ns/default/dc/dc1/svc/w%ff',
    'spiffe://td/ns/default/dc/dc1/svc/wéb',
    'spiffe://td/ap',
    'spiffe://td/ap/p1',
    'spiffe://td/ap/p1/ap/p2/ns/default/dc/dc1/svc/web',
    'spiffe://td/ap/p1/agent/server/dc/dc1',
    'spiffe://td/agent/other/dc/dc1/id/n1',
    'spiffe://td/agent/client/dc/dc1',
    'spiffe://td/agent/server/dc/dc1/id/n1',
    'spiffe://td/agent/client/dc/dc1/node/n1',
    'spiffe://td/gateway/terminating/dc/dc1',
    'spiffe://td/gateway/mesh/dc/dc1/x',
    'spiffe://td/ap/p1/ns/default/identity/web'
  ]
  for (const uri of rejected) t.equal(parseSpiffeId(uri), null, JSON.stringify(uri))
})

t.test('parses the ServiceURI values Consul returned', async (t) => {
  for (const file of ['ca-leaf-api.json', 'ca-leaf-api-after-rotation.json']) {
    const leaf = JSON.parse(readFileSync(resolve(CAPTURED, file), 'utf8')) as { ServiceURI: string, Service: string, CertPEM: string }
    const want = {
      kind: 'service',
      trustDomain: '2a146f8e-f8b9-cb9e-7aa9-e941c8535d0d.consul',
      partition: 'default',
      namespace: 'default',
      datacenter: 'dc1',
      service: leaf.Service
    }
    t.same(parseSpiffeId(leaf.ServiceURI), want, file)
    const sans = parseSubjectAltNames(new X509Certificate(leaf.CertPEM).subjectAltName)
    t.same(sans, { uris: [leaf.ServiceURI], quotedUris: 0, others: 0 }, `${file}: the certificate carries the same URI`)
  }
})

/** The first certificate of a PEM bundle (a leaf's CertPEM may carry intermediates after it). */
function firstCertificate (pem: string): X509Certificate {
  return new X509Certificate(pem.slice(0, pem.indexOf('-----END CERTIFICATE-----') + 25))
}

t.test('reads the identities in Consul-shaped certificates, before and after a rotation', async (t) => {
  // The set Consul's own connect tests used, made here: a cluster CA in datacenter dc01 with leaves
  // for web and db; a rotation to a second root, cross-signed by the first, and a db leaf under it;
  // and an unrelated CA with the same trust domain string and a web leaf in dc1.
  const clusterId = TD.replace(/\.consul$/, '')
  const cluster = await DevCertificateAuthority.create({ clusterId, datacenter: 'dc01' })
  const ca1 = cluster.roots()[0]?.RootCert as string
  const ca1Web = await cluster.signLeaf('web')
  const ca1Db = await cluster.signLeaf('db')
  await cluster.rotate()
  const [active] = cluster.roots()
  const ca2 = active?.RootCert as string
  const ca2CrossSigned = active?.IntermediateCerts?.[0] as string
  const ca2Db = await cluster.signLeaf('db')
  const unrelated = await DevCertificateAuthority.create({ clusterId, datacenter: 'dc1' })
  const otherRoot = unrelated.roots()[0]?.RootCert as string
  const otherWeb = await unrelated.signLeaf('web')

  const service = (datacenter: string, name: string): ConsulSpiffeId =>
    ({ kind: 'service', trustDomain: TD, partition: 'default', namespace: 'default', datacenter, service: name })
  const signing: ConsulSpiffeId = { kind: 'signing', trustDomain: TD }
  const certificates: Array<[string, string, ConsulSpiffeId]> = [
    ['ca1 root', ca1, signing],
    ['ca1 web leaf', ca1Web.certPem, service('dc01', 'web')],
    ['ca1 db leaf', ca1Db.certPem, service('dc01', 'db')],
    ['ca2 root', ca2, signing],
    ['ca2 cross-signed by ca1', ca2CrossSigned, signing],
    ['ca2 db leaf', ca2Db.certPem, service('dc01', 'db')],
    ['unrelated root', otherRoot, signing],
    ['unrelated web leaf', otherWeb.certPem, service('dc1', 'web')]
  ]
  for (const [name, pem, want] of certificates) {
    const sans = parseSubjectAltNames(firstCertificate(pem).subjectAltName)
    t.equal(sans?.uris.length, 1, `${name}: one URI SAN`)
    t.same(parseSpiffeId(sans?.uris[0] as string), want, name)
  }

  // The chains those identities come with: trust comes from keys, not from the shared trust domain.
  const [root1, root2, cross, leaf2, rootOther] = [ca1, ca2, ca2CrossSigned, ca2Db.certPem, otherRoot].map(firstCertificate)
  const signedBy = (cert: X509Certificate, issuer: X509Certificate): boolean => cert.checkIssued(issuer) && cert.verify(issuer.publicKey)
  t.ok(signedBy(firstCertificate(ca1Web.certPem), root1), 'ca1 leaves are signed by ca1')
  t.ok(signedBy(cross, root1), 'the cross-signed certificate is issued and signed by ca1')
  t.equal(cross.subject, root2.subject, 'it carries the ca2 subject')
  t.equal(cross.publicKey.export({ format: 'der', type: 'spki' }).toString('hex'),
    root2.publicKey.export({ format: 'der', type: 'spki' }).toString('hex'), 'and the ca2 key')
  t.ok(signedBy(leaf2, root2), 'the ca2 db leaf is signed by ca2')
  t.notOk(signedBy(leaf2, root1), 'not by ca1 directly: it reaches ca1 only through the cross-signed certificate')
  t.ok(signedBy(leaf2, cross), 'which it links to')
  t.equal(ca2Db.certPem.split('BEGIN CERTIFICATE').length - 1, 2, 'the ca2 leaf is served with the cross-signed certificate')
  t.notOk(signedBy(firstCertificate(ca1Web.certPem), rootOther), 'the unrelated root signs no cluster leaf, despite the same trust domain')
  t.notOk(signedBy(firstCertificate(otherWeb.certPem), root1), 'and the cluster root signs no unrelated leaf')
})

t.test('serviceSpiffeId builds Consul\'s service URIs', async (t) => {
  t.equal(serviceSpiffeId('td.consul', { datacenter: 'dc1', service: 'web' }), 'spiffe://td.consul/ns/default/dc/dc1/svc/web')
  t.equal(serviceSpiffeId('TD.consul', { namespace: 'ns1', datacenter: 'dc1', service: 'web' }), 'spiffe://td.consul/ns/ns1/dc/dc1/svc/web')
  t.equal(serviceSpiffeId('td', { partition: 'Billing', datacenter: 'dc1', service: 'web' }), 'spiffe://td/ap/billing/ns/default/dc/dc1/svc/web')
  t.equal(serviceSpiffeId('td', { partition: 'DEFAULT', datacenter: 'dc1', service: 'web' }), 'spiffe://td/ns/default/dc/dc1/svc/web')
  t.equal(serviceSpiffeId('td', { partition: '', datacenter: 'dc1', service: 'web' }), 'spiffe://td/ns/default/dc/dc1/svc/web')
  t.equal(serviceSpiffeId('td', { datacenter: 'dc 1', service: 'a/b' }), 'spiffe://td/ns/default/dc/dc%201/svc/a%2Fb')
  t.throws(() => serviceSpiffeId('td', { datacenter: 'dc1', service: '' }), { name: 'TypeError', message: /service/ })
  t.throws(() => serviceSpiffeId('td', { datacenter: '', service: 'web' }), { name: 'TypeError', message: /datacenter/ })
  t.throws(() => serviceSpiffeId('td', { namespace: '', datacenter: 'dc1', service: 'web' }), { name: 'TypeError', message: /namespace/ })
  t.throws(() => serviceSpiffeId('td/x', { datacenter: 'dc1', service: 'web' }), { name: 'TypeError', message: /trust domain/ })
  t.throws(() => serviceSpiffeId('', { datacenter: 'dc1', service: 'web' }), { name: 'TypeError', message: /trust domain/ })
})

t.test('parseSpiffeId(serviceSpiffeId(td, x)) returns x for any names', async (t) => {
  const name = fc.string({ minLength: 1, maxLength: 20, unit: 'binary' })
  const trustDomain = fc.stringMatching(/^[A-Za-z0-9._-]{1,40}$/)
  fc.assert(fc.property(trustDomain, fc.option(name, { nil: undefined }), fc.option(name, { nil: undefined }), name, name,
    (td, partition, namespace, datacenter, service) => {
      const parsed = parseSpiffeId(serviceSpiffeId(td, { partition, namespace, datacenter, service }))
      const wantPartition = partition === undefined ? 'default' : partition.toLowerCase()
      return parsed !== null && parsed.kind === 'service' && parsed.trustDomain === td.toLowerCase() &&
        parsed.partition === wantPartition && parsed.namespace === (namespace ?? 'default') &&
        parsed.datacenter === datacenter && parsed.service === service
    }), { numRuns: 2000 })
  t.pass('2000 generated identities round-trip')
})

t.test('parseSubjectAltNames splits Node\'s subjectAltName format', async (t) => {
  t.same(parseSubjectAltNames(undefined), { uris: [], quotedUris: 0, others: 0 }, 'no SAN extension')
  t.same(parseSubjectAltNames(''), { uris: [], quotedUris: 0, others: 0 })
  t.same(parseSubjectAltNames('URI:spiffe://td/ns/default/dc/dc1/svc/web'),
    { uris: ['spiffe://td/ns/default/dc/dc1/svc/web'], quotedUris: 0, others: 0 })
  t.same(parseSubjectAltNames('DNS:localhost, IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1, URI:spiffe://a, email:a@b.c, ' +
    'Registered ID:1.2.3.4, othername:UPN:upn@x, URI:spiffe://b, URI:, DNS:sp ace'),
  { uris: ['spiffe://a', 'spiffe://b', ''], quotedUris: 0, others: 7 })
  t.same(parseSubjectAltNames('URI:"spiffe://x/a\\u002cb", DNS:"a\\u002c URI:spiffe://evil", URI:"spiffe://x/q\\"u\\\\o\'t", DirName:"O=acme\\u002cCN=foo\\\\\\u002c bar"'),
    { uris: ['spiffe://x/a,b', 'spiffe://x/q"u\\o\'t'], quotedUris: 2, others: 2 }, 'quoted values are decoded and counted')
})

t.test('parseSubjectAltNames refuses strings Node would not produce', async (t) => {
  const ambiguous = [
    'URI',
    ':spiffe://td',
    ' URI:x',
    '1URI:x',
    'URI:a,b',
    'URI:a, b',
    'URI:a,URI:b',
    'URI:a"b',
    'URI:"unterminated',
    'URI:"ends with escape\\',
    'URI:"bad escape \\x41"',
    'URI:"a"b',
    'URI:"a",URI:b',
    'URI:a, ',
    'URI:a,  URI:b'
  ]
  for (const san of ambiguous) t.equal(parseSubjectAltNames(san), null, JSON.stringify(san))
})

t.test('parseSubjectAltNames reads the SANs of real certificates, quoting included', async (t) => {
  const ca = await DevCertificateAuthority.create()
  const uris = ['spiffe://td/ns/default/dc/dc1/svc/web', 'spiffe://td/a,b', 'spiffe://td/q"u\\o\'t', 'spiffe://td/ctl\u0001', 'spiffe://td/é', 'spiffe://td/sp ace']
  const issued = await ca.issueCertificate({ uris, dnsNames: ['localhost', 'a, URI:spiffe://evil'] })
  const sans = parseSubjectAltNames(new X509Certificate(issued.certPem).subjectAltName)
  t.same(sans?.others, 2, 'a DNS name cannot smuggle in a URI')
  // The encoder writes 'é' as the single byte 0xe9, which Node prints as \u00e9.
  t.same(sans?.uris, uris, 'every URI comes back exactly')
  t.equal(sans?.quotedUris, 4)
})
