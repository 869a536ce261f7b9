// Per-request enforcement against the dev agent, over real mTLS: L4 and L7 intentions, route
// overrides, exemptions, the health route, routes the plugin never saw, and live updates.
import t from 'tap'
import { EventEmitter, once } from 'node:events'
import Fastify from 'fastify'
import type { FastifyInstance } from 'fastify'
import consulNative, { httpsOptions } from '../lib/index'
import promClient from 'prom-client'
import { agentCall, get, leafFor, mtlsClient, rootPems, setIntentions, setProtocol, startAgent, startService, waitForStatus } from './helpers/mesh'

const L7_SOURCES = [
  {
    Name: 'web',
    Permissions: [
      { Action: 'deny', HTTP: { PathExact: '/admin' } },
      { Action: 'allow', HTTP: { PathPrefix: '/v1/', Methods: ['GET'] } },
      { Action: 'allow', HTTP: { PathExact: '/', Header: [{ Name: 'x-env', Exact: 'prod' }] } }
    ]
  },
  { Name: 'billing', Action: 'deny' },
  { Name: '*', Action: 'allow' }
]

t.test('L7 permissions decide per request: path, method and header', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setProtocol(agent, 'api', 'http')
  await setIntentions(agent, 'api', L7_SOURCES)
  const svc = await startService(t, agent)
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  const billing = mtlsClient(t, await leafFor(agent, 'billing'))
  const cron = mtlsClient(t, await leafFor(agent, 'cron'))

  const cases: Array<[string, typeof web, string, string, Record<string, string>, number]> = [
    ['web may GET /v1/items/1', web, 'GET', '/v1/items/1', {}, 200],
    ['web may not POST /v1/items (method not listed, default deny)', web, 'POST', '/v1/items', {}, 403],
    ['web is denied /admin by the first matching permission', web, 'GET', '/admin', {}, 403],
    ['web may GET / with x-env: prod', web, 'GET', '/', { 'x-env': 'prod' }, 200],
    ['web may not GET / with x-env: dev', web, 'GET', '/', { 'x-env': 'dev' }, 403],
    ['web query strings do not affect path matching', web, 'GET', '/v1/items/2?limit=5', {}, 200],
    ['web cannot reach /admin through dot segments', web, 'GET', '/v1/../admin', {}, 403],
    ['billing is denied at L4', billing, 'GET', '/v1/items/1', {}, 403],
    ['cron falls to the * allow', cron, 'POST', '/v1/items', {}, 200]
  ]
  for (const [name, client, method, path, headers, status] of cases) {
    const res = await get(client, `${svc.origin}${path}`, { method, headers })
    t.equal(res.status, status, name)
    if (status === 403) {
      t.equal(res.body.code, 'FST_CONSUL_NATIVE_DENIED', `${name}: code`)
      t.equal(res.body.message, 'Access denied', `${name}: body names no intention`)
    }
  }
})

t.test('request.consulDecision explains an allow', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setIntentions(agent, 'api', [{ Name: 'web', Action: 'allow' }])
  const svc = await startService(t, agent)
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  const res = await get(web, `${svc.origin}/whoami`)
  t.equal(res.status, 200)
  t.equal(res.body.decision.allow, true)
  t.match(res.body.decision.reason, /web/)
})

t.test('route overrides are evaluated first; the service intentions decide otherwise', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setIntentions(agent, 'api', [{ Name: 'web', Action: 'allow' }])
  const svc = await startService(t, agent, {
    routes (app) {
      app.get('/ops', { config: { consulNative: { sources: [{ name: 'ops', action: 'allow' }, { name: 'web', action: 'deny' }] } } }, async () => ({ ops: true }))
      app.get('/open', async () => ({ open: true }))
    }
  })
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  const ops = mtlsClient(t, await leafFor(agent, 'ops'))
  const cron = mtlsClient(t, await leafFor(agent, 'cron'))
  t.equal((await get(ops, `${svc.origin}/ops`)).status, 200, 'ops allowed by the route override')
  t.equal((await get(web, `${svc.origin}/ops`)).status, 403, 'web denied by the route override')
  t.equal((await get(cron, `${svc.origin}/ops`)).status, 403, 'cron: no override matches, service default deny')
  t.equal((await get(web, `${svc.origin}/open`)).status, 200, 'web allowed by the service intention elsewhere')
  t.equal((await get(ops, `${svc.origin}/open`)).status, 403, 'ops has no service intention')
})

