// Registration, readiness, agent outages, HTTP/2, every listening server, and shutdown.
import t from 'tap'
import { newCaKey } from './helpers/mesh'
import { once } from 'node:events'
import http2 from 'node:http2'
import net from 'node:net'
import dns from 'node:dns'
import tls from 'node:tls'
import Fastify from 'fastify'
import consulNative, { httpsOptions } from '../lib/index'
import { dynamicTlsOf } from '../lib/tls'
import { startDevAgent } from '../lib/dev-agent/index'
import { agentCall, get, leafFor, mtlsClient, startAgent, startService, waitForStatus } from './helpers/mesh'

async function closedPort (): Promise<number> {
  const server = net.createServer()
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const port = (server.address() as net.AddressInfo).port
  await new Promise((resolve) => server.close(resolve))
  return port
}

t.test('invalid options fail register() with FST_CONSUL_NATIVE_INVALID_OPTION', async (t) => {
  const cases: Array<[unknown, RegExp]> = [
    [{}, /service/],
    [{ service: '' }, /service/],
    [{ service: 'api', mode: 'sidecar' }, /mode/],
    [{ service: 'api', defaultPolicy: 'maybe' }, /defaultPolicy/],
    [{ service: 'api', readyTimeout: -1 }, /readyTimeout/],
    [{ service: 'api', blockingWait: 3_600_000 }, /blockingWait/],
    [{ service: 'api', health: '/health' }, /health/],
    [{ service: 'api', health: { url: 'health' } }, /health\.url/],
    [{ service: 'api', health: { path: '/x' } }, /health\.path/],
    [{ service: 'api', agent: 'localhost' }, /agent/],
    [{ service: 'api', agent: { address: 'ht!tp://x' } }, /address|CONSUL_HTTP_ADDR/],
    [{ service: 'api', namespace: 'a/b' }, /namespace/],
    [{ service: 'api', servce: 'typo' }, /servce/],
    [{ service: 'api', readyTimeout: 20_000 }, /pluginTimeout/]
  ]
  for (const [options, message] of cases) {
    const app = Fastify({ https: httpsOptions() })
    await t.rejects((async () => { await app.register(consulNative, options as never) })(), { code: 'FST_CONSUL_NATIVE_INVALID_OPTION', message }, JSON.stringify(options))
    await app.close()
  }
})

t.test('httpsOptions() refuses the options the plugin owns and bad TLS versions', async (t) => {
  t.throws(() => httpsOptions({ cert: 'x' } as never), { code: 'FST_CONSUL_NATIVE_INVALID_OPTION', message: /cert/ })
  t.throws(() => httpsOptions({ rejectUnauthorized: true } as never), { code: 'FST_CONSUL_NATIVE_INVALID_OPTION' })
  t.throws(() => httpsOptions({ minVersion: 'TLSv1.1' }), { code: 'FST_CONSUL_NATIVE_INVALID_OPTION', message: /TLSv1\.2/ })
  t.throws(() => httpsOptions(null as never), { code: 'FST_CONSUL_NATIVE_INVALID_OPTION' })
  const opts = httpsOptions({ minVersion: 'TLSv1.3' })
  t.equal(opts.minVersion, 'TLSv1.3')
  t.equal(opts.requestCert, true)
  t.equal(opts.rejectUnauthorized, false)
  t.equal(opts.key, undefined, 'no material before the plugin loads it')
})

t.test('registering on a server not created with httpsOptions() fails with FST_CONSUL_NATIVE_NOT_HTTPS', async (t) => {
  const plain = Fastify()
  await t.rejects((async () => { await plain.register(consulNative, { service: 'api' }) })(), { code: 'FST_CONSUL_NATIVE_NOT_HTTPS' })
  await plain.close()
  const https = Fastify({ https: {} })
  await t.rejects((async () => { await https.register(consulNative, { service: 'api' }) })(), { code: 'FST_CONSUL_NATIVE_NOT_HTTPS' })
  await https.close()
})

