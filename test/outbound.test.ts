// Outbound calls: a caller holding the `web` leaf reaches `api` instances found through the dev
// agent, over real mTLS, with the peer's SPIFFE identity checked.
import t from 'tap'
import { EventEmitter } from 'node:events'
import https from 'node:https'
import net from 'node:net'
import { Readable } from 'node:stream'
import type { AddressInfo } from 'node:net'
import type { FastifyBaseLogger } from 'fastify'
import type { Dispatcher } from 'undici'
import { AgentClient } from '../lib/agent/client'
import { resolveAgentConfig } from '../lib/agent/config'
import type { DevAgent } from '../lib/dev-agent/index'
import { ServiceCaller, checkPeerIdentity, instancesDiffer, parseHealthConnect } from '../lib/outbound'
import { DynamicTls } from '../lib/tls'
import { agentCall, leafMaterial, newCaKey, setIntentions, setProtocol, startAgent, startService, waitForStatus } from './helpers/mesh'
import type { ServiceApp, Tap } from './helpers/mesh'
import { RecordingLogger } from './helpers/agent-fixtures'
import type { LogCall } from './helpers/agent-fixtures'

interface Caller { caller: ServiceCaller, tls: DynamicTls, events: EventEmitter, log: RecordingLogger }

const material = leafMaterial

/** A ServiceCaller for `web`, with its own DynamicTls and a rotation event source the test drives. */
async function startCaller (t: Tap, agent: DevAgent | null, opts: { address?: string, loadTls?: boolean } = {}): Promise<Caller> {
  const client = new AgentClient(resolveAgentConfig({ address: opts.address ?? (agent as DevAgent).address }, {}))
  const tls = new DynamicTls()
  if (agent !== null && opts.loadTls !== false) tls.update(await material(agent, 'web'))
  const events = new EventEmitter()
  const log = new RecordingLogger()
  const caller = new ServiceCaller({ client, tls, tlsEvents: events, log: log as unknown as FastifyBaseLogger, blockingWait: 5_000 })
  t.teardown(async () => {
    await caller.close()
    await client.close()
  })
  return { caller, tls, events, log }
}

async function waitOnAgent (agent: DevAgent, urlPath: string, predicate: (body: any) => boolean): Promise<any> {
  let index = 0
  for (;;) {
    const res = await agentCall(agent, 'GET', `${urlPath}${index > 0 ? `&index=${index}&wait=5s` : ''}`)
    if (predicate(res.body)) return res.body
    index = Number(res.headers['x-consul-index'] ?? 0)
  }
}

/** An `api` instance running the plugin, registered with a TCP check; resolves once it passes. */
async function startApi (t: Tap, agent: DevAgent, count: number, extra: Parameters<typeof startService>[2] = {}): Promise<ServiceApp> {
  const svc = await startService(t, agent, {
    plugin: { register: { check: 'tcp', checkInterval: '1s' } },
    routes: (app) => {
      app.get('/port', async (request) => ({ port: request.raw.socket.localPort, version: request.raw.httpVersion, from: request.consulSource?.service }))
      app.get('/serial', async (request) => ({ serial: (request.raw.socket as import('node:tls').TLSSocket).getPeerCertificate().serialNumber }))
      app.put('/port', async (request) => ({ port: request.raw.socket.localPort }))
      app.post('/port', async (request) => ({ port: request.raw.socket.localPort }))
      app.get('/v1/items/:id', async (request) => ({ id: (request.params as { id: string }).id }))
      app.get('/admin', async () => ({ admin: true }))
    },
    ...extra
  })
  await waitOnAgent(agent, '/v1/health/connect/api?passing', (body) => Array.isArray(body) && body.length >= count)
  return svc
}

async function register (agent: DevAgent, id: string, port: number, name = 'api'): Promise<void> {
  const res = await agentCall(agent, 'PUT', '/v1/agent/service/register', { ID: id, Name: name, Address: '127.0.0.1', Port: port, Connect: { Native: true } })
  if (res.status !== 200) throw new Error(`register: ${res.status} ${JSON.stringify(res.body)}`)
}

/** A port nothing listens on. */
async function closedPort (): Promise<number> {
  const server = net.createServer()
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as AddressInfo
  await new Promise((resolve) => server.close(resolve))
  return port
}

async function json (caller: ServiceCaller, path: string, init: Parameters<ServiceCaller['fetch']>[2] = {}): Promise<{ status: number, body: any }> {
  const res = await caller.fetch('api', path, init)
  return { status: res.status, body: await res.json() }
}

