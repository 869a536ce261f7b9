import t from 'tap'
import { createHash, createPrivateKey, generateKeyPairSync, X509Certificate } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { once } from 'node:events'
import { resolve } from 'node:path'
import tls from 'node:tls'
import type { AddressInfo } from 'node:net'
import { AsnConvert } from '@peculiar/asn1-schema'
import * as asn from '@peculiar/asn1-x509'
import { DevCertificateAuthority } from '../lib/dev-agent/ca'
import type { CARoot, IndexedCARoots } from '../lib/agent/wire'
import { hasOpenssl, opensslVerify, splitPem } from './helpers/openssl'

const CAPTURED = resolve(__dirname, 'fixtures', 'consul')
const CLUSTER_ID = '2a146f8e-f8b9-cb9e-7aa9-e941c8535d0d'
const SERVER_AUTH = '1.3.6.1.5.5.7.3.1'
const CLIENT_AUTH = '1.3.6.1.5.5.7.3.2'
const ECDSA_WITH_SHA256 = '1.2.840.10045.4.3.2'
const HOUR = 3600_000

function captured (name: string): IndexedCARoots {
  return JSON.parse(readFileSync(resolve(CAPTURED, name), 'utf8')) as IndexedCARoots
}

/** Each extension of a certificate by OID, with its criticality and DER value. */
function extensions (pem: string): Map<string, { critical: boolean, value: ArrayBuffer }> {
  const cert = AsnConvert.parse(new X509Certificate(pem).raw, asn.Certificate)
  return new Map((cert.tbsCertificate.extensions ?? []).map((ext) => [ext.extnID, { critical: ext.critical, value: ext.extnValue.buffer }]))
}

function extension (pem: string, oid: string): { critical: boolean, value: ArrayBuffer } {
  const ext = extensions(pem).get(oid)
  if (ext === undefined) throw new Error(`no extension ${oid}`)
  return ext
}

function colonHex (bytes: ArrayBuffer): string {
  return Buffer.from(bytes).toString('hex').replace(/(..)(?!$)/g, '$1:')
}

function subjectKeyId (pem: string): string {
  return colonHex(AsnConvert.parse(extension(pem, asn.id_ce_subjectKeyIdentifier).value, asn.SubjectKeyIdentifier).buffer)
}

function authorityKeyId (pem: string): string {
  const aki = AsnConvert.parse(extension(pem, asn.id_ce_authorityKeyIdentifier).value, asn.AuthorityKeyIdentifier)
  return colonHex((aki.keyIdentifier as asn.KeyIdentifier).buffer)
}

function keyUsage (pem: string): { critical: boolean, usages: string[] } {
  const ext = extension(pem, asn.id_ce_keyUsage)
  return { critical: ext.critical, usages: AsnConvert.parse(ext.value, asn.KeyUsage).toJSON().sort() }
}

function signatureAlgorithm (pem: string): string {
  return AsnConvert.parse(new X509Certificate(pem).raw, asn.Certificate).signatureAlgorithm.algorithm
}

/** Key-for-key, type-for-type shape of a JSON value (arrays by their first element). */
function shape (value: unknown): unknown {
  if (value === null) return 'null'
  if (Array.isArray(value)) return [shape(value[0])]
  if (typeof value === 'object') {
    return Object.fromEntries(Object.keys(value as object).sort().map((key) => [key, shape((value as Record<string, unknown>)[key])]))
  }
  return typeof value
}

function rootCert (root: CARoot | undefined): X509Certificate {
  if (root === undefined) throw new Error('missing root')
  return new X509Certificate(root.RootCert)
}

interface HandshakeResult {
  serverAuthorized: boolean
  serverError: string | undefined
  clientAuthorized: boolean
  clientError: string | undefined
  clientUri: string | undefined
}

/**
 * A real mutual-TLS handshake over loopback. Neither side rejects, so the outcome of each side's
 * verification can be asserted. Hostname checks are off because Consul leaves carry no DNS SAN.
 */