t.test('an unreachable agent fails register() after readyTimeout with FST_CONSUL_NATIVE_NOT_READY', async (t) => {
  const port = await closedPort()
  const app = Fastify({ https: httpsOptions() })
  await t.rejects((async () => { await app.register(consulNative, { service: 'api', agent: { address: `127.0.0.1:${port}` }, readyTimeout: 300 }) })(), {
    code: 'FST_CONSUL_NATIVE_NOT_READY',
    message: /300ms.*leaf/
  })
  await app.close()
})

t.test('the agent going away after start does not stop the service; it recovers when the agent returns', async (t) => {
  const agent = await startDevAgent({ defaultPolicy: 'allow' })
  const port = agent.port
  const svc = await startService(t, agent, { plugin: { defaultPolicy: 'allow' } })
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  t.equal((await get(web, `${svc.origin}/`)).status, 200)
  const noticed = once(svc.app.consulNative.events, 'sync-error')
  await agent.close()
  const [{ watch, error }] = await noticed
  t.ok(typeof watch === 'string' && error instanceof Error, `the plugin noticed (${String(watch)}: ${String(error?.message)})`)
  const failures = svc.app.consulNative.metrics().find((family) => family.name === 'consul_native_sync_failures_total')
  t.ok(failures?.values.some((v) => v.labels.watch === watch && v.value >= 1), 'and counted it')
  t.equal((await get(web, `${svc.origin}/`)).status, 200, 'cached material keeps serving')
  await t.rejects(agentCall(agent, 'GET', '/v1/agent/self'), 'the agent is really gone')

  // A new agent on the same port: a new CA, so the plugin must pick up new roots and a new leaf.
  const back = await startDevAgent({ port, defaultPolicy: 'allow' })
  t.teardown(async () => await back.close())
  await waitForStatus(svc.app, (status) => status.trustDomain === back.trustDomain && status.leaf?.uri.includes(back.trustDomain) === true)
  const webAgain = mtlsClient(t, await leafFor(back, 'web'))
  t.equal((await get(webAgain, `${svc.origin}/`)).status, 200, 'callers with the new CA are served')
})

t.test('HTTP/2 with allowHTTP1: identity on both protocols', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const svc = await startService(t, agent, { http2: true })
  const creds = await leafFor(agent, 'web')
  const h1 = mtlsClient(t, creds)
  t.equal((await get(h1, `${svc.origin}/whoami`)).body.source.service, 'web', 'HTTP/1.1')

  const session = http2.connect(svc.origin, { ...creds, checkServerIdentity: () => undefined })
  t.teardown(() => session.close())
  for (let i = 0; i < 2; i++) {
    const body = await new Promise<string>((resolve, reject) => {
      const stream = session.request({ ':path': '/whoami' })
      let data = ''
      stream.on('data', (chunk: Buffer) => { data += chunk.toString() })
      stream.on('end', () => resolve(data))
      stream.on('error', reject)
    })
    t.equal(JSON.parse(body).source.service, 'web', `HTTP/2 stream ${i + 1}`)
  }
})

t.test('listening on localhost: every server Fastify opens serves the current leaf', async (t) => {
  // Fastify opens one server per address `localhost` resolves to. This machine resolves it to
  // 127.0.0.1 only, so the lookup answers with a second loopback address for this listen.
  const lookup = dns.lookup
  ;(dns as { lookup: unknown }).lookup = (host: string, options: unknown, cb?: (err: null, addresses: unknown) => void) => {
    const all = typeof options === 'object' && (options as { all?: boolean } | null)?.all === true
    if (host !== 'localhost' || !all || cb === undefined) return (lookup as (...args: unknown[]) => void)(host, options, cb)
    cb(null, [{ address: '127.0.0.1', family: 4 }, { address: '127.0.0.2', family: 4 }])
  }
  t.teardown(() => { dns.lookup = lookup })
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const svc = await startService(t, agent, { host: 'localhost' })
  dns.lookup = lookup
  t.same(svc.app.addresses().map((a) => (a as { address: string }).address).sort(), ['127.0.0.1', '127.0.0.2'], 'two servers')
  const creds = await leafFor(agent, 'web')
  const serial = async (host: string): Promise<string> => await new Promise((resolve, reject) => {
    const socket = tls.connect({ host, port: svc.port, ...creds, checkServerIdentity: () => undefined }, () => {
      resolve(socket.getPeerCertificate().serialNumber)
      socket.end()
    })
    socket.on('error', reject)
  })
  const hex = (serialNumber: string | undefined): string => (serialNumber ?? '').replace(/:/g, '').toUpperCase().replace(/^0+/, '')
  const before = svc.app.consulNative.status().leaf?.serial
  for (const host of ['127.0.0.1', '127.0.0.2']) t.equal(hex(await serial(host)), hex(before), `${host} serves the first leaf`)
  await agentCall(agent, 'PUT', '/v1/connect/ca/configuration', { Provider: 'consul', Config: { LeafCertTTL: '72h', PrivateKey: newCaKey() } })
  const status = await waitForStatus(svc.app, (s) => s.leaf?.serial !== before && s.roots?.ids.length === 2)
  for (const host of ['127.0.0.1', '127.0.0.2']) t.equal(hex(await serial(host)), hex(status.leaf?.serial), `${host} serves the rotated leaf`)
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  t.equal((await get(web, `https://127.0.0.2:${svc.port}/whoami`)).body.source.service, 'web', 'identity on the second server')
})

