// certificates: { source: 'consul-grpc' } (docs/semantics.md#consul-grpc): agentless, against the dev agent's
// gRPC port and HTTP API, and against a fake server for what a dev agent would not do on its own.
// Every change is awaited through the plugin's events or the server's calls, never by sleeping.
import t from 'tap'
import { once } from 'node:events'
import { X509Certificate } from 'node:crypto'
import { writeFile, mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import Fastify from 'fastify'
import type { FastifyInstance } from 'fastify'
import * as grpc from '@grpc/grpc-js'
import consulNative, { httpsOptions } from '../lib/index'
import type { ConsulNativeOptions } from '../lib/index'
import { failureCause, renewalDelay, resolveGrpcTarget } from '../lib/certificates/consul-grpc'
import { resolveOptions } from '../lib/options'
import type { DevAgent } from '../lib/dev-agent/index'
import { defaultRoutes, get, mtlsClient, setIntentions, setProtocol, startAgent, waitForStatus } from './helpers/mesh'
import type { Credentials, Tap } from './helpers/mesh'
import { servedLeaf, startLoad } from './helpers/load'
import { nthCall, startFakeConnectCA } from './helpers/fake-connect-ca'
import { GrpcCertificateSource } from '../lib/certificates/consul-grpc'
import type { CertificateSink, LeafCertificate, TrustBundle } from '../lib/certificates/source'
import { recordingLogger } from './helpers/stub-agent'
import { startTcpProxy } from './helpers/tcp-proxy'
import { startProxy } from './helpers/agent-proxy'

async function startGrpcService (t: Tap, httpAddress: string, certificates: ConsulNativeOptions['certificates'], extra: Partial<ConsulNativeOptions> = {}): Promise<{ app: FastifyInstance, port: number, origin: string }> {
  const app = Fastify({ https: httpsOptions() }) as unknown as FastifyInstance
  t.teardown(async () => await app.close())
  await app.register(consulNative, { service: 'api', agent: { address: httpAddress }, ...extra, certificates })
  defaultRoutes(app)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const port = (app.server.address() as { port: number }).port
  return { app, port, origin: `https://127.0.0.1:${port}` }
}

/** A caller's leaf straight from the CA (no /v1/agent/connect/* request), and every root. */
async function callerCreds (agent: DevAgent, service: string): Promise<Credentials> {
  const leaf = await agent.ca.signLeaf(service)
  return { key: leaf.privateKeyPem, cert: leaf.certPem, ca: agent.ca.roots().map((root) => root.RootCert) }
}

function agentConnectCalls (agent: DevAgent): string[] {
  return agent.requestLog.filter((entry) => entry.path.startsWith('/v1/agent/connect/')).map((entry) => `${entry.method} ${entry.path}`)
}

t.test('agentless end to end: mTLS, L7 intentions and a CA rotation under load, without /v1/agent/connect/*', async (t) => {
  const agent = await startAgent(t, { grpcPort: 0, defaultPolicy: 'deny' })
  await setProtocol(agent, 'api', 'http')
  await setIntentions(agent, 'api', [{ Name: 'web', Permissions: [{ Action: 'deny', HTTP: { PathPrefix: '/admin' } }, { Action: 'allow', HTTP: { PathPrefix: '/', Methods: ['GET'] } }] }])
  const svc = await startGrpcService(t, agent.address, { source: 'consul-grpc', address: agent.grpcAddress as string, plaintext: true })

  const status = svc.app.consulNative.status()
  t.equal(status.ready, true)
  t.equal(status.trustDomain, agent.trustDomain, 'trust domain from WatchRoots')
  t.equal(status.leaf?.uri, `spiffe://${agent.trustDomain}/ns/default/dc/dc1/svc/api`, 'the SPIFFE ID of the service, datacenter from /v1/agent/self')
  t.same(status.roots?.ids, agent.ca.roots().map((root) => root.ID))

  const web = await callerCreds(agent, 'web')
  const client = mtlsClient(t, web)
  t.equal((await get(client, `${svc.origin}/v1/items/1`)).status, 200, 'GET allowed by an L7 permission')
  t.equal((await get(client, `${svc.origin}/admin`)).status, 403, 'denied by an L7 permission')
  t.equal((await get(client, `${svc.origin}/v1/items`, { method: 'POST' })).status, 403, 'no permission matches: default deny')
  t.equal((await get(mtlsClient(t, await callerCreds(agent, 'billing')), `${svc.origin}/`)).status, 403, 'no intention: default deny')

  const load = startLoad(t, svc.origin, web)
  await load.more(20)
  const oldSerial = status.leaf?.serial
  await agent.ca.rotate()
  await waitForStatus(svc.app, (s) => s.roots?.ids.length === 2 && s.leaf?.serial !== oldSerial)
  await load.more(20)
  const result = await load.stop()
  t.equal(result.failures, 0, `no failed request out of ${result.requests} (${result.errors.slice(0, 3).join('; ')})`)
  const newRoot = new X509Certificate(agent.ca.roots()[0]?.RootCert as string)
  t.ok((await servedLeaf(svc.port, web)).verify(newRoot.publicKey), 'the leaf is re-signed under the new active root at once')
  t.equal((await get(mtlsClient(t, await callerCreds(agent, 'web')), `${svc.origin}/v1/items/2`)).status, 200, 'callers with new leaves get in')

  t.same(agentConnectCalls(agent), [], 'no /v1/agent/connect/* endpoint was used')
  const grpcCalls = agent.requestLog.filter((entry) => entry.method === 'gRPC').map((entry) => entry.path)
  t.ok(grpcCalls.includes('/hashicorp.consul.connectca.ConnectCAService/WatchRoots'))
  t.ok(grpcCalls.filter((path) => path.endsWith('/Sign')).length >= 2, 'signed at start and after the rotation')
})

t.test('TLS to the gRPC port, the token as x-consul-token, and refusals at start', async (t) => {
  const agent = await startAgent(t, { grpcPort: 0, grpcTls: true, defaultPolicy: 'allow', acl: { enabled: true, defaultPolicy: 'deny', tokens: { writer: 'write', reader: 'read' } } })
  const dir = await mkdtemp(join(tmpdir(), 'consul-native-grpc-'))
  t.teardown(async () => await rm(dir, { recursive: true, force: true }))
  const caFile = join(dir, 'grpc-ca.pem')
  await writeFile(caFile, agent.grpcCaPem as string)
  const previous = process.env.CONSUL_GRPC_CACERT
  process.env.CONSUL_GRPC_CACERT = caFile
  t.teardown(() => {
    if (previous === undefined) delete process.env.CONSUL_GRPC_CACERT
    else process.env.CONSUL_GRPC_CACERT = previous
  })
  const certificates = { source: 'consul-grpc' as const, address: `https://${agent.grpcAddress as string}`, tlsServerName: 'localhost' }
  const svc = await startGrpcService(t, agent.address, certificates, { agent: { address: agent.address, token: 'writer' } })
  t.equal(svc.app.consulNative.status().ready, true, 'TLS verified with CONSUL_GRPC_CACERT, token allowed to write services')
  t.equal((await get(mtlsClient(t, await callerCreds(agent, 'web')), `${svc.origin}/`)).status, 200)

  for (const [token, reason] of [['reader', /PERMISSION_DENIED: Permission denied: token with AccessorID '[0-9a-f-]+' lacks permission 'service:write'/], ['nobody', /UNAUTHENTICATED: ACL not found/]] as const) {
    const refused = Fastify({ https: httpsOptions() })
    t.teardown(async () => await refused.close())
    const agentOptions = { address: agent.address, token }
    await t.rejects((async () => { await refused.register(consulNative, { service: 'api', agent: agentOptions, defaultPolicy: 'deny', readyTimeout: 1000, certificates }) })(),
      { code: 'FST_CONSUL_NATIVE_NOT_READY', message: reason }, `token ${token}`)
  }
})

t.test('the roots stream survives a server restart and picks up a rotation made while it was down', async (t) => {
  const agent = await startAgent(t, { grpcPort: 0, defaultPolicy: 'allow' })
  const [host, port] = (agent.grpcAddress as string).split(':') as [string, string]
  const proxy = await startTcpProxy(t, { host, port: Number(port) })
  const svc = await startGrpcService(t, agent.address, { source: 'consul-grpc', address: proxy.address, plaintext: true })
  const web = await callerCreds(agent, 'web')
  const events = svc.app.consulNative.events

  const serialBefore = svc.app.consulNative.status().leaf?.serial
  const failed = once(events, 'sync-error')
  await proxy.cut()
  const [{ watch, error }] = await failed as [{ watch: string, error: Error & { code: string } }]
  t.equal(watch, 'roots')
  t.equal(error.code, 'FST_CONSUL_NATIVE_CERTIFICATE_SOURCE')
  t.match(error.message, /consul-grpc WatchRoots: (UNAVAILABLE|INTERNAL|CANCELLED)|ended the stream/)
  t.equal((await get(mtlsClient(t, web), `${svc.origin}/`)).status, 200, 'serving on with the last good material')
  t.equal(svc.app.consulNative.status().ready, true)

  await agent.ca.rotate()
  await proxy.resume()
  await waitForStatus(svc.app, (s) => s.roots?.ids.length === 2 && s.leaf?.serial !== serialBefore && s.watches.roots?.lastError === null)
  t.ok((await servedLeaf(svc.port, web)).verify(new X509Certificate(agent.ca.roots()[0]?.RootCert as string).publicKey), 'a leaf of the new root')
  t.same(svc.app.consulNative.status().roots?.ids, agent.ca.roots().map((root) => root.ID), 'the roots after the restart')
})

t.test('a stream the server ends is reopened; bad roots messages keep the last good roots', async (t) => {
  const fake = await startFakeConnectCA(t)
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const svc = await startGrpcService(t, agent.address, { source: 'consul-grpc', address: fake.address, plaintext: true }, { agent: { address: agent.address, token: 'secret-token' } })
  t.equal(svc.app.consulNative.status().trustDomain, fake.ca.trustDomain)
  t.same([...new Set(fake.tokens)], ['secret-token'], 'the token travels as x-consul-token on every call')
  const events = svc.app.consulNative.events

  const ended = once(events, 'sync-error')
  fake.endStreams()
  t.match((await ended as [{ error: Error }])[0].error.message, /the server ended the stream; reconnecting/)
  await nthCall(fake, 'watch', 2)
  await waitForStatus(svc.app, (s) => s.watches.roots?.lastError === null)
  t.pass('reconnected')

  const good = svc.app.consulNative.status().roots
  const bad: Array<[Partial<Parameters<typeof fake.rootsMessage>[0]>, RegExp]> = [
    [{ trustDomain: '' }, /answer without a trust domain/],
    [{ roots: [] }, /answer without roots/],
    [{ activeRootId: 'nope' }, /active root "nope" is not among the roots/],
    [{ roots: fake.rootsMessage().roots.map((root) => ({ ...root, rootCert: 'garbage' })) }, /consul-grpc WatchRoots: /]
  ]
  for (const [change, reason] of bad) {
    const failed = once(events, 'sync-error')
    fake.push(fake.rootsMessage(change as never))
    const [{ watch, error }] = await failed as [{ watch: string, error: Error }]
    t.equal(watch, 'roots')
    t.match(error.message, reason)
    t.same(svc.app.consulNative.status().roots, good, 'last good roots kept')
  }
  const leafPem = (await fake.ca.signLeaf('x')).certPem
  const notCa = once(events, 'sync-error')
  fake.push(fake.rootsMessage({ roots: fake.rootsMessage().roots.map((root) => ({ ...root, rootCert: leafPem })) }))
  t.match((await notCa as [{ error: Error }])[0].error.message, /a root is not a CA certificate/)
})

t.test('Sign refusals: NOT_READY at start; later a logged sync error, the last good leaf kept', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })

  const refusing = await startFakeConnectCA(t)
  refusing.signMode = { refuse: grpc.status.PERMISSION_DENIED, details: 'Permission denied: token lacks service:write on "api"' }
  const app = Fastify({ https: httpsOptions() })
  t.teardown(async () => await app.close())
  await t.rejects((async () => { await app.register(consulNative, { service: 'api', agent: { address: agent.address }, readyTimeout: 1000, certificates: { source: 'consul-grpc', address: refusing.address, plaintext: true } }) })(),
    { code: 'FST_CONSUL_NATIVE_NOT_READY', message: /leaf: Certificate source consul-grpc Sign: PERMISSION_DENIED: Permission denied/ })

  const fake = await startFakeConnectCA(t)
  const svc = await startGrpcService(t, agent.address, { source: 'consul-grpc', address: fake.address, plaintext: true })
  const first = svc.app.consulNative.status().leaf
  const web = { key: (await fake.ca.signLeaf('web')).privateKeyPem, cert: '', ca: [] as string[] }
  const webLeaf = await fake.ca.signLeaf('web')
  web.cert = webLeaf.certPem
  web.key = webLeaf.privateKeyPem
  web.ca = fake.ca.roots().map((root) => root.RootCert)

  fake.signMode = { refuse: grpc.status.PERMISSION_DENIED, details: 'Permission denied' }
  const failed = once(svc.app.consulNative.events, 'sync-error')
  // A new active root asks for a new leaf at once.
  await fake.ca.rotate()
  fake.push(fake.rootsMessage())
  const [{ watch, error }] = await failed as [{ watch: string, error: Error }]
  t.equal(watch, 'leaf')
  t.match(error.message, /consul-grpc Sign: PERMISSION_DENIED/)
  const status = svc.app.consulNative.status()
  t.same(status.leaf, first, 'the last good leaf stays until it expires')
  t.equal(status.ready, true)
  t.match(status.watches.leaf?.lastError, /PERMISSION_DENIED/)
  t.equal((await get(mtlsClient(t, web), `${svc.origin}/`)).status, 200, 'and is served')

  fake.signMode = { uri: `spiffe://${fake.ca.trustDomain}/ns/default/dc/dc1/svc/other` }
  const wrong = once(svc.app.consulNative.events, 'sync-error')
  t.match((await wrong as [{ error: Error }])[0].error.message, /the signed leaf is for spiffe:\/\/.*\/svc\/other, not .*\/svc\/api/, 'a leaf for another identity is refused (on the retry)')

  fake.signMode = 'sign'
  await waitForStatus(svc.app, (s) => s.leaf?.serial !== first?.serial)
  t.equal(svc.app.consulNative.status().watches.leaf?.lastError, null, 'recovered on a later retry')
})