t.test('an invalid route override fails route registration with a typed error naming the route', async (t) => {
  const agent = await startAgent(t)
  const app = Fastify({ https: httpsOptions() })
  t.teardown(async () => await app.close())
  await app.register(consulNative, { service: 'api', agent: { address: agent.address } })
  const bad: unknown[] = [
    'yes',
    { sources: [] },
    { sources: [{ name: 'ops', action: 'maybe' }] },
    { sources: [{ name: 'ops', action: 'allow' }], extra: 1 }
  ]
  for (const value of bad) {
    t.throws(() => app.get(`/bad-${bad.indexOf(value)}`, { config: { consulNative: value as false } }, async () => 'x'), {
      code: 'FST_CONSUL_NATIVE_INVALID_ROUTE_CONFIG',
      message: new RegExp(`GET /bad-${bad.indexOf(value)}`)
    }, JSON.stringify(value))
  }
})

t.test('exempt routes and the health route need no certificate; nothing else is reachable without one', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  const svc = await startService(t, agent, {
    routes (app) {
      app.get('/metrics', { config: { consulNative: false } }, async (request) => ({ caller: request.consulSource?.service ?? null }))
      app.get('/private', async () => 'secret')
    }
  })
  const anonymous = mtlsClient(t, { ca: await rootPems(agent) })
  const health = await get(anonymous, `${svc.origin}/health`)
  t.equal(health.status, 200)
  t.equal(health.body.status, 'passing')
  t.equal(health.body.service, 'api')
  t.equal((await get(anonymous, `${svc.origin}/metrics`)).body.caller, null)
  t.equal((await get(anonymous, `${svc.origin}/private`)).status, 401)
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  t.equal((await get(web, `${svc.origin}/metrics`)).body.caller, 'web', 'an exempt route still sees a verified caller')
  t.equal((await get(web, `${svc.origin}/private`)).status, 403, 'default deny')
})

t.test('health: false registers no health route; a custom url moves it', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const off = await startService(t, agent, { plugin: { health: false } })
  const moved = await startService(t, agent, { plugin: { health: { url: '/-/ready' } } })
  const anonymous = mtlsClient(t, { ca: await rootPems(agent) })
  t.equal((await get(anonymous, `${off.origin}/health`)).status, 401)
  t.equal((await get(anonymous, `${moved.origin}/-/ready`)).status, 200)
})

t.test('routes declared before the plugin are enforced too', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setIntentions(agent, 'api', [{ Name: 'web', Action: 'allow' }])
  const app: FastifyInstance = Fastify({ https: httpsOptions() }) as unknown as FastifyInstance
  t.teardown(async () => await app.close())
  app.get('/early', async () => 'early')
  app.get('/early-open', { config: { consulNative: false } }, async () => 'open')
  app.post('/early-override', { config: { consulNative: { sources: [{ name: 'ops', action: 'allow' }] } } }, async () => 'ops')
  await app.register(consulNative, { service: 'api', agent: { address: agent.address } })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const origin = `https://127.0.0.1:${(app.server.address() as { port: number }).port}`
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  const billing = mtlsClient(t, await leafFor(agent, 'billing'))
  const ops = mtlsClient(t, await leafFor(agent, 'ops'))
  const anonymous = mtlsClient(t, { ca: await rootPems(agent) })
  t.equal((await get(web, `${origin}/early`)).status, 200)
  t.equal((await get(billing, `${origin}/early`)).status, 403)
  t.equal((await get(anonymous, `${origin}/early`)).status, 401)
  t.equal((await get(anonymous, `${origin}/early-open`)).status, 200)
  t.equal((await get(ops, `${origin}/early-override`, { method: 'POST' })).status, 200)
  t.equal((await get(web, `${origin}/early-override`, { method: 'POST' })).status, 200, 'no override source matches web: the service allows it')
  t.equal((await get(billing, `${origin}/early-override`, { method: 'POST' })).status, 403)
})

t.test('an intention change applies to the next request of an open connection', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setIntentions(agent, 'api', [{ Name: 'web', Action: 'allow' }])
  const svc = await startService(t, agent)
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  t.equal((await get(web, `${svc.origin}/`)).status, 200)
  const before = svc.app.consulNative.status().intentions?.index
  await setIntentions(agent, 'api', [{ Name: 'web', Action: 'deny' }])
  await waitForStatus(svc.app, (status) => status.intentions?.index !== before)
  t.equal((await get(web, `${svc.origin}/`)).status, 403, 'same keep-alive connection, new decision')
})