async function handshake (opts: { serverCa: string, server: { certPem: string, privateKeyPem: string }, clientCa: string, client: { certPem: string, privateKeyPem: string } }): Promise<HandshakeResult> {
  const server = tls.createServer({
    cert: opts.server.certPem,
    key: opts.server.privateKeyPem,
    ca: opts.serverCa,
    requestCert: true,
    rejectUnauthorized: false
  })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  const accepted = once(server, 'secureConnection') as Promise<[tls.TLSSocket]>
  const client = tls.connect({
    port: (server.address() as AddressInfo).port,
    host: '127.0.0.1',
    cert: opts.client.certPem,
    key: opts.client.privateKeyPem,
    ca: opts.clientCa,
    rejectUnauthorized: false,
    checkServerIdentity: () => undefined
  })
  try {
    const [[serverSide]] = await Promise.all([accepted, once(client, 'secureConnect')])
    return {
      serverAuthorized: serverSide.authorized,
      serverError: serverSide.authorizationError?.toString(),
      clientAuthorized: client.authorized,
      clientError: client.authorizationError?.toString(),
      clientUri: serverSide.getPeerX509Certificate()?.subjectAltName
    }
  } finally {
    client.destroy()
    server.close()
  }
}

t.test('a new CA has one active root shaped like Consul\'s, key for key and type for type', async (t) => {
  const ca = await DevCertificateAuthority.create({ clusterId: CLUSTER_ID, index: 9 })
  const want = captured('ca-roots.json')
  const roots = ca.roots()
  t.equal(roots.length, 1)
  t.same(shape(roots[0]), shape(want.Roots[0]))
  const root = roots[0] as CARoot
  t.equal(root.ID, ca.activeRootId())
  t.equal(root.Name, 'Consul CA Primary Cert')
  t.equal(root.ExternalTrustDomain, CLUSTER_ID)
  t.equal(root.IntermediateCerts, null)
  t.equal(root.Active, true)
  t.equal(root.PrivateKeyType, 'ec')
  t.equal(root.PrivateKeyBits, 256)
  t.equal(root.CreateIndex, 9)
  t.equal(root.ModifyIndex, 9)
  t.equal(ca.trustDomain, `${CLUSTER_ID}.consul`)
  t.equal(ca.clusterId, CLUSTER_ID)
})

t.test('the root is a self-signed P-256 CA with Consul\'s name, extensions, ID and SigningKeyID', async (t) => {
  const before = Date.now()
  const ca = await DevCertificateAuthority.create({ clusterId: CLUSTER_ID })
  const root = ca.roots()[0] as CARoot
  const cert = rootCert(root)
  t.match(root.RootCert, /^-----BEGIN CERTIFICATE-----\n(?:[A-Za-z0-9+/=]{1,64}\n)+-----END CERTIFICATE-----\n$/, 'newline-terminated PEM, 64-column base64')
  t.match(cert.subject, /^CN=pri-[0-9a-z]{8}\.consul\.ca\.2a146f8e\.consul$/)
  t.equal(cert.issuer, cert.subject)
  t.ok(cert.ca, 'CA:true')
  t.ok(cert.checkIssued(cert) && cert.verify(cert.publicKey), 'self-signed')
  t.equal(cert.publicKey.asymmetricKeyDetails?.namedCurve, 'prime256v1')
  t.equal(cert.subjectAltName, `URI:spiffe://${CLUSTER_ID}.consul`)
  t.same(keyUsage(root.RootCert), { critical: true, usages: ['crlSign', 'digitalSignature', 'keyCertSign'] })
  t.equal(extension(root.RootCert, asn.id_ce_basicConstraints).critical, true)
  t.equal(signatureAlgorithm(root.RootCert), ECDSA_WITH_SHA256)
  t.equal(root.ID, createHash('sha1').update(cert.raw).digest('hex').replace(/(..)(?!$)/g, '$1:'))
  t.equal(root.ID, cert.fingerprint.toLowerCase())
  t.match(root.SigningKeyID, /^[0-9a-f]{2}(?::[0-9a-f]{2}){31}$/, '32-byte key id')
  t.equal(root.SigningKeyID, subjectKeyId(root.RootCert))
  t.equal(authorityKeyId(root.RootCert), root.SigningKeyID)
  t.equal(root.SerialNumber, Number.parseInt(cert.serialNumber, 16))
  t.equal(root.NotBefore, new Date(cert.validFrom).toISOString().replace('.000Z', 'Z'))
  const notBefore = Date.parse(root.NotBefore)
  t.ok(notBefore <= Date.now() && notBefore >= before - 1000, 'NotBefore is now')
  const tenYears = new Date(notBefore)
  tenYears.setUTCFullYear(tenYears.getUTCFullYear() + 10)
  t.equal(Date.parse(root.NotAfter), tenYears.getTime(), 'NotAfter is ten years on')
  t.equal(Date.parse(root.NotAfter), Date.parse(cert.validTo))
})

