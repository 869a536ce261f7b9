// Transport-level spellings of a request, over real mTLS sockets (docs/semantics.md#transport):
// one header sent twice, HTTP/2 :authority vs host, cookie crumbs, Expect: 100-continue, bodies
// from refused callers, WebSocket upgrades in both registration orders, and hooks of plugins
// registered before this one.
import { once } from 'node:events'
import http2 from 'node:http2'
import t from 'tap'
import Fastify from 'fastify'
import type { FastifyInstance } from 'fastify'
import websocket from '@fastify/websocket'
import WebSocket from 'ws'
import consulNative, { httpsOptions } from '../lib/index'
import type { ConsulNativeOptions } from '../lib/index'
import { get, leafFor, mtlsClient, rootPems, setIntentions, setProtocol, startAgent, startService } from './helpers/mesh'
import type { Credentials, Tap } from './helpers/mesh'
import { http1, http2Raw, Http1Reader, rawSocket } from './helpers/raw-http'

const HEADER_RULES = [
  {
    Name: 'web',
    Permissions: [
      { Action: 'deny', HTTP: { Header: [{ Name: 'host', Exact: 'admin.internal' }] } },
      { Action: 'deny', HTTP: { Header: [{ Name: 'authorization', Exact: 'Bearer admin' }] } },
      { Action: 'deny', HTTP: { Header: [{ Name: 'cookie', Exact: 'session=1; role=admin' }] } },
      { Action: 'allow', HTTP: { PathPrefix: '/' } }
    ]
  }
]

/** What the application reads of the headers the rules above look at. */
function headerRoutes (app: FastifyInstance): void {
  app.get('/h', async (request) => ({ host: request.host, authorization: request.headers.authorization ?? null, cookie: request.headers.cookie ?? null }))
  app.post('/upload', async (request) => ({ received: String(request.body).length }))
}

async function h2Request (t: Tap, origin: string, creds: Credentials, headers: http2.OutgoingHttpHeaders, body?: string): Promise<{ status: number, body: string, continued: boolean, rstCode: number | undefined }> {
  const session = http2.connect(origin, { ...creds, checkServerIdentity: () => undefined })
  t.teardown(() => session.close())
  const stream = session.request(headers, { endStream: body === undefined && headers.expect === undefined })
  let continued = false
  let status = 0
  let data = ''
  stream.on('continue', () => { continued = true; stream.end(body) })
  stream.on('response', (h) => { status = Number(h[':status']) })
  stream.on('data', (chunk: Buffer) => { data += chunk.toString() })
  stream.on('error', () => {})
  if (body !== undefined && headers.expect === undefined) stream.write(body)
  await once(stream, 'close')
  return { status, body: data, continued, rstCode: stream.rstCode }
}

t.test('one header, two values: a repeated single-valued header the rules read is rejected (docs/semantics.md#transport-headers)', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setProtocol(agent, 'api', 'http')
  await setIntentions(agent, 'api', HEADER_RULES)
  const svc = await startService(t, agent, { http2: true, routes: headerRoutes })
  const web = await leafFor(agent, 'web')
  const send = async (lines: string[]): Promise<{ status: number, body: any }> => {
    const { response } = await http1(t, svc.port, web, `GET /h HTTP/1.1\r\n${lines.join('\r\n')}\r\nConnection: close\r\n\r\n`)
    return { status: response.status, body: JSON.parse(response.body) }
  }

  t.test('HTTP/1.1', async (t) => {
    t.equal((await send(['Host: admin.internal'])).status, 403, 'the rule holds')
    for (const lines of [['Host: admin.internal', 'Host: public'], ['Host: public', 'HOST: admin.internal'],
      ['Host: public', 'Authorization: Bearer admin', 'authorization: Bearer user']]) {
      const res = await send(lines)
      t.equal(res.status, 400, lines.join(' / '))
      t.equal(res.body.code, 'FST_CONSUL_NATIVE_BAD_HEADER')
    }
    t.same((await send(['Host: public', 'Authorization: Bearer user'])).body, { host: 'public', authorization: 'Bearer user', cookie: null }, 'one value each: served')
  })

  t.test('HTTP/2 (raw frames: node:http2 will not repeat a single-valued header)', async (t) => {
    const base: Array<[string, string]> = [[':method', 'GET'], [':scheme', 'https'], [':path', '/h']]
    const repeated = await http2Raw(t, svc.port, web, [...base, ['host', 'admin.internal'], ['host', 'public']])
    t.same(repeated, { body: '', reset: http2.constants.NGHTTP2_PROTOCOL_ERROR }, 'host twice: nghttp2 itself resets the stream')
    const auth = await http2Raw(t, svc.port, web, [...base, [':authority', 'public'], ['authorization', 'Bearer admin'], ['authorization', 'Bearer user']])
    t.match(JSON.parse(auth.body), { statusCode: 400, code: 'FST_CONSUL_NATIVE_BAD_HEADER' }, 'authorization twice')
    const once = await http2Raw(t, svc.port, web, [...base, ['host', 'public']])
    t.same(JSON.parse(once.body), { host: 'public', authorization: null, cookie: null }, 'host once: served')
  })
})