t.test('router options: every spelling that reaches a handler must be allowed', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  await setProtocol(agent, 'api', 'http')
  await setIntentions(agent, 'api', [{ Name: 'web', Permissions: [{ Action: 'deny', HTTP: { PathExact: '/admin' } }] }])
  const svc = await startService(t, agent, {
    fastify: { routerOptions: { ignoreTrailingSlash: true, ignoreDuplicateSlashes: true, caseSensitive: false } } as never
  })
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  for (const path of ['/admin', '/admin/', '//admin', '/ADMIN', '/%61dmin']) {
    t.equal((await get(web, `${svc.origin}${path}`)).status, 403, `${path} is denied`)
  }
  t.equal((await get(web, `${svc.origin}/`)).status, 200)
})

t.test("mode 'agent': the agent's authorize endpoint decides per connection; L7 intentions deny", async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  await setProtocol(agent, 'api', 'http')
  await setIntentions(agent, 'api', [
    { Name: 'web', Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/' } }] },
    { Name: 'billing', Action: 'deny' },
    { Name: 'cron', Action: 'allow' }
  ])
  const svc = await startService(t, agent, {
    plugin: { mode: 'agent' },
    routes (app) {
      app.get('/', async (request) => ({ reason: request.consulDecision?.reason }))
      app.get('/ops', { config: { consulNative: { sources: [{ name: 'web', action: 'allow' }] } } }, async () => 'ops')
    }
  })
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  const billing = mtlsClient(t, await leafFor(agent, 'billing'))
  const cron = mtlsClient(t, await leafFor(agent, 'cron'))
  const allowed = await get(cron, `${svc.origin}/`)
  t.equal(allowed.status, 200)
  t.match(allowed.body.reason, /^agent authorize: Matched L4 intention/)
  t.equal((await get(cron, `${svc.origin}/`)).status, 200, 'second request on the same connection')
  t.equal((await get(billing, `${svc.origin}/`)).status, 403)
  t.equal((await get(web, `${svc.origin}/`)).status, 403, 'the agent treats an L7 intention as deny')
  t.equal((await get(web, `${svc.origin}/ops`)).status, 200, 'a route override still decides first')
})

t.test("mode 'agent': an agent that cannot answer means deny", async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const svc = await startService(t, agent, { plugin: { mode: 'agent' } })
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  await agent.close()
  for (let i = 0; i < 2; i++) {
    const res = await get(web, `${svc.origin}/`)
    t.equal(res.status, 403, `request ${i + 1}`)
    t.equal(res.body.code, 'FST_CONSUL_NATIVE_DENIED')
  }
})

