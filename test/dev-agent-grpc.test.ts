// The dev agent's gRPC ConnectCAService (docs/semantics.md#dev-agent-grpc): what Sign accepts and refuses, the
// WatchRoots stream across a rotation and close(), the token rule, the request log, the options,
// and the CSRs the plugin writes (lib/certificates/csr.ts).
import t from 'tap'
import { once } from 'node:events'
import net from 'node:net'
import { generateKeyPairSync, X509Certificate } from 'node:crypto'
import * as grpc from '@grpc/grpc-js'
import { connectCA } from '../lib/certificates/connectca'
import type { ConnectCAClient, ConnectCAClientConstructor, WatchRootsResponse } from '../lib/certificates/connectca'
import { createCsr, parseCsr } from '../lib/certificates/csr'
import { startDevAgent } from '../lib/dev-agent/index'
import type { DevAgent } from '../lib/dev-agent/index'
import { startAgent } from './helpers/mesh'
import type { Tap } from './helpers/mesh'

const ecKey = (): ReturnType<typeof generateKeyPairSync>['privateKey'] => generateKeyPairSync('ec', { namedCurve: 'prime256v1' }).privateKey

function client (t: Tap, agent: DevAgent): ConnectCAClient {
  const Client = connectCA() as unknown as ConnectCAClientConstructor
  const c = new Client(agent.grpcAddress as string, grpc.credentials.createInsecure())
  t.teardown(() => c.close())
  return c
}

function metadata (token?: string): grpc.Metadata {
  const m = new grpc.Metadata()
  if (token !== undefined) m.set('x-consul-token', token)
  return m
}

async function sign (c: ConnectCAClient, csr: string, token?: string): Promise<{ certPem?: string, code?: number, details?: string }> {
  return await new Promise((resolve) => {
    c.Sign({ csr }, metadata(token), {}, (err, response) => resolve(err === null ? { certPem: response?.certPem } : { code: err.code, details: err.details }))
  })
}

t.test('Sign certifies a CSR for a service of this datacenter, and refuses anything else', async (t) => {
  const agent = await startAgent(t, { grpcPort: 0 })
  const c = client(t, agent)
  const td = agent.trustDomain
  const uri = `spiffe://${td}/ns/default/dc/dc1/svc/api`
  const key = ecKey()
  const ok = await sign(c, createCsr(key, [uri]))
  const leaf = new X509Certificate(ok.certPem as string)
  t.equal(leaf.subjectAltName, `URI:${uri}`)
  t.ok(leaf.checkPrivateKey(key), 'certifies the requested key')
  t.ok(leaf.verify(new X509Certificate(agent.ca.roots()[0]?.RootCert as string).publicKey))

  const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey
  const refusals: Array<[string, string, RegExp]> = [
    ['empty', '', /^CSR is required$/],
    ['not a CSR', 'garbage', /invalid CSR: no CERTIFICATE REQUEST PEM block/],
    ['two URIs', createCsr(key, [uri, `spiffe://${td}/ns/default/dc/dc1/svc/web`]), /contains 2 URIs, expected exactly one/],
    ['no URI', createCsr(key, []), /contains 0 URIs/],
    ['an agent ID', createCsr(key, [`spiffe://${td}/agent/client/dc/dc1/id/node-1`]), /not a service identity/],
    ['another trust domain', createCsr(key, ['spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/api']), /different trust domain/],
    ['another datacenter', createCsr(key, [`spiffe://${td}/ns/default/dc/dc2/svc/api`]), /different datacenter: dc2/],
    ['a namespace', createCsr(key, [`spiffe://${td}/ns/team/dc/dc1/svc/api`]), /Consul Enterprise feature/],
    ['an RSA key', createCsr(rsa, [uri]), /signs EC keys only/]
  ]
  for (const [name, csr, details] of refusals) {
    const res = await sign(c, csr)
    t.equal(res.code, grpc.status.INVALID_ARGUMENT, name)
    t.match(res.details, details, name)
  }
  t.same(agent.requestLog.filter((e) => e.method === 'gRPC').length, 1 + refusals.length, 'every call is in the request log')
})

t.test('the token rule with ACLs on: Sign and WatchRoots need service:write', async (t) => {
  const agent = await startAgent(t, { grpcPort: 0, acl: { enabled: true, defaultPolicy: 'deny', tokens: { w: 'write', r: 'read' } } })
  const c = client(t, agent)
  const csr = createCsr(ecKey(), [`spiffe://${agent.trustDomain}/ns/default/dc/dc1/svc/api`])
  t.ok((await sign(c, csr, 'w')).certPem, 'write token')
  t.match(await sign(c, csr, 'r'), { code: grpc.status.PERMISSION_DENIED, details: /lacks permission 'service:write' on "api"/ })
  t.match(await sign(c, csr), { code: grpc.status.PERMISSION_DENIED }, 'anonymous under default deny')
  t.match(await sign(c, csr, 'unknown'), { code: grpc.status.UNAUTHENTICATED, details: 'ACL not found' })
  const stream = c.WatchRoots({}, metadata('r'))
  const [err] = await once(stream, 'error') as [grpc.ServiceError]
  t.equal(err.code, grpc.status.PERMISSION_DENIED, 'WatchRoots with a read token')
})