t.test('the leaf is renewed before it expires, without any rotation', async (t) => {
  // 70 s leaves, backdated one minute: the renewal point (60–90 % of the lifetime) is at most 3 s away.
  const agent = await startAgent(t, { grpcPort: 0, leafTTL: 70_000, defaultPolicy: 'allow' })
  const svc = await startGrpcService(t, agent.address, { source: 'consul-grpc', address: `http://${agent.grpcAddress as string}` }, { datacenter: 'dc1' })
  const first = svc.app.consulNative.status().leaf?.serial
  await waitForStatus(svc.app, (s) => s.leaf?.serial !== first)
  t.pass('a new leaf came without a rotation')
  t.same(agentConnectCalls(agent), [])
})

t.test('renewalDelay: Consul\'s jittered point between 60% and 90% of the lifetime', async (t) => {
  const hour = 3_600_000
  const cases: Array<[string, number, number, number]> = [
    ['fresh leaf, lowest draw: 60%', 0, 0, 0.6 * hour],
    ['fresh leaf, highest draw: 90%', 0, 1, 0.9 * hour],
    ['fresh leaf, middle draw: 75%', 0, 0.5, 0.75 * hour],
    ['already past 60%: between now and 90%', 0.7 * hour, 0, 0],
    ['already past 60%, highest draw', 0.7 * hour, 1, 0.2 * hour],
    ['past 90%: at once', 0.95 * hour, 0.5, 0],
    ['expired: at once', 2 * hour, 0.5, 0]
  ]
  for (const [name, now, random, expected] of cases) t.equal(renewalDelay(0, hour, now, random), expected, name)
})