t.test('defaults: a random cluster id, a lowercase trust domain, dc1 and 72 hour leaves', async (t) => {
  const a = await DevCertificateAuthority.create()
  const b = await DevCertificateAuthority.create()
  t.match(a.clusterId, /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/)
  t.not(a.clusterId, b.clusterId)
  t.not(a.activeRootId(), b.activeRootId())
  t.equal(a.leafTTLms, 72 * HOUR)
  t.equal(a.roots()[0]?.CreateIndex, 1)
  const leaf = await a.signLeaf('web')
  t.equal(leaf.uri, `spiffe://${a.trustDomain}/ns/default/dc/dc1/svc/web`)
  const upper = await DevCertificateAuthority.create({ clusterId: 'ABCDEF12-0000-0000-0000-000000000000' })
  t.equal(upper.trustDomain, 'abcdef12-0000-0000-0000-000000000000.consul')
})

t.test('roots() returns fresh objects each call', async (t) => {
  const ca = await DevCertificateAuthority.create()
  await ca.rotate()
  const first = ca.roots()
  first[0]?.IntermediateCerts?.push('tampered');
  (first[1] as CARoot).Active = true
  const second = ca.roots()
  t.equal(second[0]?.IntermediateCerts?.length, 1)
  t.equal(second[1]?.Active, false)
})