t.test('HTTP/2 :authority and host must agree; cookie crumbs are joined with "; " (docs/semantics.md#transport-headers)', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setProtocol(agent, 'api', 'http')
  await setIntentions(agent, 'api', HEADER_RULES)
  const svc = await startService(t, agent, { http2: true, routes: headerRoutes })
  const web = await leafFor(agent, 'web')

  const mismatch = await h2Request(t, svc.origin, web, { ':path': '/h', ':authority': 'public', host: 'admin.internal' })
  t.equal(mismatch.status, 400, ':authority public, host admin.internal')
  t.equal(JSON.parse(mismatch.body).code, 'FST_CONSUL_NATIVE_BAD_HEADER')
  t.equal((await h2Request(t, svc.origin, web, { ':path': '/h', ':authority': 'admin.internal' })).status, 403, ':authority alone is the host')
  t.same(JSON.parse((await h2Request(t, svc.origin, web, { ':path': '/h', ':authority': 'public', host: 'public' })).body).host, 'public', 'agreeing: served')

  const crumbs = await h2Request(t, svc.origin, web, { ':path': '/h', cookie: ['session=1', 'role=admin'] })
  t.equal(crumbs.status, 403, 'crumbs session=1 and role=admin are the cookie "session=1; role=admin"')
  const user = await h2Request(t, svc.origin, web, { ':path': '/h', cookie: ['session=1', 'role=user'] })
  t.equal(JSON.parse(user.body).cookie, 'session=1; role=user', 'the application reads the same joined value')
  const { response } = await http1(t, svc.port, web, 'GET /h HTTP/1.1\r\nHost: public\r\nCookie: session=1\r\nCookie: role=admin\r\nConnection: close\r\n\r\n')
  t.equal(response.status, 403, 'HTTP/1.1: two Cookie lines are joined alike')
})

t.test('a fragment or an absolute-form target cannot read differently to the rules and to the handler (docs/semantics.md#transport-headers)', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setProtocol(agent, 'api', 'http')
  await setIntentions(agent, 'api', [{
    Name: 'web',
    Permissions: [
      { Action: 'deny', HTTP: { Header: [{ Name: ':path', Exact: '/admin' }] } },
      { Action: 'deny', HTTP: { Header: [{ Name: 'host', Suffix: 'bad.com', IgnoreCase: true }] } },
      { Action: 'allow', HTTP: { PathPrefix: '/' } }
    ]
  }])
  const ran: string[] = []
  const svc = await startService(t, agent, {
    routes: (app) => {
      app.get('/admin', async (request) => { ran.push(request.url); return 'admin' })
      app.get('/', async (request) => { ran.push(`${request.url} ${request.host}`); return 'home' })
    }
  })
  const web = await leafFor(agent, 'web')
  const status = async (target: string, host: string): Promise<number> =>
    (await http1(t, svc.port, web, `GET ${target} HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`)).response.status

  t.equal(await status('/admin', 'a'), 403)
  // Fastify's router would hand what follows a '#' to the query parser: refused, as by Envoy.
  t.equal(await status('/admin#x', 'a'), 400, 'a fragment is refused')
  t.equal(await status('/admin#x?q', 'a'), 400)
  t.equal(await status('/#&admin=1', 'a'), 400, 'also where it would have been read as a query')
  t.equal(await status('http://foo.bad.com/', 'good.com'), 400, 'absolute form naming another authority than Host')
  t.equal(await status('http://good.com/', 'good.com'), 200, 'the same authority: served')
  t.equal(await status('http://foo.bad.com/', 'foo.bad.com'), 403, 'and the rule reads it')
  t.same(ran, ['http://good.com/ good.com'], 'no denied handler ran')
})