t.test('consul-grpc options', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'consul-native-grpc-opts-'))
  t.teardown(async () => await rm(dir, { recursive: true, force: true }))
  const caFile = join(dir, 'ca.pem')
  await writeFile(caFile, 'PEM')
  const target = (certificates: Record<string, unknown>, env: NodeJS.ProcessEnv = {}): ReturnType<typeof resolveGrpcTarget> =>
    resolveGrpcTarget(resolveOptions({ service: 'api', certificates: { source: 'consul-grpc', ...certificates } }).certificates as never, env)
  t.same(target({ address: '10.0.0.5:8503' }), { address: '10.0.0.5:8503', plaintext: false, ca: null, servername: undefined }, 'TLS by default, system CAs')
  t.same(target({}, { CONSUL_GRPC_ADDR: 'http://consul-server.consul:8502' }), { address: 'consul-server.consul:8502', plaintext: true, ca: null, servername: undefined }, 'CONSUL_GRPC_ADDR, http:// is plaintext')
  t.same(target({ address: 'https://[::1]:8503/', tlsServerName: 'server.dc1.consul' }, { CONSUL_GRPC_CACERT: caFile }), { address: '[::1]:8503', plaintext: false, ca: Buffer.from('PEM'), servername: 'server.dc1.consul' }, 'CONSUL_GRPC_CACERT')
  t.same(target({ address: 'h:1', ca: 'INLINE' }, { CONSUL_GRPC_CACERT: '/missing' }).ca, Buffer.from('INLINE'), 'an inline ca wins over CONSUL_GRPC_CACERT')
  t.same(target({ address: 'h:1', caFile }).ca, Buffer.from('PEM'))
  t.equal(target({ address: 'h:1', plaintext: true }).plaintext, true)

  const bad: Array<[Record<string, unknown>, NodeJS.ProcessEnv, RegExp]> = [
    [{}, { CONSUL_GRPC_ADDR: '' }, /needs a Consul server's gRPC address/],
    [{ address: 'consul:8502/path' }, {}, /certificates\.address must be host:port/],
    [{}, { CONSUL_GRPC_ADDR: 'unix:///sock' }, /CONSUL_GRPC_ADDR must be host:port/],
    [{ address: 'h:99999' }, {}, /must be host:port/],
    [{ address: 'https://h:1', plaintext: true }, {}, /certificates\.plaintext: contradicts/],
    [{ address: 'http://h:1', tlsServerName: 'x' }, {}, /certificates\.tlsServerName: only applies to TLS/],
    [{ address: 'h:1', caFile: join(dir, 'missing.pem') }, {}, /cannot read certificates\.caFile/],
    [{ address: 'h:1' }, { CONSUL_GRPC_CACERT: join(dir, 'missing.pem') }, /cannot read CONSUL_GRPC_CACERT/]
  ]
  for (const [certificates, env, message] of bad) {
    t.throws(() => target(certificates, env), { code: 'FST_CONSUL_NATIVE_INVALID_OPTION', message }, JSON.stringify({ certificates, env }))
  }
  const invalid: Array<[Record<string, unknown>, RegExp]> = [
    [{ certificates: { source: 'consul-grpc', ca: 'x', caFile: 'y' } }, /set either certificates\.ca or certificates\.caFile/],
    [{ certificates: { source: 'consul-grpc', ca: 42 } }, /certificates\.ca: must be a non-empty PEM/],
    [{ certificates: { source: 'consul-grpc', plaintext: 'yes' } }, /certificates\.plaintext: must be a boolean/],
    [{ certificates: { source: 'consul-grpc', dir: '/x' } }, /certificates\.dir: is not an option of source 'consul-grpc'/],
    [{ mode: 'agent', certificates: { source: 'consul-grpc' } }, /mode: 'agent' asks the local agent's \/v1\/agent\/connect\/authorize/],
    [{ register: true, certificates: { source: 'consul-grpc' } }, /register: needs a local agent; .*consul-k8s/]
  ]
  for (const [options, message] of invalid) {
    t.throws(() => resolveOptions({ service: 'api', ...options }), { code: 'FST_CONSUL_NATIVE_INVALID_OPTION', message }, JSON.stringify(options))
  }
  const previous = process.env.CONSUL_GRPC_ADDR
  delete process.env.CONSUL_GRPC_ADDR
  t.teardown(() => { if (previous !== undefined) process.env.CONSUL_GRPC_ADDR = previous })
  const app = Fastify({ https: httpsOptions() })
  t.teardown(async () => await app.close())
  await t.rejects((async () => { await app.register(consulNative, { service: 'api', certificates: { source: 'consul-grpc' } }) })(),
    { code: 'FST_CONSUL_NATIVE_INVALID_OPTION', message: /CONSUL_GRPC_ADDR/ }, 'register() fails without an address')
})