t.test('signs a leaf that verifies against the root with one URI SAN, like Consul\'s', async (t) => {
  const ca = await DevCertificateAuthority.create({ clusterId: CLUSTER_ID })
  const root = ca.roots()[0] as CARoot
  const before = Date.now()
  const leaf = await ca.signLeaf('api')
  const cert = new X509Certificate(leaf.certPem)
  const issuer = rootCert(root)

  t.equal(splitPem(leaf.certPem).length, 1, 'the first root has no intermediates')
  t.ok(leaf.certPem.endsWith('-----END CERTIFICATE-----\n'))
  t.ok(cert.verify(issuer.publicKey), 'signature verifies with the root key')
  t.ok(cert.checkIssued(issuer), 'issuer name and key id match the root')
  t.equal(leaf.uri, `spiffe://${CLUSTER_ID}.consul/ns/default/dc/dc1/svc/api`)
  t.equal(cert.subjectAltName, `URI:${leaf.uri}`, 'exactly one SAN, the URI')
  t.notOk(cert.subject, 'empty subject')
  t.equal(extension(leaf.certPem, asn.id_ce_subjectAltName).critical, true, 'SAN critical because the subject is empty')
  t.same(cert.keyUsage?.slice().sort(), [SERVER_AUTH, CLIENT_AUTH].sort(), 'EKU clientAuth and serverAuth')
  t.same(keyUsage(leaf.certPem), { critical: true, usages: ['dataEncipherment', 'digitalSignature', 'keyAgreement', 'keyEncipherment'] })
  t.equal(cert.ca, false)
  t.equal(extension(leaf.certPem, asn.id_ce_basicConstraints).critical, true)
  t.equal(authorityKeyId(leaf.certPem), root.SigningKeyID)
  t.match(subjectKeyId(leaf.certPem), /^[0-9a-f]{2}(?::[0-9a-f]{2}){31}$/)
  t.equal(signatureAlgorithm(leaf.certPem), ECDSA_WITH_SHA256)

  t.equal(leaf.validAfter.getTime(), Date.parse(cert.validFrom), 'validAfter is the encoded NotBefore')
  t.equal(leaf.validBefore.getTime(), Date.parse(cert.validTo), 'validBefore is the encoded NotAfter')
  t.ok(leaf.validAfter.getTime() <= before - 60_000 && leaf.validAfter.getTime() > before - 62_000, 'NotBefore is one minute ago')
  t.equal(leaf.validBefore.getTime() - leaf.validAfter.getTime(), 72 * HOUR, 'NotAfter = NotBefore + TTL')

  t.match(leaf.serialNumber, /^[0-9a-f]{2}(?::[0-9a-f]{2})*$/)
  t.equal(leaf.serialNumber.replaceAll(':', ''), cert.serialNumber.toLowerCase())

  t.match(leaf.privateKeyPem, /^-----BEGIN EC PRIVATE KEY-----\n[^]+\n-----END EC PRIVATE KEY-----\n$/)
  const key = createPrivateKey(leaf.privateKeyPem)
  t.equal(key.asymmetricKeyDetails?.namedCurve, 'prime256v1')
  t.ok(cert.checkPrivateKey(key), 'the key belongs to the certificate')
  t.equal(cert.publicKey.asymmetricKeyDetails?.namedCurve, 'prime256v1')
})

t.test('a leaf has the same field set as Consul\'s captured leaf for the same service', async (t) => {
  const want = JSON.parse(readFileSync(resolve(CAPTURED, 'ca-leaf-api.json'), 'utf8')) as { ServiceURI: string, SerialNumber: string }
  const ca = await DevCertificateAuthority.create({ clusterId: CLUSTER_ID })
  const leaf = await ca.signLeaf('api')
  t.equal(leaf.uri, want.ServiceURI)
  t.match(want.SerialNumber, /^[0-9a-f]{2}(?::[0-9a-f]{2})*$/, 'same serial format as Consul')
})

t.test('leaf URIs carry the datacenter, namespace and a non-default partition, lowercased', async (t) => {
  const ca = await DevCertificateAuthority.create({ clusterId: CLUSTER_ID, datacenter: 'east' })
  const td = `${CLUSTER_ID}.consul`
  t.equal((await ca.signLeaf('web')).uri, `spiffe://${td}/ns/default/dc/east/svc/web`)
  t.equal((await ca.signLeaf('web', { datacenter: 'west', namespace: 'team' })).uri, `spiffe://${td}/ns/team/dc/west/svc/web`)
  t.equal((await ca.signLeaf('web', { partition: 'Billing' })).uri, `spiffe://${td}/ap/billing/ns/default/dc/east/svc/web`)
  t.equal((await ca.signLeaf('web', { partition: 'default' })).uri, `spiffe://${td}/ns/default/dc/east/svc/web`)
  const leaf = await ca.signLeaf('web', { partition: 'billing' })
  t.equal(new X509Certificate(leaf.certPem).subjectAltName, `URI:${leaf.uri}`)
})

t.test('two leaves complete a mutual TLS handshake with the root as the only CA', async (t) => {
  const ca = await DevCertificateAuthority.create()
  const root = (ca.roots()[0] as CARoot).RootCert
  const api = await ca.signLeaf('api')
  const web = await ca.signLeaf('web')
  const result = await handshake({ serverCa: root, server: api, clientCa: root, client: web })
  t.same(result, {
    serverAuthorized: true,
    serverError: undefined,
    clientAuthorized: true,
    clientError: undefined,
    clientUri: `URI:${web.uri}`
  })
})