t.test('the mesh request normalization applies before the decision', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  await setProtocol(agent, 'api', 'http')
  await setIntentions(agent, 'api', [{
    Name: 'web',
    Permissions: [
      { Action: 'deny', HTTP: { PathExact: '/value/supersecret' } },
      { Action: 'deny', HTTP: { Header: [{ Name: 'x_role', Present: true }] } }
    ]
  }])
  const svc = await startService(t, agent, {
    routes (app) {
      app.get('/*', async (request) => ({ headers: Object.keys(request.headers) }))
    }
  })
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  t.equal((await get(web, `${svc.origin}/value/%73upersecret`)).status, 403, 'unreserved escapes are decoded (T44)')
  t.equal((await get(web, `${svc.origin}/value\\supersecret`)).status, 403, 'backslash is a slash (T47)')
  t.equal((await get(web, `${svc.origin}/value//supersecret`)).status, 200, 'slashes are not merged by default (T45)')
  // The canonical path keeps %2F (T46), but the wildcard parameter the handler gets holds '/':
  // that spelling is decided too (docs/semantics.md#paths-parameters).
  t.equal((await get(web, `${svc.origin}/value%2Fsupersecret`)).status, 403, 'escaped slashes: decided on the decoded parameter as well')
  t.equal((await get(web, `${svc.origin}/value%2Fother`)).status, 200, 'escaped slashes are kept by default (T46)')
  t.equal((await get(web, `${svc.origin}/`, { headers: { x_role: 'a' } })).status, 403, 'underscore headers are allowed and matched by default')

  const meshEntry = (normalization: object): object => ({ Kind: 'mesh', HTTP: { Incoming: { RequestNormalization: normalization } } })
  const putMesh = async (normalization: Record<string, unknown>): Promise<void> => {
    const res = await agentCall(agent, 'PUT', '/v1/config', meshEntry(normalization))
    t.equal(res.status, 200, `mesh entry ${JSON.stringify(normalization)}`)
    await waitForStatus(svc.app, (s) => Object.entries(normalization)
      .every(([key, value]) => (s.intentions?.requestNormalization as Record<string, unknown> | null)?.[key] === value))
  }

  await putMesh({ MergeSlashes: true, PathWithEscapedSlashesAction: 'UNESCAPE_AND_FORWARD' })
  t.equal((await get(web, `${svc.origin}/value//supersecret`)).status, 403, 'MergeSlashes: true')
  t.equal((await get(web, `${svc.origin}/value%2Fsupersecret`)).status, 403, 'UNESCAPE_AND_FORWARD')

  await putMesh({ PathWithEscapedSlashesAction: 'REJECT_REQUEST', HeadersWithUnderscoresAction: 'REJECT_REQUEST' })
  const rejected = await get(web, `${svc.origin}/value%2Fsupersecret`)
  t.equal(rejected.status, 400)
  t.equal(rejected.body.code, 'FST_CONSUL_NATIVE_BAD_PATH')
  const badHeader = await get(web, `${svc.origin}/`, { headers: { x_role: 'a' } })
  t.equal(badHeader.status, 400)
  t.equal(badHeader.body.code, 'FST_CONSUL_NATIVE_BAD_HEADER')
  t.equal((await get(web, `${svc.origin}/`, { headers: { 'x-role': 'a' } })).status, 200, 'a dash is no underscore')

  await putMesh({ HeadersWithUnderscoresAction: 'DROP_HEADER' })
  const dropped = await get(web, `${svc.origin}/`, { headers: { x_role: 'a', 'x-keep': 'b' } })
  t.equal(dropped.status, 200, 'the dropped header no longer matches the deny')
  t.notOk(dropped.body.headers.includes('x_role'), 'and the handler does not see it')
  t.ok(dropped.body.headers.includes('x-keep'))
})

t.test('logs: denials at info with caller, route, method, path and reason; allows at debug', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setIntentions(agent, 'api', [{ Name: 'web', Action: 'allow' }])
  const lines: Array<{ level: number, consulNative?: Record<string, unknown> }> = []
  const svc = await startService(t, agent, { fastify: { logger: { level: 'debug', stream: { write: (line: string) => { lines.push(JSON.parse(line)) } } } } })
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  const billing = mtlsClient(t, await leafFor(agent, 'billing'))
  await get(web, `${svc.origin}/v1/items/7?x=1`)
  await get(billing, `${svc.origin}/admin`)
  const allowed = lines.find((line) => line.consulNative?.event === 'allowed')
  t.match(allowed, { level: 20, consulNative: { source: /svc\/web$/, route: '/v1/items/:id', method: 'GET', path: '/v1/items/7?x=1', reason: /web/ } })
  const denied = lines.find((line) => line.consulNative?.event === 'denied')
  t.match(denied, { level: 30, consulNative: { source: /svc\/billing$/, route: '/admin', method: 'GET', path: '/admin', reason: /default policy/ } })
  // One shape (docs/semantics.md#log-shape): the plugin's child logger, the request's id under Fastify's label.
  for (const line of [allowed, denied]) t.match(line, { plugin: 'fastify-consul-native', reqId: /^req-/, msg: /^fastify-consul-native: request (allowed|denied)$/ })
  const own = lines.filter((line) => line.consulNative !== undefined)
  t.ok(own.length > 3)
  t.ok(own.every((line) => (line as { plugin?: string }).plugin === 'fastify-consul-native'), 'every plugin line carries plugin')
})

