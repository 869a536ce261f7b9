// Candidate intentions on live traffic (docs/semantics.md#rollout-candidate): every request is
// also decided against the candidate; disagreements are counted and logged; responses never change.
import t from 'tap'
import { localProvider, newIssuer } from './helpers/jwt'
import { once } from 'node:events'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { agentCall, get, leafFor, logLines, mtlsClient, rootPems, setIntentions, setProtocol, startAgent, startService, waitForStatus } from './helpers/mesh'

const CANDIDATE = {
  Kind: 'service-intentions',
  Name: 'api',
  Sources: [
    { Name: 'web', Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/public' } }] },
    { Name: 'billing', Action: 'allow' }
  ]
}

t.test('disagreements are counted and logged with both reasons; responses follow the live intentions', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setProtocol(agent, 'api', 'http')
  await setIntentions(agent, 'api', [{ Name: 'web', Action: 'allow' }, { Name: 'billing', Action: 'deny' }])
  const logs = logLines()
  const svc = await startService(t, agent, {
    plugin: { candidate: CANDIDATE },
    fastify: { logger: { level: 'info', stream: logs.stream } },
    routes: (app) => {
      app.all('/*', async (request) => ({ decision: request.consulDecision }))
      app.get('/open', { config: { consulNative: false } }, async () => 'open')
    }
  })
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  const billing = mtlsClient(t, await leafFor(agent, 'billing'))
  const anonymous = mtlsClient(t, { ca: await rootPems(agent) })

  t.equal((await get(web, `${svc.origin}/public/x`)).status, 200, 'both allow')
  const private_ = await get(web, `${svc.origin}/private`)
  t.equal(private_.status, 200, 'live allows, the candidate would deny: served')
  t.same(private_.body.decision, { allow: true, reason: 'intention default/web => default/api (precedence 9) allow' })
  t.equal((await get(billing, `${svc.origin}/x`)).status, 403, 'live denies, the candidate would allow: still denied')
  t.equal((await get(anonymous, `${svc.origin}/x`)).status, 401, 'no identity: no candidate decision')
  t.equal((await get(anonymous, `${svc.origin}/open`)).status, 200, 'exempt: no candidate decision')

  const disagreements = logs.lines.filter((l) => l.consulNative?.event === 'candidate-disagrees')
  t.match(disagreements, [
    {
      level: 30,
      consulNative: {
        source: /\/svc\/web$/,
        route: '/*',
        method: 'GET',
        path: '/private',
        live: 'allow',
        liveReason: 'intention default/web => default/api (precedence 9) allow',
        candidate: 'deny',
        candidateReason: 'intention default/web => default/api (precedence 9): no permission matched, default policy (deny)'
      }
    },
    { consulNative: { source: /\/svc\/billing$/, live: 'deny', candidate: 'allow', candidateReason: 'intention default/billing => default/api (precedence 9) allow' } }
  ])
  t.equal(disagreements.length, 2)
  const family = svc.app.consulNative.metrics().find((m) => m.name === 'consul_native_candidate_disagreements_total')
  t.same(family?.values, [{ value: 1, labels: { live: 'allow', candidate: 'deny' } }, { value: 1, labels: { live: 'deny', candidate: 'allow' } }])
  t.match(svc.app.consulNative.prometheus(), 'consul_native_candidate_disagreements_total{live="allow",candidate="deny"} 1\n')
  t.match(svc.app.consulNative.status().candidate, { source: 'inline', loaded: true, count: 2, lastError: null, disagreements: 2 })

  // The live intentions change: the candidate is recompiled against them (its own entry replaces
  // the live one, so decisions against it stay the same).
  await setIntentions(agent, 'api', [{ Name: 'web', Action: 'deny' }])
  const index = Number((await agentCall(agent, 'GET', '/v1/connect/intentions/match?by=destination&name=api')).headers['x-consul-index'])
  await waitForStatus(svc.app, (s) => (s.intentions?.index ?? 0) >= index)
  t.equal((await get(web, `${svc.origin}/public/y`)).status, 403)
  t.match(logs.lines.filter((l) => l.consulNative?.event === 'candidate-disagrees').at(-1), { consulNative: { path: '/public/y', live: 'deny', candidate: 'allow' } })
})