t.test('a leaf of another CA fails the handshake, even with the same trust domain', async (t) => {
  const ca = await DevCertificateAuthority.create({ clusterId: CLUSTER_ID })
  const impostor = await DevCertificateAuthority.create({ clusterId: CLUSTER_ID })
  const root = (ca.roots()[0] as CARoot).RootCert
  const result = await handshake({ serverCa: root, server: await ca.signLeaf('api'), clientCa: root, client: await impostor.signLeaf('web') })
  t.equal(result.serverAuthorized, false)
  t.equal(result.clientAuthorized, true)
})

t.test('OpenSSL accepts leaves for both TLS client and server use, in strict mode', { skip: !hasOpenssl && 'no openssl CLI' }, async (t) => {
  const ca = await DevCertificateAuthority.create()
  const root = (ca.roots()[0] as CARoot).RootCert
  const leaf = await ca.signLeaf('api')
  for (const purpose of ['sslclient', 'sslserver'] as const) {
    const result = await opensslVerify({ trusted: root, chain: leaf.certPem, purpose })
    t.ok(result.ok, `${purpose}: ${result.output}`)
  }
  const other = await DevCertificateAuthority.create()
  t.notOk((await opensslVerify({ trusted: root, chain: (await other.signLeaf('api')).certPem, purpose: 'sslclient' })).ok, 'another CA\'s leaf is refused')
})

t.test('leafTTLms sets the validity of later leaves and rejects non-positive values', async (t) => {
  const ca = await DevCertificateAuthority.create({ leafTTLms: 2 * HOUR })
  t.equal(ca.leafTTLms, 2 * HOUR)
  let leaf = await ca.signLeaf('web')
  t.equal(leaf.validBefore.getTime() - leaf.validAfter.getTime(), 2 * HOUR)
  ca.leafTTLms = 90_000
  leaf = await ca.signLeaf('web')
  t.equal(leaf.validBefore.getTime() - leaf.validAfter.getTime(), 90_000)
  t.equal(Date.parse(new X509Certificate(leaf.certPem).validTo), leaf.validBefore.getTime())
  for (const bad of [0, -1, Number.NaN, Number.POSITIVE_INFINITY]) {
    t.throws(() => { ca.leafTTLms = bad }, RangeError, `${bad} is rejected`)
  }
  t.equal(ca.leafTTLms, 90_000, 'a rejected value leaves the TTL unchanged')
  await t.rejects(DevCertificateAuthority.create({ leafTTLms: 0 }), RangeError)
})

t.test('serials come from one increasing counter shared by roots and leaves', async (t) => {
  const ca = await DevCertificateAuthority.create()
  t.equal(ca.roots()[0]?.SerialNumber, 1)
  t.equal((await ca.signLeaf('a')).serialNumber, '02')
  await ca.rotate()
  t.equal(ca.roots()[0]?.SerialNumber, 3, 'the new root')
  t.equal(new X509Certificate(ca.roots()[0]?.IntermediateCerts?.[0] as string).serialNumber, '04', 'then its cross-signed copy')
  t.equal((await ca.signLeaf('a')).serialNumber, '05')
  const serials: string[] = []
  for (let i = 6; i <= 0x100; i++) serials.push((await ca.issueCertificate({})).certPem)
  const last = await ca.signLeaf('a')
  t.equal(last.serialNumber, '01:01', 'two bytes, big-endian')
  const at0x80 = new X509Certificate(serials[0x80 - 6] as string)
  t.equal(at0x80.serialNumber, '80', 'a serial with the high bit set stays positive')
  t.equal(at0x80.checkIssued(rootCert(ca.roots()[0])), true)
  t.equal(new X509Certificate(last.certPem).serialNumber, '0101')
})

