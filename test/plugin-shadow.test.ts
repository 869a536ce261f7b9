// Shadow enforcement over real mTLS (docs/semantics.md#rollout-shadow): the same decisions as
// enforce mode, would-be 401/403 served, recorded in request.consulDecision, logs and counters;
// 400s of the request normalization never shadowed; per-route settings win; status and health.
import t from 'tap'
import { once } from 'node:events'
import Fastify from 'fastify'
import websocket from '@fastify/websocket'
import WebSocket from 'ws'
import consulNative, { httpsOptions } from '../lib/index'
import { localProvider, newIssuer } from './helpers/jwt'
import fc from 'fast-check'
import type { FastifyInstance } from 'fastify'
import type { Dispatcher } from 'undici'
import type { DevAgent } from '../lib/dev-agent/index'
import { agentCall, get, leafFor, logLines, mtlsClient, rootPems, setIntentions, setProtocol, startAgent, startService, waitForStatus } from './helpers/mesh'

const echo = (app: FastifyInstance): void => {
  app.all('/*', async (request) => ({ decision: request.consulDecision }))
}

async function intentionsIndex (agent: DevAgent): Promise<number> {
  return Number((await agentCall(agent, 'GET', '/v1/connect/intentions/match?by=destination&name=api')).headers['x-consul-index'])
}

t.test('shadow serves would-be denials and records them; enforce answers them', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setProtocol(agent, 'api', 'http')
  await setIntentions(agent, 'api', [
    { Name: 'web', Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/open' } }] },
    { Name: 'billing', Action: 'deny' }
  ])
  const logs = logLines()
  const svc = await startService(t, agent, {
    plugin: { enforcement: 'shadow' },
    fastify: { logger: { level: 'info', stream: logs.stream } },
    routes: (app) => {
      echo(app)
      app.get('/strict', { config: { consulNative: { enforcement: 'enforce' } } }, async () => ({ strict: true }))
    }
  })
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  const billing = mtlsClient(t, await leafFor(agent, 'billing'))
  const anonymous = mtlsClient(t, { ca: await rootPems(agent) })

  const open = await get(web, `${svc.origin}/open/1`)
  t.equal(open.status, 200)
  t.same(open.body.decision, { allow: true, reason: 'intention default/web => default/api (precedence 9), permission 1 (allow)' }, 'an allow carries no enforced flag')

  const closed = await get(web, `${svc.origin}/closed`)
  t.equal(closed.status, 200, 'a would-be 403 is served')
  t.same(closed.body.decision, {
    allow: false,
    reason: 'intention default/web => default/api (precedence 9): no permission matched, default policy (deny)',
    enforced: false
  })
  const l4 = await get(billing, `${svc.origin}/open/1`)
  t.same(l4.body.decision, { allow: false, reason: 'intention default/billing => default/api (precedence 9) deny', enforced: false })
  const noCert = await get(anonymous, `${svc.origin}/open/1`)
  t.equal(noCert.status, 200, 'a caller without a certificate keeps working')
  t.same(noCert.body.decision, { allow: false, reason: 'unauthenticated', enforced: false })

  // The route's own setting wins.
  t.equal((await get(billing, `${svc.origin}/strict`)).status, 403)
  t.equal((await get(anonymous, `${svc.origin}/strict`)).status, 401)
  // The mesh normalization's 400 is never shadowed: enforce mode would not route the spelling.
  const bad = await get(web, `${svc.origin}/open/%00`)
  t.equal(bad.status, 400)
  // Nor for a caller without a certificate: the normalization is checked before the identity.
  t.equal((await get(anonymous, `${svc.origin}/open/%00`)).status, 400, 'no certificate: 400, not a served 401')

  const shadowLines = logs.lines.filter((l) => l.consulNative?.event?.startsWith('shadow-'))
  t.match(shadowLines, [
    { level: 30, consulNative: { event: 'shadow-denied', source: /\/svc\/web$/, route: '/*', method: 'GET', path: '/closed', reason: /no permission matched/ } },
    { consulNative: { event: 'shadow-denied', source: /\/svc\/billing$/, reason: /deny$/ } },
    { consulNative: { event: 'shadow-unauthenticated', source: null, path: '/open/1', reason: /certificate/ } }
  ])
  t.equal(shadowLines.length, 3)
  t.equal(logs.lines.filter((l) => l.consulNative?.event === 'denied').length, 1, 'the enforced route logs a plain denial')

  const requests = svc.app.consulNative.metrics().find((m) => m.name === 'consul_native_requests_total')
  const count = (outcome: string): number | undefined => requests?.values.find((v) => v.labels.outcome === outcome)?.value
  t.equal(count('shadow_denied'), 2)
  t.equal(count('shadow_unauthenticated'), 1)
  t.equal(count('denied'), 1)
  t.equal(count('unauthenticated'), 1)
  t.equal(count('rejected'), 2)
  t.match(svc.app.consulNative.prometheus(), 'consul_native_requests_total{outcome="shadow_denied"} 2\n')

  t.same(svc.app.consulNative.status().enforcement, { mode: 'shadow', routes: { 'GET /strict': 'enforce', 'HEAD /strict': 'enforce' } })
  t.equal(svc.app.consulNative.status().candidate, null)
  const health = await get(anonymous, `${svc.origin}/health`)
  t.same(health.body, { status: 'passing', service: 'api', registered: null, enforcement: 'mixed' }, 'the mode, never route names')
})