t.test('WatchRoots sends the roots at once and after every rotation; close() ends the stream', async (t) => {
  const agent = await startDevAgent({ grpcPort: 0 })
  const c = client(t, agent)
  const stream = c.WatchRoots({}, metadata())
  const messages: WatchRootsResponse[] = []
  stream.on('data', (m: WatchRootsResponse) => messages.push(m))
  await once(stream, 'data')
  t.equal(messages[0]?.trustDomain, agent.trustDomain)
  t.equal(messages[0]?.activeRootId, agent.ca.activeRootId())
  t.equal(messages[0]?.roots[0]?.rootCert, agent.ca.roots()[0]?.RootCert)
  await agent.ca.rotate()
  await once(stream, 'data')
  t.equal(messages[1]?.roots.length, 2)
  t.equal(messages[1]?.activeRootId, agent.ca.activeRootId())
  t.same(messages[1]?.roots[0]?.intermediateCerts, agent.ca.roots()[0]?.IntermediateCerts)
  const ended = once(stream, 'end')
  await agent.close()
  await ended
  t.pass('the stream ends with the agent')
})

t.test('grpcPort and grpcTls options', async (t) => {
  await t.rejects(startDevAgent({ grpcPort: -1 }), { message: /grpcPort: must be an integer/ })
  await t.rejects(startDevAgent({ grpcPort: 0, grpcTls: 'yes' as never }), { message: /grpcTls: must be a boolean/ })
  const plain = await startAgent(t, {})
  t.equal(plain.grpcAddress, null)
  t.equal(plain.grpcCaPem, null)
  // A gRPC port in use fails the start, and the HTTP port is released again.
  const blocker = net.createServer()
  await new Promise<void>((resolve) => blocker.listen(0, '127.0.0.1', () => resolve()))
  t.teardown(() => blocker.close())
  const busy = (blocker.address() as net.AddressInfo).port
  const free = net.createServer()
  await new Promise<void>((resolve) => free.listen(0, '127.0.0.1', () => resolve()))
  const httpPort = (free.address() as net.AddressInfo).port
  await new Promise<void>((resolve) => free.close(() => resolve()))
  await t.rejects(startDevAgent({ port: httpPort, grpcPort: busy }), Error, 'port in use')
  const again = await startDevAgent({ port: httpPort })
  t.equal(again.port, httpPort, 'the HTTP port was released')
  await again.close()
})

t.test('parseCsr refuses what is not a well-formed, correctly signed request', async (t) => {
  const key = ecKey()
  const pem = createCsr(key, ['spiffe://example.consul/ns/default/dc/dc1/svc/api'])
  const der = Buffer.from(pem.replace(/-----[A-Z ]+-----|\s/g, ''), 'base64')
  const wrap = (bytes: Buffer): string => `-----BEGIN CERTIFICATE REQUEST-----\n${bytes.toString('base64')}\n-----END CERTIFICATE REQUEST-----\n`
  const replace = (from: string, to: string): Buffer => {
    const at = der.indexOf(Buffer.from(from, 'hex'))
    const copy = Buffer.from(der)
    Buffer.from(to, 'hex').copy(copy, at)
    return copy
  }
  t.same(parseCsr(pem).uris, ['spiffe://example.consul/ns/default/dc/dc1/svc/api'])
  const cases: Array<[string, Buffer, RegExp]> = [
    ['truncated', der.subarray(0, 40), /request: truncated/],
    ['trailing bytes', Buffer.concat([der, Buffer.of(0)]), /not a DER structure/],
    ['indefinite length', Buffer.from('3080', 'hex'), /bad length/],
    ['empty', Buffer.alloc(0), /truncated/],
    ['one part only', Buffer.from('30053003020100', 'hex'), /expected info, algorithm and signature/],
    ['no signature', Buffer.from('300a30030201003003020100', 'hex'), /expected info, algorithm and signature/],
    ['long lengths', Buffer.from('3081033003020100', 'hex').subarray(0, 6), /truncated/],
    ['a length cut short', Buffer.from('308201', 'hex'), /request: truncated/],
    ['info without key', Buffer.from('3014' + '3003020100' + '300a06082a8648ce3d040302' + '030100', 'hex'), /no subject public key/],
    ['SHA-384 claimed', replace('2a8648ce3d040302', '2a8648ce3d040303'), /unsupported signature algorithm 1\.2\.840\.10045\.4\.3\.3/],
    ['altered identity', replace(Buffer.from('svc/api').toString('hex'), Buffer.from('svc/apj').toString('hex')), /signature does not match/]
  ]
  for (const [name, bytes, message] of cases) t.throws(() => parseCsr(wrap(bytes)), { message }, name)
  t.throws(() => parseCsr('nothing'), { message: /no CERTIFICATE REQUEST PEM block/ })
})