t.test('a given root key (SEC1 or PKCS#8) is used; other key types are refused', async (t) => {
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'prime256v1' })
  const spki = publicKey.export({ type: 'spki', format: 'der' })
  for (const type of ['sec1', 'pkcs8'] as const) {
    const ca = await DevCertificateAuthority.create({ privateKeyPem: privateKey.export({ type, format: 'pem' }) as string })
    t.same(rootCert(ca.roots()[0]).publicKey.export({ type: 'spki', format: 'der' }), spki, `${type} key is the root key`)
  }
  const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ type: 'pkcs8', format: 'pem' }) as string
  const p384 = generateKeyPairSync('ec', { namedCurve: 'secp384r1' }).privateKey.export({ type: 'sec1', format: 'pem' }) as string
  await t.rejects(DevCertificateAuthority.create({ privateKeyPem: rsa }), { name: 'TypeError', message: /EC P-256/ })
  await t.rejects(DevCertificateAuthority.create({ privateKeyPem: p384 }), { name: 'TypeError', message: /EC P-256/ })
})

t.test('rotation lists the new active root first and the old one inactive, like Consul', async (t) => {
  const ca = await DevCertificateAuthority.create({ clusterId: CLUSTER_ID, index: 9 })
  const old = ca.roots()[0] as CARoot
  await ca.rotate({ index: 24 })
  const roots = ca.roots()
  const want = captured('ca-roots-after-rotation.json')
  t.same(roots.map(shape), want.Roots.map(shape), 'same keys and types as the captured rotation')
  const [active, previous] = roots as [CARoot, CARoot]
  t.not(active.ID, old.ID)
  t.not(active.SigningKeyID, old.SigningKeyID)
  t.equal(ca.activeRootId(), active.ID)
  t.equal(active.Active, true)
  t.equal(active.CreateIndex, 24)
  t.equal(active.ModifyIndex, 24)
  t.same(previous, { ...old, Active: false, ModifyIndex: 24 }, 'the old root is unchanged apart from Active and ModifyIndex')
  t.equal(active.IntermediateCerts?.length, 1)
})

t.test('the old root cross-signs the new one: same subject, key and key id, issued by the old root', async (t) => {
  const ca = await DevCertificateAuthority.create({ clusterId: CLUSTER_ID })
  await ca.rotate()
  const [active, previous] = ca.roots() as [CARoot, CARoot]
  const crossPem = active.IntermediateCerts?.[0] as string
  const cross = new X509Certificate(crossPem)
  const newRoot = rootCert(active)
  const oldRoot = rootCert(previous)
  t.equal(cross.subject, newRoot.subject)
  t.equal(cross.issuer, oldRoot.subject)
  t.same(cross.publicKey.export({ type: 'spki', format: 'der' }), newRoot.publicKey.export({ type: 'spki', format: 'der' }))
  t.equal(subjectKeyId(crossPem), active.SigningKeyID)
  t.equal(authorityKeyId(crossPem), previous.SigningKeyID)
  t.ok(cross.ca)
  t.equal(extension(crossPem, asn.id_ce_basicConstraints).critical, true)
  t.equal(cross.subjectAltName, `URI:spiffe://${CLUSTER_ID}.consul`)
  t.ok(cross.verify(oldRoot.publicKey) && cross.checkIssued(oldRoot), 'signed by the old root')
  t.notOk(cross.verify(newRoot.publicKey))
  t.equal(Date.parse(cross.validTo) - Date.parse(cross.validFrom), 7 * 24 * HOUR, 'valid for 7 days, as captured')
})