t.test('logDenials: a flood from one caller logs its first line only, counters stay exact, and news is logged at once (docs/semantics.md#log-limits)', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  const lines: Array<{ level: number, consulNative?: Record<string, unknown> }> = []
  const logged = new EventEmitter()
  const svc = await startService(t, agent, {
    plugin: { logDenials: { sample: 1, perSecond: 0 } },
    fastify: { logger: { level: 'info', stream: { write: (line: string) => { lines.push(JSON.parse(line)); logged.emit('line') } } } }
  })
  const of = (event: string): Array<Record<string, unknown>> =>
    lines.filter((line) => line.consulNative?.event === event).map((line) => line.consulNative as Record<string, unknown>)
  const billing = mtlsClient(t, await leafFor(agent, 'billing'))
  for (let i = 0; i < 40; i++) t.equal((await get(billing, `${svc.origin}/admin`)).status, 403)
  t.equal(of('denied').length, 1, 'the first denial of billing on /admin is logged, the 39 repeats are not')
  t.match(of('denied')[0], { source: /svc\/billing$/, route: '/admin' })
  t.notOk('suppressed' in of('denied')[0], 'nothing left out yet')

  const web = mtlsClient(t, await leafFor(agent, 'web'))
  t.equal((await get(web, `${svc.origin}/admin`)).status, 403)
  t.equal(of('denied').length, 2, 'a new caller on the same route: logged during the flood')
  t.match(of('denied')[1], { source: /svc\/web$/, route: '/admin', suppressed: 39 }, 'and it reports the 39 lines left out')
  t.equal((await get(billing, `${svc.origin}/nowhere`)).status, 403)
  t.equal((await get(billing, `${svc.origin}/elsewhere`)).status, 403)
  t.match(of('denied').slice(2), [{ source: /svc\/billing$/, route: '(not found)', path: '/nowhere' }], 'a new route (here: any unknown route) is news once')

  const anonymous = mtlsClient(t, { ca: await rootPems(agent) })
  for (let i = 0; i < 5; i++) t.equal((await get(anonymous, `${svc.origin}/admin`)).status, 401)
  t.match(of('unauthenticated'), [{ source: null, route: '/admin', suppressed: 1 }], 'unauthenticated callers: once per network kind and route')

  const counters = svc.app.consulNative.metrics().find((family) => family.name === 'consul_native_requests_total')
  t.match(counters?.values, [{ labels: { outcome: 'allowed' }, value: 0 }, { labels: { outcome: 'denied' }, value: 43 },
    { labels: { outcome: 'unauthenticated' }, value: 5 }], 'counters count every request, logged or not')

  // No line reports the last 4 left out: a summary does, a few seconds later.
  while (of('denials-suppressed').length === 0) await once(logged, 'line')
  t.same(of('denials-suppressed'), [{ event: 'denials-suppressed', suppressed: 4 }])
})

t.test('a logger without isLevelEnabled still gets the allow lines', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const debugLines: unknown[] = []
  const noop = (): void => {}
  const logger = {
    level: 'debug',
    info: noop,
    warn: noop,
    error: noop,
    fatal: noop,
    trace: noop,
    silent: noop,
    debug: (obj: unknown) => { debugLines.push(obj) },
    child () { return logger }
  }
  const svc = await startService(t, agent, { fastify: { loggerInstance: logger } as never })
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  t.equal((await get(web, `${svc.origin}/`)).status, 200)
  t.ok(debugLines.some((line) => (line as { consulNative?: { event?: string } }).consulNative?.event === 'allowed'))
})

t.test('the path the router dispatched must be allowed too: dot segments cannot reach another handler', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setProtocol(agent, 'api', 'http')
  await setIntentions(agent, 'api', [{ Name: 'web', Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/public/' } }] }])
  const svc = await startService(t, agent, {
    routes (app) {
      app.get('/public/*', async () => 'public')
      app.get('/admin/*', async () => 'admin')
    }
  })
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  t.equal((await get(web, `${svc.origin}/public/y`)).status, 200)
  t.equal((await get(web, `${svc.origin}/public/./y`)).status, 200, 'a harmless dot segment inside the allowed prefix')
  for (const path of ['/admin/x/../../public/y', '/admin/%2e%2e/public/y', '/admin/x\\..\\..\\public/y']) {
    const res = await get(web, `${svc.origin}${path}`)
    t.equal(res.status, 403, `${path} is denied`)
    t.not(res.body, 'admin', `${path} never reaches the /admin handler`)
  }
})

t.test('a :path header matcher sees the normalized path, as Envoy does', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  await setProtocol(agent, 'api', 'http')
  await setIntentions(agent, 'api', [{ Name: 'web', Permissions: [{ Action: 'deny', HTTP: { Header: [{ Name: ':path', Prefix: '/admin' }] } }] }])
  const svc = await startService(t, agent)
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  t.equal((await get(web, `${svc.origin}/admin?x=1`)).status, 403)
  t.equal((await get(web, `${svc.origin}/./admin`)).status, 403)
  t.equal((await get(web, `${svc.origin}/./admin?x=1`)).status, 403)
  t.equal((await get(web, `${svc.origin}/v1/items/1`)).status, 200)
})

t.test('a root route under a prefix answers at /p and /p/: a deny for either spelling counts', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  await setProtocol(agent, 'api', 'http')
  await setIntentions(agent, 'api', [{ Name: 'web', Permissions: [{ Action: 'deny', HTTP: { PathExact: '/p' } }] }])
  const svc = await startService(t, agent, {
    routes (app) {
      app.register(async (child) => { child.get('/', async () => 'p root') }, { prefix: '/p' })
      app.register(async (child) => { child.get('/', async () => 'q root') }, { prefix: '/q' })
    }
  })
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  t.equal((await get(web, `${svc.origin}/p`)).status, 403)
  t.equal((await get(web, `${svc.origin}/p/`)).status, 403)
  t.equal((await get(web, `${svc.origin}/q/`)).body, 'q root')
})

