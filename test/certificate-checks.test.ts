// The checks every certificate source's material passes before it is put in force (lib/certificates/checks.ts).
import t from 'tap'
import { checkLeaf, leafCertificateOf, leafHold } from '../lib/certificates/checks'
import type { LeafCertificate, TrustBundle } from '../lib/certificates/source'
import { DevCertificateAuthority } from '../lib/dev-agent/ca'

const HOUR = 3_600_000

t.test('leafHold and checkLeaf decide from the certificates themselves', async (t) => {
  const ca = await DevCertificateAuthority.create()
  const roots: TrustBundle = {
    trustDomain: ca.trustDomain,
    rootPems: ca.roots().map((root) => root.RootCert),
    intermediatePems: [],
    activeRootId: ca.activeRootId(),
    rootIds: ca.roots().map((root) => root.ID)
  }
  const uri = `spiffe://${ca.trustDomain}/ns/default/dc/dc1/svc/api`
  const leafOf = async (issuer: DevCertificateAuthority, opts: { uri?: string, notBefore?: Date, notAfter?: Date } = {}): Promise<LeafCertificate> => {
    const { certPem, privateKeyPem } = await issuer.issueCertificate({ uris: [opts.uri ?? uri], notBefore: opts.notBefore, notAfter: opts.notAfter })
    return { chainPem: certPem, keyPem: privateKeyPem, serial: '0a', uri: opts.uri ?? uri, validAfter: '', validBefore: '' }
  }
  const now = Date.now()

  const good = await leafOf(ca)
  t.equal(leafHold(good, roots, now), null, 'signed by the roots, valid now: served')
  t.doesNotThrow(() => { checkLeaf(good, now) })

  const early = await leafOf(ca, { notBefore: new Date(now + HOUR), notAfter: new Date(now + 2 * HOUR) })
  t.match(leafHold(early, roots, now), { kind: 'not-yet-valid', until: Math.floor((now + HOUR) / 1000) * 1000 }, 'valid later: waits until then')

  const other = await DevCertificateAuthority.create()
  const otherUri = `spiffe://${other.trustDomain}/ns/default/dc/dc1/svc/api`
  t.same(leafHold(await leafOf(other, { uri: otherUri }), roots, now),
    { kind: 'unsigned', reason: `the leaf (serial 0a) names ${otherUri}, outside trust domain ${ca.trustDomain}` }, 'another trust domain')
  t.same(leafHold(await leafOf(other), roots, now), { kind: 'unsigned', reason: 'the leaf (serial 0a) does not chain to the CA roots in force' },
    'the trust domain it names, from another CA')

  const expired = await leafOf(ca, { notBefore: new Date(now - 2 * HOUR), notAfter: new Date(now - HOUR) })
  t.throws(() => { checkLeaf(expired, now) }, { message: /^the leaf \(serial 0a\) expired at / })
  t.throws(() => leafCertificateOf({ chainPem: 'not PEM', serial: '0b' }), { message: 'the leaf (serial 0b) has no CERTIFICATE block' })

  t.same(leafHold(expired, roots, now), { kind: 'expired', reason: `the leaf (serial 0a) expired at ${leafCertificateOf(expired).validTo}` }, 'held until it expired: it never will serve')
  t.throws(() => { checkLeaf({ ...good, keyPem: expired.keyPem }, now) }, { message: 'the leaf\'s (serial 0a) private key does not belong to its certificate' })
  t.throws(() => { checkLeaf({ ...good, keyPem: 'not a key' }, now) }, { message: /^the leaf's \(serial 0a\) private key is unreadable: / })
  const garbage = '-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n'
  t.throws(() => { checkLeaf({ ...good, chainPem: good.chainPem + garbage }, now) }, { message: /^the leaf's \(serial 0a\) chain is unreadable: / })
})