t.test('intentions: an allowed path answers 200, a denied one 403; fetch and dispatcher both work', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setProtocol(agent, 'api', 'http')
  await setIntentions(agent, 'api', [{ Name: 'web', Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/v1/items' } }] }])
  await startApi(t, agent, 1)
  const { caller } = await startCaller(t, agent)
  const ok = await json(caller, '/v1/items/7')
  t.same(ok, { status: 200, body: { id: '7' } })
  const denied = await json(caller, '/admin')
  t.equal(denied.status, 403)
  t.equal(denied.body.code, 'FST_CONSUL_NATIVE_DENIED')
  t.equal(caller.dispatcher('api'), caller.dispatcher('api', { passingOnly: true }), 'dispatchers are cached')
  const res = await caller.dispatcher('api').request({ origin: 'https://ignored.example', path: '/v1/items/8', method: 'GET' })
  t.same(await res.body.json(), { id: '8' })
  const dc = await json(caller, '/v1/items/9', { datacenter: 'dc1', passingOnly: false })
  t.equal(dc.status, 200, 'an explicit datacenter, every instance')
})

t.test('round robin over two instances, HTTP/2 negotiated; rotation replaces the connections', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const a = await startApi(t, agent, 1, { http2: true })
  const b = await startApi(t, agent, 2)
  const { caller, tls, events } = await startCaller(t, agent)
  const seen = []
  for (let i = 0; i < 4; i++) seen.push((await json(caller, '/port')).body)
  const ports = seen.map((s) => s.port)
  t.equal(new Set(ports).size, 2, 'both instances answer')
  t.equal(ports[0], ports[2])
  t.equal(ports[1], ports[3])
  t.not(ports[0], ports[1], 'requests alternate')
  t.same(new Set(ports), new Set([a.port, b.port]))
  t.equal(seen.find((s) => s.port === a.port).version, '2.0', 'the HTTP/2 app answered over h2')
  t.equal(seen.find((s) => s.port === b.port).version, '1.1')
  t.equal(seen[0].from, 'web')

  const before = await material(agent, 'web')
  const oldSerials = [a, b].map((s) => s.app.consulNative.status().leaf?.serial)
  const res = await agentCall(agent, 'PUT', '/v1/connect/ca/configuration', { Provider: 'consul', Config: { LeafCertTTL: '72h', PrivateKey: newCaKey() } })
  t.equal(res.status, 200)
  await Promise.all([a, b].map(async (s, i) => await waitForStatus(s.app, (st) => st.leaf?.serial !== oldSerials[i] && st.roots?.ids.length === 2)))
  const after = await material(agent, 'web')
  t.not(after.serial, before.serial, 'the agent issued a new web leaf')
  t.equal(after.rootPems.length, 2)
  // A request in flight on the old pool while the rotation happens still completes.
  const inflight = caller.fetch('api', '/port')
  tls.update(after)
  events.emit('tls')
  t.equal((await inflight).status, 200)
  const hex = (serial: string): string => serial.replace(/:/g, '').toLowerCase().replace(/^0+/, '')
  for (let i = 0; i < 2; i++) {
    const { body } = await json(caller, '/serial')
    t.equal(hex(body.serial), hex(after.serial), `new connections present the new leaf (call ${i})`)
  }
  t.equal((await json(caller, '/port')).status, 200)
})

t.test('an instance presenting another service identity is refused with PeerMismatchError', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const other = await material(agent, 'other')
  const server = https.createServer({ key: other.keyPem, cert: other.certPem, requestCert: false }, (_req, res) => res.end('{"impostor":true}'))
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => server.close())
  await register(agent, 'api-impostor', (server.address() as AddressInfo).port)
  const { caller } = await startCaller(t, agent)
  await t.rejects(caller.fetch('api', '/'), {
    code: 'FST_CONSUL_NATIVE_PEER_MISMATCH',
    statusCode: 502,
    message: `Service api answered with identity spiffe://${agent.trustDomain}/ns/default/dc/dc1/svc/other`
  })
  await t.rejects(caller.dispatcher('api').request({ origin: 'https://x', path: '/', method: 'GET' }), { code: 'FST_CONSUL_NATIVE_PEER_MISMATCH' })
})