t.test('a candidate file: loaded after start, re-read on change, status and events say so', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'plugin-candidate-'))
  t.teardown(async () => await rm(dir, { recursive: true, force: true }))
  const file = join(dir, 'api.json')
  await writeFile(file, JSON.stringify(CANDIDATE))
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setProtocol(agent, 'api', 'http')
  await setIntentions(agent, 'api', [{ Name: 'web', Action: 'allow' }])
  const svc = await startService(t, agent, { plugin: { candidate: file, enforcement: 'shadow' } })
  t.match(svc.app.consulNative.status().candidate, { source: file, loaded: true, count: 2 })
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  t.equal((await get(web, `${svc.origin}/admin`)).status, 200, 'the L7 candidate denies web, the response does not change')
  t.equal(svc.app.consulNative.status().candidate?.disagreements, 1)

  const changed = once(svc.app.consulNative.events, 'candidate')
  await writeFile(file, '[]')
  const [status] = await changed
  t.match(status.candidate, { loaded: true, count: 2, lastError: /must be a JSON object/ })

  // A listener that throws is logged; the watcher keeps going.
  const again = once(svc.app.consulNative.events, 'candidate')
  const buggy = (): void => { throw new Error('listener bug') }
  svc.app.consulNative.events.on('candidate', buggy)
  await writeFile(file, JSON.stringify(CANDIDATE))
  await again
  t.match(svc.app.consulNative.status().candidate, { loaded: true, lastError: null })
  svc.app.consulNative.events.off('candidate', buggy)

  // On a tcp service Consul refuses L7 permissions; so does the candidate, keeping the last good one.
  const tcp = once(svc.app.consulNative.events, 'candidate')
  await setProtocol(agent, 'api', 'tcp')
  const [onTcp] = await tcp
  t.match(onTcp.candidate, { loaded: true, lastError: 'service "api" has protocol "tcp", which is incompatible with L7 intentions permissions' })
})

t.test('fastify.consulNative.explain(): live and candidate, with a route\'s overrides', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setProtocol(agent, 'api', 'http')
  await setIntentions(agent, 'api', [{ Name: 'web', Action: 'allow' }])
  const svc = await startService(t, agent, {
    plugin: { candidate: CANDIDATE },
    routes: (app) => {
      app.get('/ops', { config: { consulNative: { sources: [{ name: 'web', action: 'deny' }] } } }, async () => 'ops')
      app.get('/public/x', async () => 'x')
      app.route({ method: ['GET', 'POST'], url: '/multi', config: { consulNative: { sources: [{ name: 'web', action: 'deny' }] } }, handler: async () => 'm' })
    }
  })
  for (const method of ['GET', 'POST']) {
    t.match(svc.app.consulNative.explain({ source: 'web', method, path: '/multi', route: '/multi' }), { allow: false, trace: [{ step: 'route', route: `${method} /multi` }] },
      `a route with several methods is named once per method: ${method} /multi`)
  }
  const explained = svc.app.consulNative.explain({ source: 'web', method: 'GET', path: '/private' })
  t.match(explained, { allow: true, decidedBy: { intention: 'intention default/web => default/api (precedence 9)', permission: null } })
  t.match(explained.candidate, { allow: false, reason: /no permission matched, default policy \(deny\)/ })
  const spiffe = (td: string): string => `spiffe://${td}/ns/default/dc/dc1/svc/web`
  t.match(svc.app.consulNative.explain({ source: spiffe(agent.trustDomain), method: 'GET', path: '/private' }), { allow: true, outcome: 'allow' })
  t.match(svc.app.consulNative.explain({ source: spiffe('other.consul'), method: 'GET', path: '/private' }), { allow: false, outcome: 'unauthenticated', candidate: { outcome: 'unauthenticated' } },
    'an ID of another trust domain is explained as the request would be treated')
  const viaRoute = svc.app.consulNative.explain({ source: 'web', method: 'GET', path: '/ops', route: '/ops' })
  t.match(viaRoute, { allow: false, reason: 'route override sources[0] web deny', trace: [{ step: 'route', route: 'GET /ops', exempt: false, overrides: 1 }] })
  t.match(svc.app.consulNative.explain({ source: 'web', method: 'GET', path: '/health', route: '/health' }), { outcome: 'exempt' })
  t.throws(() => svc.app.consulNative.explain({ source: 'web', method: 'GET', path: '/x', route: '/nowhere' }),
    { code: 'FST_CONSUL_NATIVE_INVALID_OPTION', message: /no route GET \/nowhere was declared after the plugin \(known: .*GET \/ops/ })

  const plain = await startService(t, agent)
  t.notOk('candidate' in plain.app.consulNative.explain({ source: 'web', method: 'GET', path: '/' }), 'no candidate, no candidate explanation')
})