t.test('after rotation a new leaf chains to either root; an old leaf still chains to the old root', async (t) => {
  const ca = await DevCertificateAuthority.create()
  const oldLeaf = await ca.signLeaf('web')
  await ca.rotate()
  const [active, previous] = ca.roots() as [CARoot, CARoot]
  const leaf = await ca.signLeaf('api')
  const chain = splitPem(leaf.certPem)
  t.equal(chain.length, 2, 'leaf + cross-signed root')
  t.equal(chain[1], active.IntermediateCerts?.[0])
  t.equal(authorityKeyId(leaf.certPem), active.SigningKeyID)
  t.ok(new X509Certificate(leaf.certPem).verify(rootCert(active).publicKey))

  const onlyOld = await handshake({ serverCa: previous.RootCert, server: oldLeaf, clientCa: previous.RootCert, client: leaf })
  t.equal(onlyOld.serverAuthorized, true, `server trusting only the old root: ${onlyOld.serverError}`)
  const onlyNew = await handshake({ serverCa: active.RootCert, server: leaf, clientCa: previous.RootCert, client: leaf })
  t.equal(onlyNew.serverAuthorized, true, `server trusting only the new root: ${onlyNew.serverError}`)
  t.equal(onlyNew.clientAuthorized, true, `client trusting only the old root: ${onlyNew.clientError}`)
  const oldLeafToNewRoot = await handshake({ serverCa: active.RootCert, server: leaf, clientCa: active.RootCert, client: oldLeaf })
  t.equal(oldLeafToNewRoot.serverAuthorized, false, 'an old leaf does not chain to the new root alone')

  if (hasOpenssl) {
    t.ok((await opensslVerify({ trusted: previous.RootCert, chain: leaf.certPem, purpose: 'sslclient' })).ok, 'OpenSSL: old root')
    t.ok((await opensslVerify({ trusted: active.RootCert, chain: leaf.certPem, purpose: 'sslserver' })).ok, 'OpenSSL: new root')
  }
})

t.test('rotate() uses a given key and defaults its index to one past the highest ModifyIndex', async (t) => {
  const ca = await DevCertificateAuthority.create({ index: 5 })
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'prime256v1' })
  await ca.rotate({ privateKeyPem: privateKey.export({ type: 'sec1', format: 'pem' }) as string })
  const [active, previous] = ca.roots() as [CARoot, CARoot]
  t.same(rootCert(active).publicKey.export({ type: 'spki', format: 'der' }), publicKey.export({ type: 'spki', format: 'der' }))
  t.equal(active.CreateIndex, 6)
  t.equal(previous.ModifyIndex, 6)
})

t.test('repeated rotations keep the three newest roots, each cross-signed by its predecessor', async (t) => {
  const ca = await DevCertificateAuthority.create()
  const ids = [ca.activeRootId()]
  for (let i = 0; i < 4; i++) {
    await ca.rotate()
    ids.unshift(ca.activeRootId())
  }
  const roots = ca.roots()
  t.same(roots.map((root) => root.ID), ids.slice(0, 3), 'newest first, oldest dropped')
  t.same(roots.map((root) => root.Active), [true, false, false])
  for (let i = 0; i < 2; i++) {
    const cross = new X509Certificate(roots[i]?.IntermediateCerts?.[0] as string)
    t.ok(cross.checkIssued(rootCert(roots[i + 1])) && cross.verify(rootCert(roots[i + 1]).publicKey), `root ${i} cross-signed by root ${i + 1}`)
    t.equal(roots[i]?.IntermediateCerts?.length, 1, 'only the predecessor\'s cross-signature is carried')
  }
})

t.test('concurrent rotations run one after the other', async (t) => {
  const ca = await DevCertificateAuthority.create()
  await Promise.all([ca.rotate({ index: 10 }), ca.rotate({ index: 11 })])
  const roots = ca.roots()
  t.same(roots.map((root) => root.CreateIndex), [11, 10, 1])
  for (let i = 0; i < 2; i++) {
    const cross = new X509Certificate(roots[i]?.IntermediateCerts?.[0] as string)
    t.ok(cross.checkIssued(rootCert(roots[i + 1])), `root ${i} cross-signed by root ${i + 1}`)
  }
})