t.test('HEAD runs the GET handler, so a deny on GET denies HEAD, over HTTP/1.1 and HTTP/2 (docs/semantics.md#methods)', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setProtocol(agent, 'api', 'http')
  await setIntentions(agent, 'api', [{
    Name: 'web',
    Permissions: [{ Action: 'deny', HTTP: { PathPrefix: '/reports', Methods: ['GET'] } }, { Action: 'allow', HTTP: { PathPrefix: '/' } }]
  }])
  const ran: string[] = []
  const svc = await startService(t, agent, {
    http2: true,
    routes: (app) => {
      app.get('/reports/export', async (request, reply) => { ran.push(request.method); reply.header('x-rows', '42'); return 'secret' })
      app.get('/open', async (request) => { ran.push(`${request.method} /open`); return 'open' })
    }
  })
  const web = await leafFor(agent, 'web')
  // A HEAD response has no body whatever its Content-Length: read the status line, up to the close.
  const h1 = async (method: string, path: string): Promise<number> => {
    const socket = await rawSocket(t, svc.port, web)
    let text = ''
    socket.on('data', (chunk: Buffer) => { text += chunk.toString('latin1') })
    socket.write(`${method} ${path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n`)
    await once(socket, 'close')
    return Number(/^HTTP\/1\.1 (\d{3}) /.exec(text)?.[1])
  }
  t.equal(await h1('GET', '/reports/export'), 403)
  t.equal(await h1('HEAD', '/reports/export'), 403, 'HTTP/1.1 HEAD')
  t.equal((await h2Request(t, svc.origin, web, { ':method': 'HEAD', ':path': '/reports/export' })).status, 403, 'HTTP/2 HEAD')
  t.equal(await h1('HEAD', '/open'), 200, 'HEAD where GET is allowed: served')
  t.same(ran, ['HEAD /open'], 'the denied handler never ran')
})

t.test('Expect: 100-continue: no Continue before the decision; a refused caller\'s connection closes unread (docs/semantics.md#transport-continue)', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setIntentions(agent, 'api', [{ Name: 'web', Action: 'allow' }])
  const svc = await startService(t, agent, { http2: true, routes: headerRoutes })
  const web = await leafFor(agent, 'web')
  const billing = await leafFor(agent, 'billing')
  const anonymous = { ca: await rootPems(agent) }
  const head = (length: number): string =>
    `POST /upload HTTP/1.1\r\nHost: api\r\nContent-Type: text/plain\r\nContent-Length: ${length}\r\nExpect: 100-continue\r\n\r\n`

  t.test('HTTP/1.1, on an HTTPS server and on an HTTP/2 server with allowHTTP1', async (t) => {
    const https = await startService(t, agent, { routes: headerRoutes })
    for (const [name, creds, status, port] of [['no certificate', anonymous, 401, svc.port], ['denied', billing, 403, svc.port],
      ['no certificate (HTTPS server)', anonymous, 401, https.port], ['denied (HTTPS server)', billing, 403, https.port]] as const) {
      const { response, reader } = await http1(t, port, creds, head(209715200))
      t.equal(response.status, status, `${name}: the first answer is final, not 100 Continue`)
      t.equal(response.headers.connection, 'close', `${name}: Connection: close`)
      await reader.closedByServer()
      t.pass(`${name}: the server closed the connection without reading the body`)
    }
    for (const port of [svc.port, https.port]) {
      const { response, socket, reader } = await http1(t, port, web, head(5))
      t.equal(response.status, 100, 'allowed: 100 Continue')
      socket.write('hello')
      const final = await reader.response()
      t.same([final.status, JSON.parse(final.body)], [200, { received: 5 }])
    }
  })

  t.test('HTTP/2', async (t) => {
    const headers = { ':method': 'POST', ':path': '/upload', 'content-type': 'text/plain', expect: '100-continue' }
    const denied = await h2Request(t, svc.origin, billing, headers, 'hello')
    t.same([denied.status, denied.continued], [403, false], 'denied: 403, never 100')
    const allowed = await h2Request(t, svc.origin, web, headers, 'hello')
    t.same([allowed.status, allowed.continued, JSON.parse(allowed.body)], [200, true, { received: 5 }], 'allowed: 100, then the body')
  })
})

t.test('a refused caller\'s body is not drained: the connection (HTTP/1.1) or stream (HTTP/2) ends after the answer', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setIntentions(agent, 'api', [{ Name: 'web', Action: 'allow' }])
  const svc = await startService(t, agent, { http2: true, routes: headerRoutes })
  const billing = await leafFor(agent, 'billing')
  const anonymous = { ca: await rootPems(agent) }
  const chunk = 'x'.repeat(16384)

  for (const [name, creds, status] of [['no certificate', anonymous, 401], ['denied', billing, 403]] as const) {
    const socket = await rawSocket(t, svc.port, creds)
    const reader = new Http1Reader(socket)
    socket.write(`POST /upload HTTP/1.1\r\nHost: api\r\nContent-Type: text/plain\r\nContent-Length: 209715200\r\n\r\n${chunk}`)
    const response = await reader.response()
    t.same([response.status, response.headers.connection], [status, 'close'], `HTTP/1.1 ${name}`)
    await reader.closedByServer()
    t.pass(`HTTP/1.1 ${name}: closed with 200 MB announced and 16 KiB sent`)

    const session = http2.connect(svc.origin, { ...creds, checkServerIdentity: () => undefined })
    t.teardown(() => session.close())
    const stream = session.request({ ':method': 'POST', ':path': '/upload', 'content-type': 'text/plain' }, { endStream: false })
    stream.on('error', () => {})
    stream.write(chunk)
    const [h2headers] = await once(stream, 'response') as [http2.IncomingHttpHeaders]
    stream.resume()
    await once(stream, 'close')
    t.same([h2headers[':status'], stream.rstCode], [status, http2.constants.NGHTTP2_NO_ERROR], `HTTP/2 ${name}: answered, then the stream is reset with NO_ERROR`)
  }
})