t.test('enforce by default; one shadowed route; health shows the mode', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  const svc = await startService(t, agent, {
    routes: (app) => {
      app.get('/new', { config: { consulNative: { enforcement: 'shadow' } } }, async (request) => ({ decision: request.consulDecision }))
      app.get('/old', async () => ({ old: true }))
    }
  })
  const anonymous = mtlsClient(t, { ca: await rootPems(agent) })
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  t.equal((await get(anonymous, `${svc.origin}/old`)).status, 401)
  t.equal((await get(web, `${svc.origin}/old`)).status, 403)
  t.same((await get(web, `${svc.origin}/new`)).body, { decision: { allow: false, reason: 'default policy (deny)', enforced: false } })
  t.equal((await get(anonymous, `${svc.origin}/nowhere`)).status, 401, 'a 404 is protected under the plugin\'s mode')
  t.same(svc.app.consulNative.status().enforcement, { mode: 'enforce', routes: { 'GET /new': 'shadow', 'HEAD /new': 'shadow' } })
  t.equal((await get(anonymous, `${svc.origin}/health`)).body.enforcement, 'mixed')

  const plain = await startService(t, agent, { plugin: { enforcement: 'shadow' } })
  t.equal((await get(anonymous, `${plain.origin}/health`)).body.enforcement, 'shadow')
})

t.test('late routes (declared before the plugin) carry their enforcement too', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  const Fastify = (await import('fastify')).default
  const { default: consulNative, httpsOptions } = await import('../lib/index')
  const app = Fastify({ https: httpsOptions() })
  t.teardown(async () => await app.close())
  app.get('/early', { config: { consulNative: { enforcement: 'shadow' } } }, async (request) => ({ decision: request.consulDecision }))
  await app.register(consulNative, { service: 'api', agent: { address: agent.address } })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  const res = await get(web, `https://127.0.0.1:${(app.server.address() as { port: number }).port}/early`)
  t.same(res.body.decision, { allow: false, reason: 'default policy (deny)', enforced: false })
  t.same(app.consulNative.status().enforcement.routes, { 'GET /early': 'shadow' })
})

// ---------------------------------------------------------------------------------------------
// Property: shadow decides exactly as enforce does, and only the answer differs.