t.test('root changes while a Sign is in flight sign once more afterwards, not concurrently', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const fake = await startFakeConnectCA(t)
  const svc = await startGrpcService(t, agent.address, { source: 'consul-grpc', address: fake.address, plaintext: true })
  const signed = fake.calls.sign
  let release!: () => void
  fake.signGate = new Promise((resolve) => { release = resolve })
  await fake.ca.rotate()
  fake.push(fake.rootsMessage())
  await once(fake.events, 'sign-request')
  await fake.ca.rotate()
  fake.push(fake.rootsMessage())
  await waitForStatus(svc.app, (s) => s.roots?.ids.length === 3)
  t.equal(fake.calls.sign, signed + 1, 'one Sign in flight while the second rotation arrives')
  fake.signGate = null
  release()
  await nthCall(fake, 'sign', signed + 2)
  await waitForStatus(svc.app, (s) => s.leaf !== null && s.watches.leaf?.lastError === null && fake.calls.sign === signed + 2)
  const webLeaf = await fake.ca.signLeaf('web')
  const served = await servedLeaf(svc.port, { key: webLeaf.privateKeyPem, cert: webLeaf.certPem })
  t.ok(served.checkIssued(new X509Certificate(fake.ca.roots()[0]?.RootCert as string)), 'the leaf in force is from the newest root')
})