/** A service with a WebSocket echo route, @fastify/websocket registered before or after the plugin. */
async function websocketService (t: Tap, agentAddress: string, websocketFirst: boolean, plugin: Partial<ConsulNativeOptions> = {}): Promise<{ app: FastifyInstance, port: number }> {
  const app: FastifyInstance = Fastify({ https: httpsOptions() }) as unknown as FastifyInstance
  t.teardown(async () => await app.close())
  if (websocketFirst) await app.register(websocket)
  await app.register(consulNative, { service: 'api', agent: { address: agentAddress }, ...plugin })
  if (!websocketFirst) await app.register(websocket)
  const echo = (socket: WebSocket): void => {
    socket.on('message', (message: Buffer) => socket.send(`echo ${message.toString()}`))
  }
  app.get('/ws', { websocket: true }, echo)
  app.get('/ws-open', { websocket: true, config: { consulNative: false } }, echo)
  app.get('/plain-open', { config: { consulNative: false } }, async () => 'open')
  app.get('/plain-shadow', { config: { consulNative: { enforcement: 'shadow' } } }, async () => 'shadowed')
  app.get('/plain-billing', { config: { consulNative: { sources: [{ name: 'billing', action: 'allow' }] } } }, async () => 'billing')
  app.get('/ws-billing', { websocket: true, config: { consulNative: { sources: [{ name: 'billing', action: 'allow' }] } } }, echo)
  await app.listen({ port: 0, host: '127.0.0.1' })
  return { app, port: (app.server.address() as { port: number }).port }
}

// Service leaves have no DNS SAN (see mtlsClient in helpers/mesh.ts); ws's types want a boolean, node:tls wants undefined.
const noServerIdentityCheck = (() => undefined) as unknown as () => boolean

const UPGRADE = 'GET /ws HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n'

for (const websocketFirst of [false, true]) {
  t.test(`WebSocket upgrades, @fastify/websocket registered ${websocketFirst ? 'before' : 'after'} the plugin: a refused upgrade closes its socket (docs/semantics.md#transport-upgrades)`, async (t) => {
    const agent = await startAgent(t, { defaultPolicy: 'deny' })
    await setIntentions(agent, 'api', [{ Name: 'web', Action: 'allow' }])
    const { app, port } = await websocketService(t, agent.address, websocketFirst)
    const web = await leafFor(agent, 'web')
    const billing = await leafFor(agent, 'billing')
    const anonymous = { ca: await rootPems(agent) }

    for (const [name, creds, status] of [['no certificate', anonymous, 401], ['denied', billing, 403]] as const) {
      for (let i = 0; i < 3; i++) {
        const { response, reader } = await http1(t, port, creds, UPGRADE)
        t.equal(response.status, status, `${name} #${i + 1}: answered`)
        await reader.closedByServer()
        t.pass(`${name} #${i + 1}: the server closed the socket`)
      }
    }

    // A route's exemption covers its own handler, not @fastify/websocket's server, which every
    // Upgrade reaches: an Upgrade to an exempt route that is no WebSocket route is the service's.
    const seen: string[] = []
    app.websocketServer.on('connection', (_socket: unknown, req: { url?: string }) => { seen.push(req.url as string) })
    for (const path of ['/health', '/plain-open']) {
      const { response } = await http1(t, port, anonymous, UPGRADE.replace('GET /ws ', `GET ${path} `))
      t.equal(response.status, 401, `Upgrade to the exempt ${path}, no certificate: refused`)
    }
    // The same for a route's shadow enforcement and its override: neither covers the WebSocket server.
    const shadowed = await http1(t, port, anonymous, UPGRADE.replace('GET /ws ', 'GET /plain-shadow '))
    t.equal(shadowed.response.status, 401, 'Upgrade to a route in shadow enforcement, no certificate: refused (the plugin enforces)')
    const overridden = await http1(t, port, billing, UPGRADE.replace('GET /ws ', 'GET /plain-billing '))
    t.equal(overridden.response.status, 403, 'Upgrade to a route whose override allows billing: the service\'s intentions decide')
    const plain = await http1(t, port, billing, 'GET /plain-billing HTTP/1.1\r\nHost: api\r\n\r\n')
    t.equal(plain.response.status, 200, 'while a plain request there is the override\'s')
    const open = new WebSocket(`wss://127.0.0.1:${port}/ws-open`, { ...anonymous, checkServerIdentity: noServerIdentityCheck })
    await once(open, 'open')
    open.close()
    const billingWs = new WebSocket(`wss://127.0.0.1:${port}/ws-billing`, { ...billing, checkServerIdentity: noServerIdentityCheck })
    await once(billingWs, 'open')
    billingWs.close()
    t.same(seen, ['/ws-open', '/ws-billing'], 'only WebSocket routes reached the WebSocket server, each by its own setting')

    const ws = new WebSocket(`wss://127.0.0.1:${port}/ws`, { ...web, checkServerIdentity: noServerIdentityCheck })
    await once(ws, 'open')
    ws.send('hi')
    const [message] = await once(ws, 'message') as [Buffer]
    t.equal(message.toString(), 'echo hi', 'an allowed caller upgrades')
    ws.close()
    await once(ws, 'close')
    await app.close()
    t.pass('app.close() is not held up by refused upgrades')
  })
}