const SOURCES = ['web', 'billing', '*'] as const
const PATHS = ['/a', '/a/b', '/admin', '/a/', '/A', '/a?x=1', '/admin/../a', '/a/%2e%2e/admin', '/a%00b']
const permission = fc.record({
  Action: fc.constantFrom('allow', 'deny'),
  HTTP: fc.oneof(
    fc.record({ PathPrefix: fc.constantFrom('/a', '/admin', '/') }),
    fc.record({ PathExact: fc.constantFrom('/a', '/a/b', '/admin'), Methods: fc.subarray(['GET', 'POST'], { minLength: 1 }) }),
    fc.record({ Header: fc.constant([{ Name: 'x-env', Exact: 'prod' }]) })
  )
})
const source = (name: string): fc.Arbitrary<Record<string, unknown>> => fc.oneof(
  fc.record({ Name: fc.constant(name), Action: fc.constantFrom('allow', 'deny') }),
  fc.record({ Name: fc.constant(name), Permissions: fc.array(permission, { minLength: 1, maxLength: 3 }) })
)
const intentionSet = fc.subarray([...SOURCES], { minLength: 1 }).chain((names) => fc.tuple(...names.map(source)))
const requestArb = fc.record({
  caller: fc.constantFrom('web', 'billing', 'cron', null),
  method: fc.constantFrom('GET', 'POST'),
  path: fc.constantFrom(...PATHS),
  env: fc.constantFrom('prod', 'dev', null)
})

t.test('property: shadow serves the same traffic with no 401/403, and the same decisions and counts', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setProtocol(agent, 'api', 'http')
  // Each instance records the decision of its last request, also for answers the handler never gave.
  const recorded = new Map<FastifyInstance, unknown>()
  const recording = (app: FastifyInstance): void => {
    echo(app)
    app.addHook('onSend', async (request, _reply, payload) => {
      recorded.set(app, request.consulDecision)
      return payload
    })
  }
  const enforce = await startService(t, agent, { routes: recording })
  const shadow = await startService(t, agent, { routes: recording, plugin: { enforcement: 'shadow' } })
  const ca = await rootPems(agent)
  const clients = new Map<string | null, Dispatcher>([[null, mtlsClient(t, { ca })]])
  for (const name of ['web', 'billing', 'cron']) clients.set(name, mtlsClient(t, await leafFor(agent, name)))

  let compared = 0
  let shadowed = 0
  await fc.assert(fc.asyncProperty(intentionSet, fc.array(requestArb, { minLength: 4, maxLength: 8 }), async (sources, requests) => {
    await setIntentions(agent, 'api', sources)
    const index = await intentionsIndex(agent)
    for (const svc of [enforce, shadow]) await waitForStatus(svc.app, (s) => (s.intentions?.index ?? 0) >= index)
    for (const r of requests) {
      const headers: Record<string, string> = r.env === null ? {} : { 'x-env': r.env }
      const client = clients.get(r.caller) as Dispatcher
      recorded.clear()
      const live = await get(client, `${enforce.origin}${r.path}`, { method: r.method, headers })
      const dry = await get(client, `${shadow.origin}${r.path}`, { method: r.method, headers })
      const liveDecision = recorded.get(enforce.app) as { allow: boolean, reason: string }
      const dryDecision = recorded.get(shadow.app)
      const what = `${r.caller ?? 'no certificate'} ${r.method} ${r.path} ${JSON.stringify(sources)}`
      if (live.status === 401 || live.status === 403) {
        shadowed++
        t.equal(dry.status, 200, `served: ${what}`)
        t.same(dryDecision, { ...liveDecision, enforced: false }, `same decision and reason: ${what}`)
        if (dry.status !== 200) return false
      } else {
        t.equal(dry.status, live.status, `same answer: ${what}`)
        t.same(dryDecision, liveDecision, `same decision: ${what}`)
        if (dry.status !== live.status) return false
      }
      compared++
    }
    return true
  }), { numRuns: 12 })
  t.ok(shadowed > 0 && compared > shadowed, `both kinds seen (${shadowed} shadowed of ${compared})`)

  const counts = (app: FastifyInstance): Record<string, number> => Object.fromEntries(
    (app.consulNative.metrics().find((m) => m.name === 'consul_native_requests_total')?.values ?? []).map((v) => [v.labels.outcome, v.value]))
  const e = counts(enforce.app)
  const s = counts(shadow.app)
  t.equal(s.shadow_denied, e.denied, 'would-be 403s counted as shadow_denied')
  t.equal(s.shadow_unauthenticated, e.unauthenticated, 'would-be 401s counted as shadow_unauthenticated')
  t.equal(s.allowed, e.allowed)
  t.equal(s.rejected, e.rejected, '400s are the same: never shadowed')
  t.equal(s.denied + s.unauthenticated, 0, 'shadow never answered 401/403')
  t.equal(e.shadow_denied + e.shadow_unauthenticated, 0)
})