t.test('candidate disagreement lines are limited like denials; the counter stays exact', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setIntentions(agent, 'api', [{ Name: 'web', Action: 'allow' }])
  const logs = logLines()
  const svc = await startService(t, agent, {
    plugin: { candidate: { Kind: 'service-intentions', Name: 'api', Sources: [{ Name: 'web', Action: 'deny' }] }, logDenials: { perSecond: 0 } },
    fastify: { logger: { level: 'info', stream: logs.stream } },
    routes: (app) => { app.get('/same', async () => 'ok') }
  })
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  for (let i = 0; i < 3; i++) t.equal((await get(web, `${svc.origin}/same`)).status, 200)
  t.equal(logs.lines.filter((l) => l.consulNative?.event === 'candidate-disagrees').length, 1, 'the first line of a caller and route only')
  t.equal(svc.app.consulNative.status().candidate?.disagreements, 3)
  // An unknown route is a pair of its own, and its first line carries the count left out before it.
  t.equal((await get(web, `${svc.origin}/nowhere`)).status, 404)
  const lines = logs.lines.filter((l) => l.consulNative?.event === 'candidate-disagrees')
  t.equal(lines.length, 2)
  t.match(lines[1], { consulNative: { route: '(not found)', path: '/nowhere', suppressed: 2 } })
  t.equal(svc.app.consulNative.status().candidate?.disagreements, 4)
})

t.test('a candidate asking for a JWT the live intentions do not: its provider is verified for it, apart (docs/semantics.md#rollout-candidate)', async (t) => {
  const okta = await newIssuer('ES256')
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setProtocol(agent, 'api', 'http')
  t.equal((await agentCall(agent, 'PUT', '/v1/config', localProvider('okta', [okta]))).status, 200)
  await setIntentions(agent, 'api', [{ Name: 'web', Action: 'allow' }])
  const candidate = {
    Kind: 'service-intentions',
    Name: 'api',
    Sources: [{ Name: 'web', Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/' }, JWT: { Providers: [{ Name: 'okta' }] } }] }]
  }
  const svc = await startService(t, agent, { plugin: { candidate }, routes: (app) => { app.get('/*', async (request) => ({ auth: request.headers.authorization ?? null, jwt: request.consulJwt })) } })
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  const token = await okta.sign({})
  const res = await get(web, `${svc.origin}/x`, { headers: { authorization: `Bearer ${token}` } })
  t.equal(res.status, 200)
  t.same(res.body, { auth: `Bearer ${token}`, jwt: null }, 'what the handler sees follows the live intentions only')
  await get(web, `${svc.origin}/y`)
  // Compared once the candidate's own token is verified, after the answer.
  t.equal(await disagreementsSettle(svc.app, 1), 1, 'only the request without a token disagrees: a valid one satisfies the candidate')
})

/** The candidate's disagreement count once it has reached `expected` and stayed there a moment. */
async function disagreementsSettle (app: import('fastify').FastifyInstance, expected: number): Promise<number | undefined> {
  const count = (): number | undefined => app.consulNative.status().candidate?.disagreements
  for (let i = 0; i < 200 && count() !== expected; i++) await new Promise((resolve) => setTimeout(resolve, 10))
  await new Promise((resolve) => setTimeout(resolve, 100))
  return count()
}

t.test('a candidate asking for another provider than the live intentions: each decision reads its own (docs/semantics.md#rollout-candidate)', async (t) => {
  const okta = await newIssuer('ES256')
  const auth0 = await newIssuer('ES256')
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setProtocol(agent, 'api', 'http')
  for (const [name, issuer] of [['okta', okta], ['auth0', auth0]] as const) {
    t.equal((await agentCall(agent, 'PUT', '/v1/config', localProvider(name, [issuer]))).status, 200)
  }
  const withJwt = (provider: string): object => ({ Name: 'web', Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/' }, JWT: { Providers: [{ Name: provider }] } }] })
  await setIntentions(agent, 'api', [withJwt('okta')])
  const svc = await startService(t, agent, {
    plugin: { candidate: { Kind: 'service-intentions', Name: 'api', Sources: [withJwt('auth0')] } },
    routes: (app) => { app.get('/*', async () => 'ok') }
  })
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  t.equal((await get(web, `${svc.origin}/x`, { headers: { authorization: `Bearer ${await okta.sign({})}` } })).status, 200, 'live: okta verified')
  t.equal(await disagreementsSettle(svc.app, 1), 1, 'the candidate asks for auth0, which an okta token is not')
})

t.test('a candidate that never loaded: requests are decided by the live intentions alone', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'plugin-candidate-'))
  t.teardown(async () => await rm(dir, { recursive: true, force: true }))
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setIntentions(agent, 'api', [{ Name: 'web', Action: 'allow' }])
  const svc = await startService(t, agent, { plugin: { candidate: join(dir, 'missing.json') } })
  t.match(svc.app.consulNative.status().candidate, { loaded: false, disagreements: 0 })
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  t.equal((await get(web, `${svc.origin}/`)).status, 200)
  t.equal(svc.app.consulNative.status().candidate?.disagreements, 0, 'nothing to compare with')
})