t.test('a callback-style handler hears every callback undici makes, through the dispatcher', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  await startApi(t, agent, 1)
  const { caller } = await startCaller(t, agent)
  const heard: string[] = []
  const body = await new Promise<string>((resolve, reject) => {
    let text = ''
    caller.dispatcher('api').dispatch({ origin: 'https://x', path: '/port', method: 'PUT', body: '{"a":1}', headers: { 'content-type': 'application/json' } }, {
      onConnect () { heard.push('connect') },
      onRequestSent () { heard.push('request-sent') },
      onBodySent () { if (!heard.includes('body-sent')) heard.push('body-sent') },
      onResponseStarted () { heard.push('response-started') },
      onHeaders (statusCode) { heard.push(`headers ${statusCode}`); return true },
      onData (chunk) { text += chunk.toString(); return true },
      onComplete () { resolve(text) },
      onError: reject
    } as Dispatcher.DispatchHandler)
  })
  t.match(JSON.parse(body), { port: Number })
  t.same(heard, ['connect', 'body-sent', 'request-sent', 'response-started', 'headers 200'])
})

t.test('upgrades go through the dispatcher in both handler styles', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const upg = await material(agent, 'upg')
  const server = https.createServer({ key: upg.keyPem, cert: upg.certPem, requestCert: false })
  server.on('upgrade', (req, socket) => {
    socket.end(`HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: ${String(req.headers.upgrade)}\r\n\r\n`)
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => server.close())
  await register(agent, 'upg-1', (server.address() as AddressInfo).port, 'upg')
  const { caller } = await startCaller(t, agent)
  const d = caller.dispatcher('upg')

  // The callback style (undici's upgrade() API).
  const upgraded = await d.upgrade({ path: '/', method: 'GET', protocol: 'test' })
  t.equal(upgraded.headers.upgrade, 'test')
  upgraded.socket.destroy()

  // The controller style.
  const statusCode = await new Promise<number>((resolve, reject) => {
    d.dispatch({ origin: 'https://x', path: '/', method: 'GET', upgrade: 'test2' }, {
      onRequestStart () {},
      onRequestUpgrade (_controller, code, headers, socket) {
        socket.destroy()
        if (headers.upgrade !== 'test2') reject(new Error(`upgrade header ${String(headers.upgrade)}`))
        resolve(code)
      },
      onResponseError (_controller, err) { reject(err) }
    })
  })
  t.equal(statusCode, 101)
})

t.test('no instance, and a discovery that cannot reach the agent, give NoInstancesError', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const { caller } = await startCaller(t, agent)
  await t.rejects(caller.fetch('billing', '/'), { code: 'FST_CONSUL_NATIVE_NO_INSTANCES', statusCode: 503, message: 'No healthy instance of service billing' })
  await t.rejects(caller.fetch('odd_name', '/'), { code: 'FST_CONSUL_NATIVE_NO_INSTANCES', message: /odd_name/ }, 'a name that is no host label')
  await t.rejects(caller.fetch('billing', '/'), { code: 'FST_CONSUL_NATIVE_NO_INSTANCES' }, 'again, from the known empty list')

  const unreachable = await startCaller(t, null, { address: `http://127.0.0.1:${await closedPort()}` })
  const first = await unreachable.caller.fetch('api', '/').catch((e: unknown) => e) as Error
  t.match(first, { code: 'FST_CONSUL_NATIVE_NO_INSTANCES', message: /api/ })
  t.match(first.cause, { code: 'FST_CONSUL_NATIVE_AGENT_UNREACHABLE' }, 'the cause says why')
  await t.rejects(unreachable.caller.fetch('api', '/'), { code: 'FST_CONSUL_NATIVE_NO_INSTANCES' }, 'while the agent stays away')
})

t.test('connection failures: idempotent requests retry once on another instance; others do not', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const live = await startApi(t, agent, 1)
  await register(agent, 'api-dead', await closedPort())
  await waitOnAgent(agent, '/v1/health/connect/api?passing', (body) => body.length === 2)

  // Whatever the order, two requests over two instances try the dead one exactly once.
  const bodies: Array<[string, unknown]> = [['GET', undefined], ['PUT', 'text'], ['PUT', Buffer.from('bytes')], ['DELETE', null]]
  for (const [method, body] of bodies) {
    const { caller, log } = await startCaller(t, agent)
    for (let i = 0; i < 2; i++) {
      const res = await caller.dispatcher('api').request({ origin: 'https://api', path: '/port', method: method as Dispatcher.HttpMethod, body: body as string, headers: { 'content-type': 'text/plain' } })
      t.equal(res.statusCode, method === 'DELETE' ? 404 : 200, `${method} ${typeof body} #${i}`)
      await res.body.dump()
    }
    t.equal(log.at('debug').filter((c) => c.msg.includes('retrying')).length, 1, `${method}: retried once`)
  }

  for (const [method, body] of [['POST', undefined], ['PUT', 'stream']] as const) {
    const { caller } = await startCaller(t, agent)
    const outcomes = []
    for (let i = 0; i < 2; i++) {
      outcomes.push(await caller.dispatcher('api').request({
        origin: 'https://api', path: '/port', method, headers: { 'content-type': 'text/plain' }, body: body === 'stream' ? Readable.from(['x']) : undefined
      }).then((res) => res.statusCode, (err: { code?: string }) => err.code))
    }
    t.same(outcomes.sort(), [200, 'ECONNREFUSED'].sort(), `${method} ${String(body)}: not retried`)
  }

  // fetch() retries too; its other failures stay fetch's own TypeError.
  const { caller } = await startCaller(t, agent)
  for (let i = 0; i < 2; i++) t.equal((await json(caller, '/port')).body.port, live.port)

  await register(agent, 'lonely-dead', await closedPort(), 'lonely')
  for (let i = 0; i < 2; i++) {
    await t.rejects(caller.fetch('lonely', '/'), { name: 'TypeError', cause: { code: 'ECONNREFUSED' } }, 'no other instance: no retry, and the failed one is still used')
  }
})