t.test("mode 'agent': an intentions change is applied to open connections", async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setIntentions(agent, 'api', [{ Name: 'cron', Action: 'allow' }])
  const svc = await startService(t, agent, { plugin: { mode: 'agent' } })
  const cron = mtlsClient(t, await leafFor(agent, 'cron'))
  t.equal((await get(cron, `${svc.origin}/`)).status, 200)
  const before = svc.app.consulNative.status().intentions?.index
  await setIntentions(agent, 'api', [{ Name: 'cron', Action: 'deny' }])
  await waitForStatus(svc.app, (status) => status.intentions?.index !== before)
  t.equal((await get(cron, `${svc.origin}/`)).status, 403, 'same connection, asked again')
})

t.test('metrics(): request outcomes, sync failures, readiness and leaf expiry; prometheus() as text', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setIntentions(agent, 'api', [{ Name: 'web', Action: 'allow' }])
  const svc = await startService(t, agent)
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  const billing = mtlsClient(t, await leafFor(agent, 'billing'))
  const anonymous = mtlsClient(t, { ca: await rootPems(agent) })
  await get(web, `${svc.origin}/`)
  await get(web, `${svc.origin}/`)
  await get(billing, `${svc.origin}/`)
  await get(anonymous, `${svc.origin}/`)
  await get(anonymous, `${svc.origin}/health`)
  const families = svc.app.consulNative.metrics()
  const requests = families.find((family) => family.name === 'consul_native_requests_total')
  t.same(requests?.values.map((v) => [v.labels.outcome, v.value]), [['allowed', 2], ['denied', 1], ['unauthenticated', 1], ['rejected', 0], ['exempt', 1], ['shadow_denied', 0], ['shadow_unauthenticated', 0]])
  t.same(families.find((family) => family.name === 'consul_native_sync_failures_total')?.values.map((v) => v.value), [0, 0, 0, 0, 0, 0, 0])
  t.same(families.find((family) => family.name === 'consul_native_ready')?.values, [{ value: 1, labels: {} }])
  const expiry = families.find((family) => family.name === 'consul_native_leaf_expiry_seconds')?.values[0]?.value ?? 0
  t.ok(expiry > 71 * 3600 && expiry <= 72 * 3600, `leaf expires in about 72 h (${expiry} s)`)
  const text = svc.app.consulNative.prometheus()
  t.match(text, /# TYPE consul_native_requests_total counter\nconsul_native_requests_total\{outcome="allowed"\} 2\n/)
  t.match(text, /consul_native_sync_failures_total\{watch="leaf"\} 0\n/)
  t.match(text, /consul_native_ready 1\n/)
})

t.test('metrics() registers with prom-client as the README shows', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const svc = await startService(t, agent)
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  await get(web, `${svc.origin}/`)
  const app = svc.app
  const registry = new promClient.Registry()
  for (const family of app.consulNative.metrics()) {
    registry.registerMetric({
      name: family.name,
      help: family.help,
      type: family.type,
      get: async () => ({ ...app.consulNative.metrics().find((f) => f.name === family.name), aggregator: 'sum' }),
      reset: () => {}
    } as never)
  }
  const text = await registry.metrics()
  t.match(text, /consul_native_requests_total\{outcome="allowed"\} 1/)
  t.match(text, /# TYPE consul_native_ready gauge\nconsul_native_ready 1/)
})