t.test('stop() while Sign is in flight: the answer is discarded, nothing installed or reported', async (t) => {
  const fake = await startFakeConnectCA(t)
  const logger = recordingLogger()
  const source = new GrpcCertificateSource({ address: fake.address, plaintext: true, ca: null, servername: undefined },
    { service: 'api', namespace: undefined, partition: undefined, token: null, datacenter: async () => 'dc1', random: () => 0.5 }, logger.log)
  const updates: Array<{ leaf?: LeafCertificate, trust?: TrustBundle }> = []
  const failures: Error[] = []
  const firstLeaf = new Promise<void>((resolve) => {
    const sink: CertificateSink = {
      update: (change) => {
        updates.push(change)
        if (change.leaf !== undefined) resolve()
      },
      failure: (_part, error) => failures.push(error)
    }
    source.start(sink)
  })
  await firstLeaf
  let release!: () => void
  fake.signGate = new Promise((resolve) => { release = resolve })
  await fake.ca.rotate()
  fake.push(fake.rootsMessage())
  await once(fake.events, 'sign-request')
  const before = updates.length
  source.stop()
  release()
  while (logger.events('certificate-source-stopped').length === 0) await new Promise((resolve) => setImmediate(resolve))
  t.equal(updates.length, before, 'nothing installed after stop()')
  t.same(failures, [], 'nothing reported')
  t.equal(source.health().leaf.lastError, null)
})