t.test('close() returns promptly with long polls in flight and leaves nothing running', async (t) => {
  const agent = await startAgent(t)
  const app = Fastify({ https: httpsOptions() })
  await app.register(consulNative, { service: 'api', agent: { address: agent.address }, blockingWait: 600_000 })
  await app.listen({ port: 0, host: '127.0.0.1' })
  await app.close()
  t.equal(app.consulNative.status().watches.leaf?.failures ?? 0, 0, 'closing is not a sync failure')
})

t.test('a Fastify without the known server-bindings slot gets a warning to listen on an explicit host', async (t) => {
  const agent = await startAgent(t)
  const lines: Array<{ consulNative?: { event?: string }, msg?: string }> = []
  const app = Fastify({ https: httpsOptions(), logger: { level: 'warn', stream: { write: (line: string) => { lines.push(JSON.parse(line)) } } } })
  t.teardown(async () => await app.close())
  const slot = Object.getOwnPropertySymbols(app).find((symbol) => symbol.description === 'fastify.serverBindings')
  t.ok(slot, 'this Fastify has the slot')
  delete (app as unknown as Record<symbol, unknown>)[slot as symbol]
  await app.register(consulNative, { service: 'api', agent: { address: agent.address } })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const warning = lines.find((line) => line.consulNative?.event === 'server-bindings-unknown')
  t.match(warning?.msg, /listen on an explicit host/)
})

t.test('datacenter is sent when set; namespace and partition only when set (a CE agent refuses them)', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const svc = await startService(t, agent, { plugin: { datacenter: 'dc1' } })
  t.equal(svc.app.consulNative.status().ready, true, 'datacenter dc1 is accepted')
  for (const option of [{ namespace: 'team' }, { partition: 'eu' }]) {
    const app = Fastify({ https: httpsOptions() })
    await t.rejects((async () => { await app.register(consulNative, { service: 'api', agent: { address: agent.address }, readyTimeout: 500, ...option }) })(), {
      code: 'FST_CONSUL_NATIVE_NOT_READY',
      message: /400/
    }, JSON.stringify(option))
    await app.close()
  }
})

t.test('router callbacks that answer with no hook: a replaced defaultRoute fails register(); onBadUrl is warned about', async (t) => {
  const agent = await startAgent(t)
  const fallback = Fastify({ https: httpsOptions(), routerOptions: { defaultRoute: (_req: unknown, res: { end: (text: string) => void }) => { res.end('fallback') } } } as never)
  t.teardown(async () => await fallback.close())
  fallback.register(consulNative, { service: 'api', agent: { address: agent.address } })
  await t.rejects(async () => { await fallback.ready() }, { code: 'FST_CONSUL_NATIVE_INVALID_OPTION', message: /routerOptions\.defaultRoute.*setNotFoundHandler/ })

  const lines: Array<{ consulNative?: { event?: string, option?: string } }> = []
  const badUrl = Fastify({
    https: httpsOptions(),
    routerOptions: { onBadUrl: (_path: string, _req: unknown, res: { end: () => void }) => { res.end() } },
    logger: { level: 'warn', stream: { write: (line: string) => { lines.push(JSON.parse(line)) } } }
  } as never)
  t.teardown(async () => await badUrl.close())
  await badUrl.register(consulNative, { service: 'api', agent: { address: agent.address } })
  t.match(lines.filter((line) => line.consulNative?.event === 'router-callback-unchecked'), [{ consulNative: { option: 'routerOptions.onBadUrl' } }])
})