t.test('dispatcher API: new-style handlers, missing TLS material, close and destroy', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  await startApi(t, agent, 1)
  await register(agent, 'lonely-dead', await closedPort(), 'lonely')
  const { caller } = await startCaller(t, agent)

  // A handler in undici's newer callback style, on success and on failures.
  const run = async (d: Dispatcher, path = '/port'): Promise<{ status?: number, error?: Error }> => await new Promise((resolve) => {
    let status: number
    d.dispatch({ origin: 'https://x', path, method: 'GET' }, {
      onRequestStart () {},
      onResponseStart (_c, statusCode) { status = statusCode },
      onResponseData () {},
      onResponseEnd () { resolve({ status }) },
      onResponseError (controller, error) {
        // undici itself passes no controller for a connection error; the caller's own failures pass a settled one.
        controller?.pause()
        controller?.resume()
        controller?.abort(error)
        resolve({ error })
      }
    })
  })
  t.same(await run(caller.dispatcher('api')), { status: 200 })
  t.match(await run(caller.dispatcher('lonely')), { error: { code: 'ECONNREFUSED' } })
  t.match(await run(caller.dispatcher('nobody')), { error: { code: 'FST_CONSUL_NATIVE_NO_INSTANCES' } })

  const bare = await startCaller(t, agent, { loadTls: false })
  await t.rejects(bare.caller.fetch('api', '/port'), { name: 'TypeError', cause: { message: /certificate material/ } })

  const d = caller.dispatcher('api')
  const closing = await new Promise<void>((resolve) => { (d as unknown as { close: (cb: () => void) => void }).close(resolve) })
  t.equal(closing, undefined, 'close(callback)')
  await t.rejects(d.request({ origin: 'https://x', path: '/', method: 'GET' }), { code: 'UND_ERR_CLOSED' })
  const e = caller.dispatcher('api', { passingOnly: false })
  t.equal((await e.request({ origin: 'https://x', path: '/port', method: 'GET' })).statusCode, 200)
  await e.destroy()
  await new Promise<void>((resolve) => { caller.dispatcher('api', { datacenter: 'dc1' }).destroy(null, resolve) })

  // An instance that leaves: its pool is closed, and the caller sees the empty list.
  const other = await startCaller(t, agent)
  t.equal((await json(other.caller, '/port')).status, 200)
  const id = (await agentCall(agent, 'GET', '/v1/health/connect/api')).body[0].Service.ID
  const changed = new Promise<void>((resolve) => {
    other.log.on('log:debug', (call: LogCall) => { if (call.event === 'watch-updated' && call.fields.watch === 'outbound:api') resolve() })
  })
  t.equal((await agentCall(agent, 'PUT', `/v1/agent/service/deregister/${id}`)).status, 200)
  await changed
  await t.rejects(other.caller.fetch('api', '/port'), { code: 'FST_CONSUL_NATIVE_NO_INSTANCES' })

  await caller.close()
  t.throws(() => caller.dispatcher('api'), { code: 'UND_ERR_CLOSED' })
})