t.test('a datacenter that cannot be read is a leaf failure, retried until it can', async (t) => {
  const fake = await startFakeConnectCA(t)
  const logger = recordingLogger()
  let lookups = 0
  const source = new GrpcCertificateSource({ address: fake.address, plaintext: true, ca: null, servername: undefined }, {
    service: 'api',
    namespace: undefined,
    partition: undefined,
    token: null,
    datacenter: async () => {
      if (++lookups === 1) throw new Error('Consul agent answered GET /v1/agent/self with 403: ACL not found')
      return 'dc1'
    },
    random: () => 0
  }, logger.log)
  t.teardown(() => source.stop())
  const failures: Error[] = []
  await new Promise<void>((resolve) => {
    source.start({
      update: (change) => { if (change.leaf !== undefined) resolve() },
      failure: (_part, error) => failures.push(error)
    })
  })
  t.match(failures[0]?.message, /Certificate source consul-grpc leaf: Consul agent answered GET \/v1\/agent\/self with 403/)
  t.equal(lookups, 2)
  t.equal(logger.events('certificate-source-recovered').length, 1, 'recovery logged')
})

t.test('a token without agent:read (a consul-k8s service identity): the datacenter comes from the servers of /v1/health/service/consul', async (t) => {
  const agent = await startAgent(t, { grpcPort: 0, defaultPolicy: 'allow', datacenter: 'dc7' })
  const proxy = await startProxy(t, agent.address)
  let servers = true
  proxy.answer = (call) => {
    if (call.url.startsWith('/v1/agent/self')) return { status: 403, body: 'Permission denied: token with AccessorID \'x\' lacks permission \'agent:read\' on "server-1"' }
    if (call.url.startsWith('/v1/health/service/consul') && !servers) return { status: 200, body: '[]' }
    return null
  }
  const svc = await startGrpcService(t, proxy.address, { source: 'consul-grpc', address: agent.grpcAddress as string, plaintext: true })
  t.equal(svc.app.consulNative.status().leaf?.uri, `spiffe://${agent.trustDomain}/ns/default/dc/dc7/svc/api`)
  t.ok(proxy.calls.some((call) => call.url.startsWith('/v1/health/service/consul')))

  // No server in the answer: the start fails, and says what to set.
  servers = false
  const app = Fastify({ https: httpsOptions() })
  t.teardown(async () => await app.close())
  app.register(consulNative, {
    service: 'api',
    agent: { address: proxy.address },
    readyTimeout: 1000,
    certificates: { source: 'consul-grpc', address: agent.grpcAddress as string, plaintext: true }
  })
  await t.rejects(async () => await app.ready(), { code: 'FST_CONSUL_NATIVE_NOT_READY', message: /set the datacenter option/ })
})