t.test('mode agent: the agent\'s denials are shadowed the same way', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setIntentions(agent, 'api', [{ Name: 'web', Action: 'allow' }, { Name: 'billing', Action: 'deny' }])
  const svc = await startService(t, agent, { plugin: { mode: 'agent', enforcement: 'shadow' }, routes: echo })
  const billing = mtlsClient(t, await leafFor(agent, 'billing'))
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  const denied = await get(billing, `${svc.origin}/x`)
  t.equal(denied.status, 200)
  t.match(denied.body.decision, { allow: false, reason: /^agent authorize: Matched L4 intention/, enforced: false })
  t.same(Object.keys((await get(web, `${svc.origin}/x`)).body.decision), ['allow', 'reason'], 'an allow is not marked')
})

t.test('shadow keeps serving open WebSockets through recheckUpgrades, the unauthenticated ones too (docs/semantics.md#rollout-shadow)', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setIntentions(agent, 'api', [{ Name: 'ops', Action: 'allow' }])
  const logs = logLines()
  const app = Fastify({ https: httpsOptions(), logger: { level: 'info', stream: logs.stream } }) as unknown as FastifyInstance
  t.teardown(async () => await app.close())
  await app.register(consulNative, { service: 'api', agent: { address: agent.address }, recheckUpgrades: true, enforcement: 'shadow' })
  await app.register(websocket)
  app.get('/ws', { websocket: true }, (socket: WebSocket) => { socket.on('message', (m: Buffer) => socket.send(`echo ${m.toString()}`)) })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const port = (app.server.address() as { port: number }).port
  const open = async (creds: object): Promise<{ closed: () => boolean }> => {
    const ws = new WebSocket(`wss://127.0.0.1:${port}/ws`, { ...creds, checkServerIdentity: (() => undefined) as unknown as () => boolean })
    t.teardown(() => ws.terminate())
    await once(ws, 'open')
    let closed = false
    ws.on('close', () => { closed = true })
    return { closed: () => closed }
  }
  const web = await open(await leafFor(agent, 'web'))
  const anonymous = await open({ ca: await rootPems(agent) })
  const updated = once(app.consulNative.events, 'intentions')
  await setIntentions(agent, 'api', [{ Name: 'ops', Action: 'deny' }])
  await updated
  await new Promise((resolve) => setTimeout(resolve, 200))
  t.equal(web.closed(), false, 'a would-be denial stays served')
  t.equal(anonymous.closed(), false, 'so does a caller without a certificate')
  t.same(logs.lines.filter((l) => ['upgrade-revoked', 'upgrade-recheck-failed'].includes(l.consulNative?.event)), [], 'nothing revoked, nothing failed')
})

t.test('shadow-served requests read tokens as allowed ones do: a caller cannot forge the forwarding header (docs/semantics.md#jwt-forwarding)', async (t) => {
  const okta = await newIssuer('ES256')
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setProtocol(agent, 'api', 'http')
  t.equal((await agentCall(agent, 'PUT', '/v1/config', localProvider('okta', [okta], { Forwarding: { HeaderName: 'X-JWT-Payload' } }))).status, 200)
  await setIntentions(agent, 'api', [{ Name: 'web', Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/' }, JWT: { Providers: [{ Name: 'okta' }] } }] }])
  const svc = await startService(t, agent, {
    plugin: { enforcement: 'shadow' },
    routes: (app) => { app.get('/*', async (request) => ({ payload: request.headers['x-jwt-payload'] ?? null, auth: request.headers.authorization ?? null, enforced: request.consulDecision?.enforced })) }
  })
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  const forged = Buffer.from('{"role":"admin"}').toString('base64url')
  const res = await get(web, `${svc.origin}/x`, { headers: { 'x-jwt-payload': forged, authorization: 'Bearer not-a-token' } })
  t.equal(res.status, 200, 'served')
  t.equal(res.body.enforced, false, 'as a shadowed denial')
  t.equal(res.body.payload, null, 'the caller\'s own forwarding header is removed')
  t.equal(res.body.auth, null, 'and the token header that is not forwarded')
})