t.test('Upgrade and CONNECT listeners of the application\'s own, outside Fastify, get only decided requests (docs/semantics.md#transport-upgrades)', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setIntentions(agent, 'api', [{ Name: 'web', Action: 'allow' }])
  const app: FastifyInstance = Fastify({ https: httpsOptions() }) as unknown as FastifyInstance
  t.teardown(async () => await app.close())
  await app.register(consulNative, { service: 'api', agent: { address: agent.address }, recheckUpgrades: true })
  app.get('/routed', async () => 'routed')
  app.get('/files/*', async () => 'file')
  app.get('/open', { config: { consulNative: false } }, async () => 'open')
  await app.listen({ port: 0, host: '127.0.0.1' })
  // A raw `ws` server on the Fastify server, added after listen (no @fastify/websocket here).
  const raw = new WebSocket.Server({ noServer: true })
  const ran: string[] = []
  app.server.on('upgrade', (req, socket, head) => {
    ran.push(`upgrade ${req.url as string}`)
    raw.handleUpgrade(req, socket, head, (ws) => { ws.send('raw') })
  })
  app.server.on('connect', (_req, socket: import('node:net').Socket) => { ran.push('connect'); socket.end('HTTP/1.1 200 Connection Established\r\n\r\n') })
  const port = (app.server.address() as { port: number }).port
  const web = await leafFor(agent, 'web')
  const billing = await leafFor(agent, 'billing')
  const anonymous = { ca: await rootPems(agent) }
  const rawUpgrade = UPGRADE.replace('GET /ws ', 'GET /raw ')

  for (const [name, creds, status] of [['no certificate', anonymous, 401], ['denied', billing, 403]] as const) {
    const { response, reader } = await http1(t, port, creds, rawUpgrade)
    t.equal(response.status, status, `${name}: answered before any listener saw the request`)
    t.equal(JSON.parse(response.body).code, status === 401 ? 'FST_CONSUL_NATIVE_UNAUTHENTICATED' : 'FST_CONSUL_NATIVE_DENIED')
    await reader.closedByServer()
  }
  t.same(ran, [], 'the raw listener never ran for a refused caller')

  const allowed = new WebSocket(`wss://127.0.0.1:${port}/raw`, { ...web, checkServerIdentity: noServerIdentityCheck })
  const [first] = await once(allowed, 'message') as [Buffer]
  t.equal(first.toString(), 'raw', 'an allowed caller reaches the raw listener')
  allowed.close()
  t.same(ran, ['upgrade /raw'])

  // Whatever path, routed by Fastify or not: the service's policy (no route's handler answers it).
  // An unreadable path is refused before the identity is looked at.
  const upgrade = (path: string): string => UPGRADE.replace('GET /ws ', `GET ${path} `)
  for (const [path, creds, status] of [['/routed', anonymous, 401], ['/files/a', anonymous, 401], ['/raw%ZZ', anonymous, 400],
    ['/%E0%A4%A', anonymous, 400], ['/routed', billing, 403], ['/raw%ZZ', web, 400]] as const) {
    const { response } = await http1(t, port, creds, upgrade(path))
    t.equal(response.status, status, `${path}, ${creds === anonymous ? 'no certificate' : creds === web ? 'web' : 'billing'}: refused`)
  }
  t.same(ran, ['upgrade /raw'], 'routed, wildcard and unreadable paths: no listener ran')
  const open = await http1(t, port, anonymous, upgrade('/open'))
  t.equal(open.response.status, 401, 'a route\'s exemption covers its own handler, not a listener outside Fastify')
  t.same(ran, ['upgrade /raw'])

  // recheckUpgrades covers these connections too.
  const tracked = new WebSocket(`wss://127.0.0.1:${port}/raw`, { ...web, checkServerIdentity: noServerIdentityCheck })
  await once(tracked, 'message')
  const closed = once(tracked, 'close')
  await setIntentions(agent, 'api', [{ Name: 'web', Action: 'deny' }])
  const [code] = await closed as [number]
  t.equal(code, 1006, 'revoking the intention closes it')

  for (const [name, creds, status] of [['no certificate', anonymous, 400], ['allowed caller', web, 400]] as const) {
    const { response } = await http1(t, port, creds, 'CONNECT internal.example:443 HTTP/1.1\r\nHost: internal.example:443\r\n\r\n')
    t.equal(response.status, status, `CONNECT, ${name}: refused (it names no path the mesh could decide)`)
  }
  t.same(ran, ['upgrade /raw', 'upgrade /raw'], 'the connect listener never ran')
})