t.test('failures are logged once per cause: the dates grpc-js puts in a dropped connection\'s message do not make a new cause', async (t) => {
  const at = (iso: string): string => `Certificate source consul-grpc roots: 14 UNAVAILABLE: Failed to connect (${iso})`
  t.equal(failureCause(at('2026-12-07T15:00:00.000Z')), failureCause(at('2026-12-07T15:00:01.250Z')))
  t.equal(failureCause(at('2026-12-07T15:00:00.000Z')), 'Certificate source consul-grpc roots: 14 UNAVAILABLE: Failed to connect')
  t.not(failureCause('14 UNAVAILABLE: No connection established'), failureCause('7 PERMISSION_DENIED: Permission denied'))
  t.equal(failureCause('4 DEADLINE_EXCEEDED: Deadline exceeded after 10.002s,name resolution: 0.001s,remote_addr=127.0.0.1:8503'),
    failureCause('4 DEADLINE_EXCEEDED: Deadline exceeded after 10.013s,remote_addr=127.0.0.1:8503'))
})

t.test('a new signing key under the same active root (a secondary datacenter\'s new intermediate) signs a new leaf; the same roots again do not', async (t) => {
  const fake = await startFakeConnectCA(t)
  const source = new GrpcCertificateSource({ address: fake.address, plaintext: true, ca: null, servername: undefined },
    { service: 'api', namespace: undefined, partition: undefined, token: null, datacenter: async () => 'dc1', random: () => 0.5 }, recordingLogger().log)
  t.teardown(() => source.stop())
  const leaves: LeafCertificate[] = []
  await new Promise<void>((resolve) => {
    source.start({ update: (change) => { if (change.leaf !== undefined) { leaves.push(change.leaf); resolve() } }, failure: () => undefined })
  })
  t.equal(fake.calls.sign, 1)
  const message = fake.rootsMessage()
  // The same roots again, then the active root with another signing key: one Sign, for the key.
  fake.push(message)
  fake.push({ ...message, roots: message.roots.map((root) => root.id === message.activeRootId ? { ...root, signingKeyId: 'aa:bb:cc' } : root) })
  await nthCall(fake, 'sign', 2)
  while (leaves.length < 2) await new Promise((resolve) => setImmediate(resolve))
  t.equal(fake.calls.sign, 2, 'one Sign for the two messages: the repeat renews nothing')
})