t.test('registering inside an encapsulated plugin fails with FST_CONSUL_NATIVE_NOT_ROOT', async (t) => {
  const agent = await startAgent(t)
  const app = Fastify({ https: httpsOptions() })
  t.teardown(async () => await app.close())
  app.register(async (child) => {
    await child.register(consulNative, { service: 'api', agent: { address: agent.address } })
  })
  await t.rejects(async () => { await app.ready() }, { code: 'FST_CONSUL_NATIVE_NOT_ROOT' })
})

t.test('TLS settings given to httpsOptions() survive every certificate install', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const svc = await startService(t, agent, { https: { minVersion: 'TLSv1.3' } })
  const creds = await leafFor(agent, 'web')
  const connect = async (maxVersion: tls.SecureVersion): Promise<string> => await new Promise((resolve) => {
    const socket = tls.connect({ host: '127.0.0.1', port: svc.port, ...creds, maxVersion, checkServerIdentity: () => undefined }, () => {
      resolve(String(socket.getProtocol()))
      socket.end()
    })
    socket.on('error', (err: NodeJS.ErrnoException) => resolve(`refused: ${String(err.code)}`))
  })
  t.equal(await connect('TLSv1.3'), 'TLSv1.3')
  t.match(await connect('TLSv1.2'), /^refused/, 'TLS 1.2 stays refused after the plugin installed its context')
  t.equal(dynamicTlsOf(svc.app.server)?.material?.certPem !== undefined, true, 'the server is still recognized after the install')
})

t.test('TLS 1.2 renegotiation is refused, so a client cannot swap its certificate', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const svc = await startService(t, agent)
  const creds = await leafFor(agent, 'web')
  const outcome = await new Promise<string>((resolve) => {
    const socket = tls.connect({ host: '127.0.0.1', port: svc.port, ...creds, maxVersion: 'TLSv1.2', checkServerIdentity: () => undefined }, () => {
      socket.renegotiate({ rejectUnauthorized: false }, (err) => {
        resolve(err === null ? 'renegotiated' : 'refused')
        socket.destroy()
      })
    })
    socket.on('error', () => resolve('refused'))
    socket.on('close', () => resolve('refused'))
  })
  t.equal(outcome, 'refused')
})

t.test('readyTimeout may exceed 8 s when Fastify\'s pluginTimeout is off', async (t) => {
  const agent = await startAgent(t)
  const app = Fastify({ https: httpsOptions(), pluginTimeout: 0 })
  t.teardown(async () => await app.close())
  await app.register(consulNative, { service: 'api', agent: { address: agent.address }, readyTimeout: 60_000 })
  t.equal(app.consulNative.status().ready, true)
})

t.test('the health route answers 503 while the leaf is not valid', async (t) => {
  // Back-dated by a minute, a leaf of 61.5 s is valid for about 1.5 s after it is issued; with the
  // agent gone, nothing renews it.
  const agent = await startAgent(t, { defaultPolicy: 'allow', leafTTL: 61_500 })
  const svc = await startService(t, agent)
  const anonymous = mtlsClient(t, { ca: [] }, { rejectUnauthorized: false })
  t.equal((await get(anonymous, `${svc.origin}/health`)).status, 200, 'passing while the leaf is valid')
  const validBefore = Date.parse(svc.app.consulNative.status().leaf?.validBefore as string)
  await agent.close()
  await new Promise((resolve) => setTimeout(resolve, Math.max(0, validBefore - Date.now()) + 100))
  const res = await get(anonymous, `${svc.origin}/health`)
  t.equal(res.status, 503)
  t.same(res.body, { status: 'critical', service: 'api', registered: null, enforcement: 'enforce' })
})