t.test('checkPeerIdentity', async (t) => {
  const expected = { service: 'api', namespace: 'default', trustDomain: 'ABC.consul' }
  const id = (svc: string, ns = 'default', td = 'abc.consul'): string => `spiffe://${td}/ns/${ns}/dc/dc2/svc/${svc}`
  t.equal(checkPeerIdentity(expected, { subjectaltname: `URI:${id('api')}` }), undefined, 'any datacenter')
  t.equal(checkPeerIdentity(expected, { subjectaltname: `DNS:localhost, URI:${id('api')}` }), undefined)
  const bad: Array<[string | undefined, string]> = [
    [undefined, 'none'],
    ['DNS:api', 'none'],
    [`URI:${id('web')}`, id('web')],
    [`URI:${id('api', 'team')}`, id('api', 'team')],
    [`URI:${id('api', 'default', 'other.consul')}`, id('api', 'default', 'other.consul')],
    [`URI:${id('api')}, URI:${id('api')}`, `${id('api')} ${id('api')}`],
    [`URI:"${id('api')}"`, id('api')],
    ['URI:spiffe://abc.consul/agent/client/dc/dc1/id/n', 'spiffe://abc.consul/agent/client/dc/dc1/id/n'],
    ['URI:https://abc.consul/ns/default/dc/dc1/svc/api', 'https://abc.consul/ns/default/dc/dc1/svc/api'],
    ['garbage', 'none']
  ]
  for (const [san, shown] of bad) {
    t.match(checkPeerIdentity(expected, { subjectaltname: san as string }), { code: 'FST_CONSUL_NATIVE_PEER_MISMATCH', message: `Service api answered with identity ${shown}` }, String(san))
  }
})

t.test('parseHealthConnect', async (t) => {
  const entry = (service: object, node: object = { Address: '10.0.0.1' }): object => ({ Node: node, Service: { ID: 'i', ...service } })
  t.same(parseHealthConnect([entry({ Address: '10.0.0.2', Port: 8443 })], 'p'), [{ origin: 'https://10.0.0.2:8443', id: 'i', gatewayDatacenter: null }])
  t.same(parseHealthConnect([entry({ Address: '', Port: 1 }), entry({ Port: 2 })], 'p').map((i) => i.origin), ['https://10.0.0.1:1', 'https://10.0.0.1:2'], 'Node.Address fallback')
  t.same(parseHealthConnect([entry({ Address: '::1', Port: 3 })], 'p')[0]?.origin, 'https://[::1]:3')
  t.throws(() => parseHealthConnect({}, 'p'), { code: 'FST_CONSUL_NATIVE_AGENT_INVALID_RESPONSE' })
  const one = parseHealthConnect([entry({ Port: 1 })], 'p')
  t.equal(instancesDiffer(one, parseHealthConnect([entry({ Port: 1 })], 'p')), false)
  t.equal(instancesDiffer(one, parseHealthConnect([entry({ Port: 2 })], 'p')), true)
  for (const bad of [null, entry({ Port: 1 }, {}), entry({ Address: 5, Port: 1 }), entry({ Port: '1' }), entry({ Port: 0 }), entry({ Port: 65536 })]) {
    t.same(parseHealthConnect([bad], 'p'), [], `left out: ${JSON.stringify(bad)}`)
  }
})

t.test('a new-style handler is retried on another instance too', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  await startApi(t, agent, 1)
  await register(agent, 'api-dead', await closedPort())
  await waitOnAgent(agent, '/v1/health/connect/api?passing', (body) => body.length === 2)
  const { caller } = await startCaller(t, agent)
  const statuses: number[] = []
  for (let i = 0; i < 2; i++) {
    statuses.push(await new Promise<number>((resolve, reject) => {
      let status = 0
      caller.dispatcher('api').dispatch({ origin: 'https://x', path: '/port', method: 'GET' }, {
        onRequestStart () {},
        onResponseStart (_c, statusCode) { status = statusCode },
        onResponseData () {},
        onResponseEnd () { resolve(status) },
        onResponseError (_c, error) { reject(error) }
      })
    }))
  }
  t.same(statuses, [200, 200], 'the dead instance never surfaces')
})

t.test('a request that cannot even be sent (no method) fails through its handler, before and after discovery', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  await startApi(t, agent, 1)
  const { caller } = await startCaller(t, agent)
  const attempt = async (): Promise<Error> => await new Promise((resolve) => {
    try {
      caller.dispatcher('api').dispatch({ origin: 'https://x', path: '/port' } as unknown as Dispatcher.DispatchOptions, {
        onConnect () {},
        onHeaders () { return true },
        onData () { return true },
        onComplete () {},
        onError (error: Error) { resolve(error) }
      } as unknown as Dispatcher.DispatchHandler)
    } catch (err) {
      resolve(err as Error)
    }
  })
  t.type(await attempt(), Error, 'on the first request, while discovery runs')
  t.type(await attempt(), Error, 'once instances are known')
})