t.test('with @fastify/websocket the only Upgrade listener, Fastify decides: a route declared before the plugin refuses by its own override, and closes (docs/semantics.md#transport-upgrades)', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setIntentions(agent, 'api', [{ Name: 'web', Action: 'allow' }])
  const app: FastifyInstance = Fastify({ https: httpsOptions() }) as unknown as FastifyInstance
  t.teardown(async () => await app.close())
  await app.register(websocket)
  let ran = 0
  app.get('/early', { websocket: true, config: { consulNative: { sources: [{ name: 'web', action: 'deny' }] } } }, () => { ran++ })
  await app.register(consulNative, { service: 'api', agent: { address: agent.address } })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const port = (app.server.address() as { port: number }).port
  const { response, reader } = await http1(t, port, await leafFor(agent, 'web'), UPGRADE.replace('GET /ws ', 'GET /early '))
  t.equal(response.status, 403, 'the route\'s override refuses it in Fastify')
  await reader.closedByServer()
  t.equal(ran, 0, 'the handler never ran, and the socket was closed')
})

t.test('mode agent: an Upgrade to a route with a setting of its own waits for the route\'s decision, then the service\'s (docs/semantics.md#transport-upgrades)', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setIntentions(agent, 'api', [{ Name: 'web', Action: 'allow' }])
  const { app, port } = await websocketService(t, agent.address, false, { mode: 'agent' })
  const seen: string[] = []
  app.websocketServer.on('connection', (_socket: unknown, req: { url?: string }) => { seen.push(req.url as string) })
  const billing = await leafFor(agent, 'billing')
  const { response } = await http1(t, port, billing, UPGRADE.replace('GET /ws ', 'GET /plain-shadow '))
  t.equal(response.status, 403, 'the route\'s shadow lets it on, the service (the agent) refuses it')
  const web = await leafFor(agent, 'web')
  const ws = new WebSocket(`wss://127.0.0.1:${port}/ws`, { ...web, checkServerIdentity: noServerIdentityCheck })
  await once(ws, 'open')
  ws.close()
  t.same(seen, ['/ws'])
})

t.test('a listener of the application\'s named onUpgrade, beside @fastify/websocket\'s, is gated all the same', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setIntentions(agent, 'api', [{ Name: 'web', Action: 'allow' }])
  const { app, port } = await websocketService(t, agent.address, true)
  let ran = 0
  app.server.on('upgrade', function onUpgrade (_req: unknown, socket: { end: (text: string) => void }) {
    ran++
    socket.end('HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\nSECRET')
  })
  const { response } = await http1(t, port, { ca: await rootPems(agent) }, 'GET /tunnel HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n')
  t.equal(response.status, 401, 'no certificate: refused before any listener')
  t.equal(ran, 0)
})