t.test('a failed rotation changes nothing and does not block the next one', async (t) => {
  const ca = await DevCertificateAuthority.create()
  const before = ca.roots()
  await t.rejects(ca.rotate({ privateKeyPem: 'not a key' }))
  t.same(ca.roots(), before)
  await ca.rotate()
  t.equal(ca.roots().length, 2)
})

t.test('issueCertificate: defaults to a leaf-like certificate without SAN', async (t) => {
  const ca = await DevCertificateAuthority.create()
  const root = rootCert(ca.roots()[0])
  const before = Date.now()
  const issued = await ca.issueCertificate({})
  const cert = new X509Certificate(issued.certPem)
  t.ok(cert.verify(root.publicKey))
  t.equal(cert.subjectAltName, undefined)
  t.notOk(extensions(issued.certPem).has(asn.id_ce_subjectAltName))
  t.same(cert.keyUsage?.slice().sort(), [SERVER_AUTH, CLIENT_AUTH].sort())
  t.ok(cert.checkPrivateKey(createPrivateKey(issued.privateKeyPem)))
  t.match(issued.privateKeyPem, /^-----BEGIN EC PRIVATE KEY-----\n/)
  const notBefore = Date.parse(cert.validFrom)
  t.ok(notBefore <= before - 60_000 && notBefore > before - 62_000)
  t.equal(Date.parse(cert.validTo) - notBefore, ca.leafTTLms)
})

t.test('issueCertificate: several URIs, DNS names, a subject and chosen EKUs', async (t) => {
  const ca = await DevCertificateAuthority.create()
  const issued = await ca.issueCertificate({
    uris: ['spiffe://other.consul/ns/default/dc/dc1/svc/web', 'spiffe://x/agent/client/dc/dc1/id/n1'],
    dnsNames: ['localhost'],
    commonName: 'web.example',
    extKeyUsage: ['serverAuth']
  })
  const cert = new X509Certificate(issued.certPem)
  t.equal(cert.subjectAltName, 'DNS:localhost, URI:spiffe://other.consul/ns/default/dc/dc1/svc/web, URI:spiffe://x/agent/client/dc/dc1/id/n1')
  t.equal(cert.subject, 'CN=web.example')
  t.equal(extension(issued.certPem, asn.id_ce_subjectAltName).critical, false, 'SAN need not be critical with a subject')
  t.same(cert.keyUsage, [SERVER_AUTH])
  const unicode = new X509Certificate((await ca.issueCertificate({ commonName: 'wéb_1', extKeyUsage: [] })).certPem)
  t.equal(unicode.subject, 'CN=wéb_1', 'non-printable names are encoded as UTF-8')
  t.equal(unicode.keyUsage, undefined, 'an empty EKU list omits the extension')
})

t.test('issueCertificate: an expired certificate fails the handshake as expired', async (t) => {
  const ca = await DevCertificateAuthority.create()
  const root = (ca.roots()[0] as CARoot).RootCert
  const now = Date.now()
  const expired = await ca.issueCertificate({
    uris: [`spiffe://${ca.trustDomain}/ns/default/dc/dc1/svc/web`],
    notBefore: new Date(now - 2 * HOUR),
    notAfter: new Date(now - HOUR)
  })
  t.equal(Date.parse(new X509Certificate(expired.certPem).validTo), Math.floor((now - HOUR) / 1000) * 1000)
  const result = await handshake({ serverCa: root, server: await ca.signLeaf('api'), clientCa: root, client: expired })
  t.equal(result.serverAuthorized, false)
  t.equal(result.serverError, 'CERT_HAS_EXPIRED')
})

t.test('issueCertificate after rotation appends the intermediates', async (t) => {
  const ca = await DevCertificateAuthority.create()
  await ca.rotate()
  const issued = await ca.issueCertificate({ uris: ['spiffe://x'] })
  t.equal(splitPem(issued.certPem).length, 2)
  t.equal(splitPem(issued.certPem)[1], ca.roots()[0]?.IntermediateCerts?.[0])
})