t.test('outside Fastify too: a decision that waits (mode agent) and an HTTP/2 CONNECT (docs/semantics.md#transport-upgrades)', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setIntentions(agent, 'api', [{ Name: 'web', Action: 'allow' }])
  const ran: string[] = []
  const svc = await startService(t, agent, { http2: true, plugin: { mode: 'agent' }, routes: () => {} })
  const raw = new WebSocket.Server({ noServer: true })
  svc.app.server.on('upgrade', (req, socket, head) => { raw.handleUpgrade(req, socket, head, (ws) => { ran.push(`upgrade ${req.url as string}`); ws.send('raw') }) })
  svc.app.server.on('connect', (_req: unknown, res: http2.Http2ServerResponse) => { ran.push('connect'); res.writeHead(200).end() })
  const web = await leafFor(agent, 'web')
  const billing = await leafFor(agent, 'billing')

  const { response, reader } = await http1(t, svc.port, billing, UPGRADE.replace('GET /ws ', 'GET /raw '))
  t.equal(response.status, 403, 'the agent\'s answer refuses it')
  await reader.closedByServer()
  const allowed = new WebSocket(`wss://127.0.0.1:${svc.port}/raw`, { ...web, checkServerIdentity: noServerIdentityCheck })
  const [message] = await once(allowed, 'message') as [Buffer]
  t.equal(message.toString(), 'raw', 'the agent\'s answer allows it')
  allowed.close()

  for (const [name, creds, status] of [['no certificate', { ca: await rootPems(agent) }, 400], ['allowed caller', web, 400]] as const) {
    const session = http2.connect(svc.origin, { ...creds, checkServerIdentity: () => undefined })
    t.teardown(() => session.close())
    const stream = session.request({ ':method': 'CONNECT', ':authority': 'internal.example:443' })
    stream.on('error', () => {})
    const [headers] = await once(stream, 'response') as [http2.IncomingHttpHeaders]
    t.equal(headers[':status'], status, `HTTP/2 CONNECT, ${name}: refused`)
    session.close()
  }
  t.same(ran, ['upgrade /raw'], 'only the allowed upgrade reached a listener')
})

t.test('an encapsulated plugin registered before this one runs its onRequest hooks before the decision (docs/semantics.md#transport-hook-order)', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setIntentions(agent, 'api', [{ Name: 'web', Action: 'allow' }])
  const app: FastifyInstance = Fastify({ https: httpsOptions() }) as unknown as FastifyInstance
  t.teardown(async () => await app.close())
  const seen: unknown[] = []
  let served = 0
  await app.register(async (child) => {
    child.addHook('onRequest', async (request) => { seen.push(request.consulDecision) })
    child.post('/early', async () => { served++; return 'served' })
  })
  await app.register(consulNative, { service: 'api', agent: { address: agent.address } })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const port = (app.server.address() as { port: number }).port
  const post = 'POST /early HTTP/1.1\r\nHost: api\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi'
  t.equal((await http1(t, port, await leafFor(agent, 'billing'), post)).response.status, 403, 'denied')
  t.equal((await http1(t, port, await leafFor(agent, 'web'), post)).response.status, 200, 'allowed')
  t.strictSame(seen, [null, null], 'the child hook ran first both times, with no decision yet (null: the decorations are prototype accessors, there for a context created before the plugin too)')
  t.equal(served, 1, 'the denied handler never ran')
})

t.test('a checkContinue listener of the application\'s own is kept, with a warning that it decides when a body is read', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  const lines: Array<{ consulNative?: { event?: string }, msg?: string }> = []
  const app = Fastify({ https: httpsOptions(), logger: { level: 'warn', stream: { write: (line: string) => { lines.push(JSON.parse(line)) } } } })
  t.teardown(async () => await app.close())
  const own = (): void => {}
  app.server.on('checkContinue', own)
  await app.register(consulNative, { service: 'api', agent: { address: agent.address } })
  t.same(app.server.listeners('checkContinue'), [own], 'the plugin adds none')
  t.match(lines.find((line) => line.consulNative?.event === 'check-continue-taken')?.msg, /not the access decision, decides when a body is read/)
})

/** An open WebSocket to `path`, and a round trip that proves it still carries messages. */
async function openSocket (t: Tap, port: number, creds: Partial<Credentials> & { ca: string[] }, path = '/ws'): Promise<{ ws: WebSocket, echo: (text: string) => Promise<string> }> {
  const ws = new WebSocket(`wss://127.0.0.1:${port}${path}`, { ...creds, checkServerIdentity: noServerIdentityCheck })
  t.teardown(() => ws.terminate())
  await once(ws, 'open')
  return {
    ws,
    echo: async (text) => {
      ws.send(text)
      const [message] = await once(ws, 'message') as [Buffer]
      return message.toString()
    }
  }
}

for (const mode of ['l7', 'agent'] as const) {
  t.test(`recheckUpgrades (mode '${mode}'): an open WebSocket whose intention is revoked is closed; others stay (docs/semantics.md#transport-long-lived)`, async (t) => {
    const agent = await startAgent(t, { defaultPolicy: 'deny' })
    await setIntentions(agent, 'api', [{ Name: 'web', Action: 'allow' }, { Name: 'ops', Action: 'allow' }])
    const { app, port } = await websocketService(t, agent.address, false, { recheckUpgrades: true, mode })
    const web = await openSocket(t, port, await leafFor(agent, 'web'))
    const ops = await openSocket(t, port, await leafFor(agent, 'ops'))
    const open = await openSocket(t, port, await leafFor(agent, 'web'), '/ws-open')
    t.equal(await web.echo('before'), 'echo before')
    const plain = await http1(t, port, await leafFor(agent, 'web'), 'GET /ws HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n')
    t.equal(plain.response.status, 404, 'an allowed request without Upgrade is not tracked (@fastify/websocket answers 404)')

    const webClosed = once(web.ws, 'close')
    await setIntentions(agent, 'api', [{ Name: 'web', Action: 'deny' }, { Name: 'ops', Action: 'allow' }])
    await webClosed
    t.pass('web\'s WebSocket was closed once its intention became deny')
    t.equal(await ops.echo('after'), 'echo after', 'ops is still allowed: its WebSocket stays')
    t.equal(await open.echo('after'), 'echo after', 'an exempt route\'s WebSocket stays')
    t.equal(app.consulNative.status().ready, true)
  })
}

t.test('without recheckUpgrades an allowed WebSocket outlives the revocation of its intention (docs/semantics.md#transport-long-lived)', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setIntentions(agent, 'api', [{ Name: 'web', Action: 'allow' }])
  const { app, port } = await websocketService(t, agent.address, false)
  const web = await openSocket(t, port, await leafFor(agent, 'web'))
  const updated = once(app.consulNative.events, 'intentions')
  await setIntentions(agent, 'api', [{ Name: 'web', Action: 'deny' }])
  await updated
  t.equal(await web.echo('after'), 'echo after', 'still open: decided once, at the upgrade')
})

t.test('reply.callNotFound() moves a request to the 404 handler: decided again there, as a request no route matches (docs/semantics.md#transport-hook-order)', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setIntentions(agent, 'api', [{ Name: 'web', Action: 'allow' }])
  const ran: string[] = []
  const app: FastifyInstance = Fastify({ https: httpsOptions() }) as unknown as FastifyInstance
  t.teardown(async () => await app.close())
  // An application hook before the plugin that sends unknown tenants to the 404 handler.
  app.addHook('onRequest', async (request, reply) => { if (request.url.startsWith('/t/unknown')) reply.callNotFound() })
  await app.register(consulNative, { service: 'api', agent: { address: agent.address } })
  app.setNotFoundHandler({ preHandler: async () => { ran.push('404 preHandler') } }, async () => ({ notFoundHandler: true }))
  // An exempt route that falls back to the 404 handler (as @fastify/static does for a missing file).
  app.get('/public/*', { config: { consulNative: false } }, (_request, reply) => { reply.callNotFound() })
  app.get('/t/*', async () => 'tenant')
  await app.listen({ port: 0, host: '127.0.0.1' })
  const origin = `https://127.0.0.1:${(app.server.address() as { port: number }).port}`
  const anonymous = mtlsClient(t, { ca: await rootPems(agent) })
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  t.equal((await get(anonymous, `${origin}/public/missing`)).status, 401, 'no certificate: the exempt route\'s fallback is refused')
  t.equal((await get(anonymous, `${origin}/t/unknown`)).status, 401, 'from a hook before the plugin too')
  t.same(ran, [], 'the 404 handler never ran for them')
  const allowed = await get(web, `${origin}/public/missing`)
  t.same([allowed.status, allowed.body], [200, { notFoundHandler: true }], 'an allowed caller gets the 404 handler')

  // An error handler that hides refusals as 404s.
  const hiding: FastifyInstance = Fastify({ https: httpsOptions() }) as unknown as FastifyInstance
  t.teardown(async () => await hiding.close())
  await hiding.register(consulNative, { service: 'api', agent: { address: agent.address } })
  hiding.setNotFoundHandler(async () => { ran.push('hiding 404'); return { notFoundHandler: true } })
  hiding.setErrorHandler((err: { statusCode?: number }, _request, reply) => {
    if (err.statusCode === 401 || err.statusCode === 403) reply.callNotFound()
    else reply.send(err)
  })
  hiding.get('/admin', async () => 'admin')
  await hiding.listen({ port: 0, host: '127.0.0.1' })
  const refused = await get(anonymous, `https://127.0.0.1:${(hiding.server.address() as { port: number }).port}/admin`)
  t.not(refused.status, 200, `an error handler hiding the 401: still refused (${refused.status})`)
  t.notOk(ran.includes('hiding 404'), 'and the 404 handler never ran')
})
