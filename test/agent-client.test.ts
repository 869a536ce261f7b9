import t from 'tap'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { AgentClient, agentStatusOf, blockingTimeout, clampWait, formatWait } from '../lib/agent/client'
import type { AgentClientOptions } from '../lib/agent/client'
import { resolveAgentConfig } from '../lib/agent/config'
import { ShapeError, parseAgentSelf, parseAuthorize, parseCARoots, parseConfigEntry, parseIntention, parseIntentionMatch, parseIssuedCert } from '../lib/agent/parse'
import type { AgentConfig, AgentOptions } from '../lib/agent/config'
import { AgentInvalidResponseError, AgentResponseError, AgentUnreachableError, InvalidOptionError } from '../lib/errors'
import { CAPTURED_DIR, FakeAgent, captured, capturedAuthorizeBodies, makeTlsMaterial, sequence } from './helpers/agent-fixtures'

const json = (body: unknown, headers: Record<string, string | string[]> = {}, status = 200): {
  status: number, headers: Record<string, string | string[]>, body: string
} => ({ status, headers: { 'content-type': 'application/json', ...headers }, body: JSON.stringify(body) })
const text = (status: number, body: string): { status: number, headers: Record<string, string>, body: string } =>
  ({ status, headers: { 'content-type': 'text/plain; charset=utf-8' }, body })
const capturedJson = (name: string): unknown => JSON.parse(readFileSync(join(CAPTURED_DIR, `${name}.json`), 'utf8'))

// test/agent-client-worker.test.ts runs this file again with the traffic on the agent worker thread.
const WORKER = process.env.TEST_AGENT_CLIENT_WORKER === '1'

/** A client for `agent`, closed with the test. */
async function setup (tt: tap.Test, agent: FakeAgent, opts: AgentClientOptions = {}, agentOpts: AgentOptions = {}): Promise<AgentClient> {
  const config: AgentConfig = agent.socketPath === null
    ? resolveAgentConfig({ address: agent.origin, ...agentOpts }, {})
    : resolveAgentConfig({ address: `unix://${agent.socketPath}`, ...agentOpts }, {})
  const client = new AgentClient(config, { worker: WORKER, ...opts })
  tt.equal(client.thread, WORKER ? 'worker' : 'main', `the traffic runs on the ${client.thread} thread`)
  tt.teardown(() => client.close())
  return client
}
async function startAgent (tt: tap.Test, opts?: Parameters<typeof FakeAgent.start>[0]): Promise<FakeAgent> {
  const agent = await FakeAgent.start(opts)
  tt.teardown(() => agent.close())
  return agent
}

async function rejection (p: Promise<unknown>): Promise<Error> {
  try {
    await p
  } catch (err) {
    return err as Error
  }
  throw new Error('expected a rejection')
}

t.test('helpers for blocking queries', async (t) => {
  t.equal(formatWait(300_000), '300s')
  t.equal(formatWait(1500), '1500ms')
  t.equal(clampWait(undefined), 300_000, 'default wait 5 minutes')
  t.equal(clampWait(900_000), 600_000, 'capped at 10 minutes')
  t.equal(clampWait(0.5), 1)
  t.throws(() => clampWait(0), InvalidOptionError)
  t.throws(() => clampWait(Number.NaN), InvalidOptionError)
  t.equal(blockingTimeout(160_000, 5000), 160_000 + 10_000 + 5000, 'wait + wait/16 + margin')
  t.equal(agentStatusOf(null), null)
  t.equal(agentStatusOf(new Error('x')), null)
})

t.test('reads the captured leaf with its headers, sending the token', async (t) => {
  const agent = await startAgent(t)
  agent.handler = () => captured('ca-leaf-api')
  const client = await setup(t, agent, {}, { token: 'secret-token' })
  const res = await client.leaf('api')
  t.same(res.body, capturedJson('ca-leaf-api'))
  t.equal(res.status, 200)
  t.equal(res.index, 18)
  t.equal(res.defaultAclPolicy, 'allow')
  t.equal(res.knownLeader, null, 'the leaf endpoint sends no KnownLeader')
  t.equal(res.contentHash, null)
  const req = agent.requests[0]!
  t.equal(req.method, 'GET')
  t.equal(req.path, '/v1/agent/connect/ca/leaf/api')
  t.equal(req.headers['x-consul-token'], 'secret-token')
  t.equal([...req.query.keys()].length, 0, 'non-blocking: no index, no wait, no ns/partition/dc')

  const rotated = await client.leaf('api', { index: 18, waitMs: 1500 })
  t.equal(agent.requests[1]!.query.get('index'), '18')
  t.equal(agent.requests[1]!.query.get('wait'), '1500ms')
  t.equal(rotated.index, 18)
})

t.test('the captured leaf after rotation, roots before and after, and the match list parse', async (t) => {
  const agent = await startAgent(t)
  const client = await setup(t, agent)
  agent.handler = () => captured('ca-leaf-api-after-rotation', 'ca-leaf-api')
  t.equal((await client.leaf('api')).body.CertPEM.match(/BEGIN CERTIFICATE/g)?.length, 2)

  agent.handler = () => captured('ca-roots')
  const roots = await client.roots({ index: 0 })
  t.same(roots.body, capturedJson('ca-roots'))
  t.equal(roots.index, 9)
  t.equal(roots.knownLeader, true)
  t.notOk(agent.requests.at(-1)!.query.has('index'), 'index 0 makes a non-blocking read')

  agent.handler = () => captured('ca-roots-after-rotation', 'ca-roots')
  const rotated = await client.roots({ index: 9 })
  t.same(rotated.body, capturedJson('ca-roots-after-rotation'))
  t.equal(agent.requests.at(-1)!.query.get('wait'), '300s', 'blocking reads always send an explicit wait')

  agent.handler = () => captured('intentions-match')
  const ixns = await client.intentionsMatch('api')
  t.same(ixns.body, (capturedJson('intentions-match') as { api: unknown }).api)
  t.equal(ixns.index, 16)
  const q = agent.requests.at(-1)!.query
  t.equal(q.get('by'), 'destination')
  t.equal(q.get('name'), 'api')
  t.notOk(q.has('ns') || q.has('partition') || q.has('dc'), 'a CE agent rejects ns/partition even as default')
})

t.test('intentions: null means none; a missing key or a bad intention is an invalid answer', async (t) => {
  const agent = await startAgent(t)
  const client = await setup(t, agent)
  agent.handler = () => json({ api: null }, { 'x-consul-index': '3' })
  t.same((await client.intentionsMatch('api')).body, [])

  agent.handler = () => json({ web: [] })
  const err = await rejection(client.intentionsMatch('api'))
  t.ok(err instanceof AgentInvalidResponseError)
  t.equal(err.message, 'Consul agent answered /v1/connect/intentions/match with an invalid body: no entry for "api" (keys: "web")')

  agent.handler = () => json({ api: [{ SourceNS: 'default', SourceName: 'web', DestinationNS: 'default', DestinationName: 'api', Precedence: '9', Action: 'allow' }] })
  t.match((await rejection(client.intentionsMatch('api'))).message, 'api[0].Precedence: expected an integer, got "9"')
})

t.test('config entries: views, 404 as "not set" with its index, and scoping', async (t) => {
  const agent = await startAgent(t)
  const client = await setup(t, agent)
  agent.handler = () => json({ Kind: 'service-defaults', Name: 'api', Protocol: 'http' }, { 'x-consul-index': '7' })
  const sd = await client.configEntry('service-defaults', 'api', { index: 5, waitMs: 60_000 })
  t.same(sd.body, { kind: 'service-defaults', name: 'api', protocol: 'http' })
  t.equal(agent.requests.at(-1)!.path, '/v1/config/service-defaults/api')
  t.equal(agent.requests.at(-1)!.query.get('wait'), '60s')

  agent.handler = () => json({ Kind: 'proxy-defaults', Name: 'global', Config: { protocol: 'grpc' } })
  t.same((await client.configEntry('proxy-defaults', 'global')).body, { kind: 'proxy-defaults', name: 'global', protocol: 'grpc' })

  agent.handler = () => json({ Kind: 'mesh', HTTP: { Incoming: { RequestNormalization: { MergeSlashes: true, PathWithEscapedSlashesAction: 'REJECT_REQUEST' } } } })
  t.same((await client.configEntry('mesh', 'mesh')).body,
    { kind: 'mesh', requestNormalization: { MergeSlashes: true, PathWithEscapedSlashesAction: 'REJECT_REQUEST' } })

  agent.handler = () => ({ ...text(404, 'Config entry not found for "mesh" / "mesh"'), headers: { 'x-consul-index': '12', 'x-consul-knownleader': 'false' } })
  const missing = await client.configEntry('mesh', 'mesh', { index: 11 })
  t.equal(missing.body, null, 'a missing entry is a valid answer')
  t.equal(missing.status, 404)
  t.equal(missing.index, 12, 'the 404 carries the index to block on')
  t.equal(missing.knownLeader, false)

  agent.handler = () => json({ Kind: 'service-defaults', Name: 'api' })
  t.match((await rejection(client.configEntry('mesh', 'mesh'))).message, 'Kind: expected "mesh", got "service-defaults"')
})

t.test('jwt-provider entries: the list as sent, none from an agent that does not know the kind (docs/semantics.md#jwt-providers)', async (t) => {
  const agent = await startAgent(t)
  const client = await setup(t, agent)
  agent.handler = () => json([{ Kind: 'jwt-provider', Name: 'okta' }], { 'x-consul-index': '4' })
  const list = await client.jwtProviders({ index: 3, waitMs: 60_000 })
  t.same(list.body, [{ Kind: 'jwt-provider', Name: 'okta' }])
  t.equal(list.index, 4)
  t.equal(agent.requests.at(-1)!.path, '/v1/config/jwt-provider')
  agent.handler = () => json(null)
  t.same((await client.jwtProviders()).body, [], 'null is an empty list')
  agent.handler = () => text(500, 'invalid config entry kind: jwt-provider')
  t.equal((await client.jwtProviders()).body, null, 'Consul before 1.16')
  agent.handler = () => json({ Kind: 'jwt-provider' })
  t.match((await rejection(client.jwtProviders())).message, 'expected an array of config entries')
  agent.handler = () => text(403, 'Permission denied')
  t.match((await rejection(client.jwtProviders())).message, 'Permission denied')
})

t.test('dc, ns and partition are sent only when configured, and only where they apply', async (t) => {
  const agent = await startAgent(t)
  const client = await setup(t, agent, { datacenter: 'dc2', namespace: 'team-a', partition: 'part-1' })
  const params = (): Record<string, string> => {
    const q = agent.requests.at(-1)!.query
    return Object.fromEntries(['dc', 'ns', 'partition'].filter((k) => q.has(k)).map((k) => [k, q.get(k)!]))
  }
  agent.handler = () => captured('ca-leaf-api')
  await client.leaf('api')
  t.same(params(), { dc: 'dc2', ns: 'team-a', partition: 'part-1' }, 'leaf')
  agent.handler = () => captured('ca-roots')
  await client.roots()
  t.same(params(), { dc: 'dc2' }, 'roots: no namespace/partition')
  agent.handler = () => captured('intentions-match')
  await client.intentionsMatch('api')
  t.same(params(), { dc: 'dc2', ns: 'team-a', partition: 'part-1' }, 'intentions match')
  agent.handler = () => json({ Kind: 'service-defaults', Name: 'api' })
  await client.configEntry('service-defaults', 'api')
  t.same(params(), { dc: 'dc2', ns: 'team-a', partition: 'part-1' }, 'service-defaults')
  agent.handler = () => json({ Kind: 'proxy-defaults', Name: 'global' })
  await client.configEntry('proxy-defaults', 'global')
  t.same(params(), { dc: 'dc2', partition: 'part-1' }, 'proxy-defaults is not namespaced')
  agent.handler = () => json({ Authorized: true, Reason: 'x' })
  await client.authorize('api', 'spiffe://td/ns/default/dc/dc1/svc/web')
  t.same(params(), { ns: 'team-a', partition: 'part-1' }, 'authorize')
  agent.handler = () => json({})
  await client.request('GET', '/v1/x', { scoped: true })
  t.same(params(), { dc: 'dc2', ns: 'team-a', partition: 'part-1' }, 'scoped: true')
  await client.request('GET', '/v1/x', { scoped: false, query: { a: '1', b: undefined } })
  t.same(params(), {}, 'scoped: false')
  t.same([...agent.requests.at(-1)!.query.keys()], ['a'], 'undefined query values are left out')

  t.throws(() => new AgentClient(resolveAgentConfig(undefined, {}), { namespace: '' }), InvalidOptionError)
  t.throws(() => new AgentClient(resolveAgentConfig(undefined, {}), { datacenter: 3 as unknown as string }), InvalidOptionError)
  t.throws(() => new AgentClient(resolveAgentConfig(undefined, {}), { partition: '' }), InvalidOptionError)
  t.throws(() => new AgentClient(resolveAgentConfig(undefined, {}), { maxBodyBytes: 0 }), /agent.maxBodyBytes: must be a positive integer, got 0/)
  t.throws(() => new AgentClient(resolveAgentConfig(undefined, {}), { connections: 1.5 }), InvalidOptionError)
})

t.test('agent/self and authorize', async (t) => {
  const agent = await startAgent(t)
  const client = await setup(t, agent)
  agent.handler = () => json({
    Config: { Datacenter: 'dc1', Version: '1.20.1' },
    DebugConfig: { DefaultIntentionPolicy: 'deny', ACLsEnabled: true, ACLResolverSettings: { ACLDefaultPolicy: 'allow' } }
  })
  t.same((await client.agentSelf()).body,
    { datacenter: 'dc1', version: '1.20.1', defaultIntentionPolicy: 'deny', aclDefaultPolicy: 'allow', aclsEnabled: true })
  t.equal(await client.datacenter(), 'dc1')
  // Without agent:read, the servers of Consul's own service say; another failure is not looked past.
  agent.handler = (req) => req.path === '/v1/agent/self'
    ? text(403, 'Permission denied: token lacks permission \'agent:read\'')
    : json([{ Node: { Node: 'server-1', Datacenter: 'east' }, Service: { ID: 'consul' }, Checks: [] }])
  t.equal(await client.datacenter(), 'east')
  t.equal(agent.requests.at(-1)?.path, '/v1/health/service/consul')
  agent.handler = () => text(500, 'rpc error: No cluster leader')
  t.match((await rejection(client.datacenter())).message, /500: rpc error: No cluster leader/)

  const bodies = capturedAuthorizeBodies()
  t.equal(bodies.length, 3)
  agent.handler = sequence(...bodies.map((b) => ({ headers: { 'content-type': 'application/json', 'x-cache': 'HIT' }, body: b })))
  const web = await client.authorize('api', 'spiffe://2a146f8e-f8b9-cb9e-7aa9-e941c8535d0d.consul/ns/default/dc/dc1/svc/web')
  t.same(web, { Authorized: false, Reason: 'Matched L7 intention: default/web => default/api (Precedence: 9, Permissions: 3)' })
  const req = agent.requests.at(-1)!
  t.equal(req.method, 'POST')
  t.equal(req.headers['content-type'], 'application/json')
  t.same(JSON.parse(req.body), { Target: 'api', ClientCertURI: 'spiffe://2a146f8e-f8b9-cb9e-7aa9-e941c8535d0d.consul/ns/default/dc/dc1/svc/web' })
  t.equal((await client.authorize('api', 'x')).Authorized, false)
  t.equal((await client.authorize('api', 'x')).Authorized, true)

  agent.handler = () => text(400, 'Bad request: ClientCertURI not a valid Service identifier\n')
  const err = await rejection(client.authorize('api', 'spiffe://td/agent/client/dc/dc1/id/node'))
  t.ok(err instanceof AgentResponseError)
  t.equal(err.message, 'Consul agent answered POST /v1/agent/connect/authorize with 400: Bad request: ClientCertURI not a valid Service identifier')
  t.equal(agentStatusOf(err), 400)
  t.notOk(agent.requests.at(-1)!.headers['x-consul-token'], 'no token header without a token')
})

t.test('error statuses carry Consul\'s text, truncated', async (t) => {
  const agent = await startAgent(t)
  const client = await setup(t, agent)
  for (const [status, body] of [[500, 'CA not initialized'], [429, 'Rate limit reached, try again later'], [403, 'Permission denied: token lacks service:write']] as const) {
    agent.handler = () => text(status, body)
    const err = await rejection(client.leaf('api'))
    t.ok(err instanceof AgentResponseError, `${status} is an AgentResponseError`)
    t.equal(err.message, `Consul agent answered GET /v1/agent/connect/ca/leaf/api with ${status}: ${body}`)
    t.equal(agentStatusOf(err), status)
  }
  agent.handler = () => text(500, 'x'.repeat(2000))
  const long = await rejection(client.roots())
  t.ok(long.message.endsWith(`${'x'.repeat(512)}…`), 'long messages are cut at 512 characters')
  agent.handler = () => ({ status: 502, body: 'y'.repeat(100_000), chunkSize: 4096 })
  t.match((await rejection(client.roots())).message, /with 502: y+…$/, 'a huge error body is read only in part')
  agent.handler = () => ({ status: 503 })
  t.match((await rejection(client.roots())).message, 'with 503: (empty body)')
  agent.handler = () => text(404, 'not found')
  t.equal(agentStatusOf(await rejection(client.request('GET', '/v1/agent/service/web-1'))), 404, '404 throws unless allow404')
})

t.test('invalid bodies: garbage JSON, wrong shapes, oversized', async (t) => {
  const agent = await startAgent(t)
  const client = await setup(t, agent, { maxBodyBytes: 2048 })
  agent.handler = () => ({ headers: { 'content-type': 'application/json' }, body: '{"SerialNumber": ' })
  const garbage = await rejection(client.leaf('api'))
  t.ok(garbage instanceof AgentInvalidResponseError)
  t.match(garbage.message, 'Consul agent answered /v1/agent/connect/ca/leaf/api with an invalid body: not JSON: ')
  t.ok(garbage.cause instanceof SyntaxError)

  agent.handler = () => json({ ...(capturedJson('ca-leaf-api') as object), Service: 'web' })
  t.match((await rejection(client.leaf('api'))).message, 'Service: certificate is for service "web", asked for "api"')

  agent.handler = () => json([1, 2])
  t.match((await rejection(client.roots())).message, 'expected an object, got an array')

  agent.handler = () => json({ Config: {} })
  t.match((await rejection(client.agentSelf())).message, 'Config.Datacenter: expected a string, got nothing')

  agent.handler = () => json({ Authorized: 'yes' })
  t.match((await rejection(client.authorize('api', 'x'))).message, 'Authorized: expected a boolean, got "yes"')

  const big = JSON.stringify({ pad: 'z'.repeat(4000) })
  agent.handler = () => ({ body: big })
  const tooBig = await rejection(client.request('GET', '/v1/agent/self'))
  t.ok(tooBig instanceof AgentInvalidResponseError)
  t.equal(tooBig.message, 'Consul agent answered /v1/agent/self with an invalid body: body exceeds 2048 bytes')
  agent.handler = () => ({ body: big, chunkSize: 512 })
  t.match((await rejection(client.request('GET', '/v1/agent/self'))).message, 'body exceeds 2048 bytes', 'also when streamed without a length')
  agent.handler = () => ({ body: JSON.stringify({ ok: true }) })
  t.same((await client.request('GET', '/v1/agent/self')).body, { ok: true }, 'the connection pool is fine afterwards')
})

t.test('headers: index, known leader, content hash and ACL policy are parsed strictly', async (t) => {
  const agent = await startAgent(t)
  const client = await setup(t, agent)
  const cases: Array<[Record<string, string | string[]>, Partial<Record<'index' | 'knownLeader' | 'contentHash' | 'defaultAclPolicy', unknown>>]> = [
    [{ 'x-consul-index': '0' }, { index: 0 }],
    [{ 'x-consul-index': 'abc' }, { index: null }],
    [{ 'x-consul-index': '-4' }, { index: null }],
    [{ 'x-consul-index': '18446744073709551615' }, { index: null }],
    [{ 'x-consul-index': ['5', '6'] }, { index: 5 }],
    [{ 'x-consul-index': '' }, { index: null }],
    [{ 'x-consul-contenthash': 'a1b2c3', 'x-consul-default-acl-policy': 'deny' }, { contentHash: 'a1b2c3', defaultAclPolicy: 'deny' }],
    [{ 'x-consul-default-acl-policy': 'maybe', 'x-consul-knownleader': 'yes' }, { defaultAclPolicy: null, knownLeader: null }]
  ]
  for (const [headers, want] of cases) {
    agent.handler = () => json({}, headers)
    t.match(await client.request('GET', '/v1/agent/service/web-1'), want, JSON.stringify(headers))
  }
})

t.test('PUT with a JSON body; an empty answer reads as null', async (t) => {
  const agent = await startAgent(t)
  const client = await setup(t, agent)
  agent.handler = () => ({ status: 200 })
  const res = await client.request('PUT', '/v1/agent/service/register', { body: { Name: 'api', Connect: { Native: true } } })
  t.equal(res.body, null)
  t.same(JSON.parse(agent.requests[0]!.body), { Name: 'api', Connect: { Native: true } })
  agent.handler = () => json({ ContentHash: 'h1' }, { 'x-consul-contenthash': 'h1' })
  await client.request('GET', '/v1/agent/service/api-1', { blocking: { hash: 'h0', waitMs: 30_000 } })
  const q = agent.requests.at(-1)!.query
  t.equal(q.get('hash'), 'h0', 'hash-based blocking')
  t.equal(q.get('wait'), '30s')
  t.notOk(q.has('index'))
})

t.test('timeouts: a blocking call waits wait × 17/16 + margin; a stalled body times out too', async (t) => {
  const agent = await startAgent(t)
  const client = await setup(t, agent, { blockingMarginMs: 50, requestTimeoutMs: 150 })
  agent.handler = () => ({ hang: true })
  const started = performance.now()
  const blocked = await rejection(client.roots({ index: 9, waitMs: 160 }))
  t.ok(blocked instanceof AgentUnreachableError)
  t.equal(blocked.message, `Consul agent unreachable at ${agent.origin}: no response within ${160 + 10 + 50} ms`)
  t.equal((blocked.cause as { code?: string }).code, 'UND_ERR_HEADERS_TIMEOUT')
  t.ok(performance.now() - started >= 200, 'it did not give up before wait + jitter + margin')
  t.equal(agent.requests[0]!.query.get('wait'), '160ms')

  t.match((await rejection(client.agentSelf())).message, 'no response within 150 ms', 'non-blocking calls use requestTimeoutMs')
  t.match((await rejection(client.request('GET', '/v1/agent/self', { timeoutMs: 80 }))).message, 'no response within 80 ms')

  agent.handler = () => ({ stallBody: true, headers: { 'content-type': 'application/json' } })
  const stalled = await rejection(client.agentSelf())
  t.ok(stalled instanceof AgentUnreachableError)
  t.equal((stalled.cause as { code?: string }).code, 'UND_ERR_BODY_TIMEOUT')

  // A byte every 50 ms passes undici's timeouts (each a wait between two chunks): the whole
  // exchange is bounded too, by its timeout and a second for the body.
  agent.handler = () => ({ trickleMs: 50, headers: { 'content-type': 'application/json' } })
  const trickleStarted = performance.now()
  const trickled = await rejection(client.agentSelf())
  const took = performance.now() - trickleStarted
  t.ok(trickled instanceof AgentUnreachableError)
  t.equal(trickled.message, `Consul agent unreachable at ${agent.origin}: no response within 150 ms`)
  t.equal((trickled.cause as { message?: string }).message, 'no complete answer within 1150 ms')
  t.ok(took >= 1_100 && took < 3_000, `ended by the bound (${Math.round(took)} ms)`)
  // A blocking poll (with its watch's signal) is bounded alike.
  const polled = await rejection(client.roots({ index: 9, waitMs: 100, signal: new AbortController().signal }))
  t.equal((polled.cause as { message?: string }).message, `no complete answer within ${100 + 7 + 50 + 1_000} ms`)
})

t.test('an empty body answering a read is a broken answer; a write\'s empty body is its answer', async (t) => {
  const agent = await startAgent(t)
  const client = await setup(t, agent)
  agent.handler = () => ({ status: 200, headers: { 'x-consul-index': '5' }, body: '' })
  const err = await rejection(client.request('GET', '/v1/config/jwt-provider'))
  t.equal((err as { code?: string }).code, 'FST_CONSUL_NATIVE_AGENT_INVALID_RESPONSE')
  t.match(err.message, /\/v1\/config\/jwt-provider with an invalid body: empty body$/)
  t.equal((await client.request('PUT', '/v1/agent/service/register', { body: {} })).body, null)
})

t.test('network errors are AgentUnreachableError with the cause; never the token', async (t) => {
  const agent = await startAgent(t)
  const origin = agent.origin
  await agent.close()
  const client = new AgentClient(resolveAgentConfig({ address: origin, token: 'secret-token' }, {}))
  t.teardown(() => client.close())
  const err = await rejection(client.roots())
  t.ok(err instanceof AgentUnreachableError)
  t.match(err.message, `Consul agent unreachable at ${origin}: connect ECONNREFUSED`)
  t.equal((err.cause as NodeJS.ErrnoException).code, 'ECONNREFUSED')
  t.notMatch(err.message, 'secret-token')
})

t.test('the caller\'s abort rejects with its reason, before or during the body', async (t) => {
  const agent = await startAgent(t)
  const client = await setup(t, agent)
  agent.handler = () => ({ hang: true })
  const ac = new AbortController()
  const pending = client.roots({ index: 9, signal: ac.signal })
  const req = await agent.nextRequest()
  ac.abort()
  const err = await rejection(pending)
  t.equal(err.name, 'AbortError')
  await req.aborted

  agent.handler = () => ({ stallBody: true })
  const ac2 = new AbortController()
  const pending2 = client.request('GET', '/v1/agent/self', { signal: ac2.signal })
  await agent.nextRequest()
  setImmediate(() => ac2.abort(new Error('shutting down')))
  t.equal((await rejection(pending2)).message, 'shutting down')
})

t.test('close() ends in-flight long polls at once and is idempotent', async (t) => {
  const agent = await startAgent(t)
  const client = await setup(t, agent)
  agent.handler = () => ({ hang: true })
  const polls = [client.roots({ index: 9 }), client.leaf('api', { index: 18 })]
  await agent.nextRequest()
  if (agent.requests.length < 2) await agent.nextRequest()
  const started = performance.now()
  const settled = Promise.allSettled(polls)
  await Promise.all([client.close(), client.close()])
  for (const r of await settled) {
    const err = (r as PromiseRejectedResult).reason as Error
    t.ok(err instanceof AgentUnreachableError)
    t.match(err.message, ': client closed')
  }
  t.ok(performance.now() - started < 1000, 'prompt')
  t.match((await rejection(client.agentSelf())).message, 'client closed', 'later calls fail clearly')
})

t.test('short calls never queue behind the long polls of every watch', async (t) => {
  const agent = await startAgent(t)
  const client = await setup(t, agent)
  agent.handler = (req) => req.query.has('index') ? { hang: true } : json({ Config: { Datacenter: 'dc1' } })
  const polls = [
    client.leaf('api', { index: 1 }), client.roots({ index: 1 }), client.intentionsMatch('api', { index: 1 }),
    client.configEntry('service-defaults', 'api', { index: 1 }), client.configEntry('proxy-defaults', 'global', { index: 1 }),
    client.configEntry('mesh', 'mesh', { index: 1 }), client.request('GET', '/v1/agent/service/api-1', { blocking: { hash: 'h', waitMs: 60_000 } })
  ]
  for (const p of polls) p.catch(() => {})
  while (agent.requests.length < 6) await agent.nextRequest()
  const self = await client.agentSelf()
  t.equal(self.body.datacenter, 'dc1')
})

t.test('a Unix-socket agent', async (t) => {
  const agent = await startAgent(t, { transport: 'unix' })
  agent.handler = () => captured('ca-roots')
  const client = await setup(t, agent, {}, { token: 'tok' })
  t.equal(client.display, `unix://${agent.socketPath!}`)
  t.equal((await client.roots()).body.TrustDomain, '2a146f8e-f8b9-cb9e-7aa9-e941c8535d0d.consul')
  t.equal(agent.requests[0]!.headers['x-consul-token'], 'tok')
})

t.test('an HTTPS agent: verified with its CA, failing without it, with a client certificate', async (t) => {
  const tls = makeTlsMaterial()
  const agent = await startAgent(t, { transport: 'https', tls, requireClientCert: true })
  agent.handler = () => captured('ca-roots')

  const good = await setup(t, agent, {}, { ca: tls.ca, certFile: tls.files.clientCert, keyFile: tls.files.clientKey })
  t.equal((await good.roots()).index, 9)
  t.ok(good.display.startsWith('https://127.0.0.1:'))

  const noCa = await setup(t, agent, {}, { cert: tls.clientCert, key: tls.clientKey })
  const err = await rejection(noCa.roots())
  t.ok(err instanceof AgentUnreachableError, 'an untrusted agent certificate is unreachable, with the TLS error as cause')
  t.match(err.message, /certificate/)

  const skip = await setup(t, agent, {}, { insecureSkipVerify: true, cert: tls.clientCert, key: tls.clientKey })
  t.equal((await skip.roots()).index, 9, 'insecureSkipVerify accepts it')

  const named = await setup(t, agent, {}, { caFile: tls.files.ca, cert: tls.clientCert, key: tls.clientKey, tlsServerName: 'consul.test' })
  t.equal((await named.roots()).index, 9, 'the server name is verified instead of the IP')

  const noClientCert = await setup(t, agent, {}, { ca: tls.ca })
  t.ok((await rejection(noClientCert.roots())) instanceof AgentUnreachableError, 'an agent that requires a client certificate refuses us without one')
})

// ---- parse.ts: the validators behind each endpoint, on the captured bodies and their mutations ----

function shape (tt: tap.Test, fn: () => unknown, message: string): void {
  try {
    fn()
    tt.fail(`expected a ShapeError: ${message}`)
  } catch (err) {
    tt.ok(err instanceof ShapeError, 'is a ShapeError')
    tt.equal((err as Error).message, message)
  }
}
const leafBody = (): Record<string, unknown> => capturedJson('ca-leaf-api') as Record<string, unknown>
const rootsBody = (): { Roots: Array<Record<string, unknown>> } & Record<string, unknown> =>
  capturedJson('ca-roots-after-rotation') as { Roots: Array<Record<string, unknown>> } & Record<string, unknown>
const l4 = { SourceNS: 'default', SourceName: 'web', DestinationNS: 'default', DestinationName: 'api', Precedence: 9, Action: 'allow' }

t.test('parse: leaf certificates', async (t) => {
  t.same(parseIssuedCert({ ...leafBody(), Namespace: 'default', Partition: 'default' }),
    { ...leafBody(), Namespace: 'default', Partition: 'default' }, 'ENT fields are kept')
  t.same(parseIssuedCert({ ...leafBody(), CreateIndex: undefined, ModifyIndex: null, Extra: 1 }),
    { ...leafBody(), CreateIndex: 0, ModifyIndex: 0 }, 'missing indexes read as 0; unknown fields are dropped')
  shape(t, () => parseIssuedCert({ ...leafBody(), ServiceURI: 'https://x' }), 'ServiceURI: expected a spiffe:// URI, got "https://x"')
  shape(t, () => parseIssuedCert({ ...leafBody(), ValidBefore: 'soon' }), 'ValidBefore: expected an RFC 3339 time, got "soon"')
  shape(t, () => parseIssuedCert({ ...leafBody(), CertPEM: 'x'.repeat(50) }), `CertPEM: expected PEM text (CERTIFICATE), got a string "${'x'.repeat(40)}…"`)
  shape(t, () => parseIssuedCert({ ...leafBody(), PrivateKeyPEM: (leafBody().CertPEM as string) }),
    'PrivateKeyPEM: expected PEM text (PRIVATE KEY), got a string "-----BEGIN CERTIFICATE-----\nMIICPzCCAeSg…"')
  shape(t, () => parseIssuedCert({ ...leafBody(), CreateIndex: 1.5 }), 'CreateIndex: expected an integer, got number 1.5')
  shape(t, () => parseIssuedCert({ ...leafBody(), Namespace: 7 }), 'Namespace: expected a string, got number 7')
  shape(t, () => parseIssuedCert(null), 'expected an object, got null')
})

t.test('parse: CA roots', async (t) => {
  const minimal = parseCARoots({
    ActiveRootID: 'a',
    TrustDomain: 'td.consul',
    Roots: [{ ID: 'a', SigningKeyID: 'k', RootCert: '-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n', Active: true }]
  })
  t.same(minimal.Roots[0], {
    ID: 'a',
    Name: '',
    SerialNumber: 0,
    SigningKeyID: 'k',
    ExternalTrustDomain: '',
    NotBefore: '',
    NotAfter: '',
    RootCert: '-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n',
    IntermediateCerts: null,
    Active: true,
    PrivateKeyType: '',
    PrivateKeyBits: 0,
    CreateIndex: 0,
    ModifyIndex: 0
  }, 'fields the plugin does not use are defaulted')
  shape(t, () => parseCARoots({ ...rootsBody(), Roots: null }), 'Roots: expected a non-empty array of CA roots, got null')
  shape(t, () => parseCARoots({ ...rootsBody(), Roots: [] }), 'Roots: expected a non-empty array of CA roots, got an array')
  shape(t, () => parseCARoots({ ...rootsBody(), ActiveRootID: 'gone' }), 'ActiveRootID: "gone" is not the ID of any root')
  shape(t, () => parseCARoots({ ...rootsBody(), TrustDomain: '' }), 'TrustDomain: expected a non-empty string')
  const r = rootsBody()
  r.Roots[0]!.IntermediateCerts = ['not pem']
  shape(t, () => parseCARoots(r), 'Roots[0].IntermediateCerts[0]: expected PEM text (CERTIFICATE), got "not pem"')
  r.Roots[0]!.IntermediateCerts = 'pem'
  shape(t, () => parseCARoots(r), 'Roots[0].IntermediateCerts: expected an array, got "pem"')
  r.Roots[0]!.IntermediateCerts = null
  r.Roots[0]!.SerialNumber = '7'
  shape(t, () => parseCARoots(r), 'Roots[0].SerialNumber: expected a number, got "7"')
  r.Roots[0]!.SerialNumber = 7
  r.Roots[1]!.Active = 'false'
  shape(t, () => parseCARoots(r), 'Roots[1].Active: expected a boolean, got "false"')
  shape(t, () => parseCARoots({ ...rootsBody(), Roots: [1] }), 'Roots[0]: expected an object, got number 1')
})

t.test('parse: intention match lists and each intention', async (t) => {
  shape(t, () => parseIntentionMatch({}, 'api'), 'no entry for "api" (keys: none)')
  shape(t, () => parseIntentionMatch({ api: {} }, 'api'), 'api: expected an array, got an object')
  const full = {
    ...l4,
    ID: 'legacy-id',
    Description: 'd',
    SourcePartition: 'p',
    SourcePeer: 'peer1',
    SourceSamenessGroup: 'sg',
    DestinationPartition: 'p',
    SourceType: 'consul',
    Meta: { team: 'a' },
    JWT: { Providers: [{ Name: 'okta', VerifyClaims: [{ Path: ['perms', 'role'], Value: 'admin' }, {}] }, { Name: 'auth0' }] },
    CreateIndex: 3,
    ModifyIndex: 4,
    CreatedAt: '2020-01-01T00:00:00Z'
  }
  const { CreatedAt: _dropped, ...kept } = full
  t.same(parseIntention(full), kept, 'every documented field is kept, undocumented ones dropped')
  t.same(parseIntention({ ...l4, JWT: {}, Meta: null, Permissions: null }), { ...l4, SourceType: 'consul', CreateIndex: 0, ModifyIndex: 0, JWT: {} },
    'null optionals read as absent; SourceType defaults to consul')
  const l7 = {
    ...l4,
    Action: undefined,
    Permissions: [
      { Action: 'deny', HTTP: { PathExact: '/admin', Methods: ['GET'], Header: [{ Name: 'x-env', Exact: 'prod', IgnoreCase: true, Invert: false }, { Name: 'x-debug', Present: true }] } },
      { Action: 'allow', HTTP: { PathRegex: '/x', Header: null, Methods: null }, JWT: { Providers: null } },
      { Action: 'allow', HTTP: null },
      { Action: 'allow', HTTP: { PathPrefix: '/' } }
    ]
  }
  const parsed = parseIntention(l7)
  t.same(parsed.Permissions, [
    { Action: 'deny', HTTP: { PathExact: '/admin', Methods: ['GET'], Header: [{ Name: 'x-env', Exact: 'prod', IgnoreCase: true, Invert: false }, { Name: 'x-debug', Present: true }] } },
    { Action: 'allow', HTTP: { PathRegex: '/x' }, JWT: {} },
    { Action: 'allow' },
    { Action: 'allow', HTTP: { PathPrefix: '/' } }
  ])
  t.notOk('Action' in parsed)

  // A criterion a newer Consul might add is refused, never dropped (docs/semantics.md#permission-validation);
  // unset values (Consul omits them, but null, '', false, 0, [] and {} read the same) are accepted.
  const unknown = (perm: Record<string, unknown>): unknown => ({ ...l4, Action: undefined, Permissions: [perm] })
  const unset = { Future: null, Empty: '', Off: false, Zero: 0, None: [], Blank: {} }
  t.same(parseIntention(unknown({ Action: 'allow', ...unset, HTTP: { PathPrefix: '/', ...unset, Header: [{ Name: 'x', Present: true, ...unset }] } })).Permissions,
    [{ Action: 'allow', HTTP: { PathPrefix: '/', Header: [{ Name: 'x', Present: true }] } }])
  shape(t, () => parseIntention(unknown({ Action: 'allow', Future: { Query: 'x' } })), 'Permissions[0].Future: is not a criterion this plugin can evaluate; refusing the update rather than ignoring it')
  shape(t, () => parseIntention(unknown({ Action: 'allow', HTTP: { PathPrefix: '/', QueryParam: [{ Name: 'q' }] } })), 'Permissions[0].HTTP.QueryParam: is not a criterion this plugin can evaluate; refusing the update rather than ignoring it')
  shape(t, () => parseIntention(unknown({ Action: 'allow', HTTP: { Header: [{ Name: 'x', Exact: 'a', Trim: true }] } })), 'Permissions[0].HTTP.Header[0].Trim: is not a criterion this plugin can evaluate; refusing the update rather than ignoring it')

  shape(t, () => parseIntention({ ...l4, Action: undefined }), 'has neither Action nor Permissions')
  shape(t, () => parseIntention({ ...l4, Action: undefined, Permissions: [] }, 'api[2]'), 'api[2]: has neither Action nor Permissions')
  shape(t, () => parseIntention({ ...l4, Permissions: l7.Permissions }), 'has both Action and Permissions')
  t.same(parseIntention({ ...l4, Permissions: [] }).Action, 'allow', 'an empty Permissions list beside Action is an L4 intention')
  shape(t, () => parseIntention({ ...l4, Action: 'ALLOW' }), 'Action: expected "allow" or "deny", got "ALLOW"')
  shape(t, () => parseIntention({ ...l4, SourceName: '' }), 'SourceName: expected a non-empty string')
  shape(t, () => parseIntention({ ...l4, Precedence: 9.5 }), 'Precedence: expected an integer, got number 9.5')
  shape(t, () => parseIntention({ ...l4, SourcePeer: true }), 'SourcePeer: expected a string, got boolean true')
  shape(t, () => parseIntention({ ...l4, Meta: { a: 1 } }), 'Meta.a: expected a string, got number 1')
  shape(t, () => parseIntention({ ...l4, Meta: [] }), 'Meta: expected an object, got an array')
  const perm = (p: unknown): unknown => ({ ...l4, Action: undefined, Permissions: [p] })
  shape(t, () => parseIntention(perm({ HTTP: { PathPrefix: '/' } })), 'Permissions[0].Action: expected "allow" or "deny", got nothing')
  shape(t, () => parseIntention(perm({ Action: 'allow', HTTP: { Methods: ['GET', 5] } })), 'Permissions[0].HTTP.Methods[1]: expected a string, got number 5')
  shape(t, () => parseIntention(perm({ Action: 'allow', HTTP: { Header: [{ Exact: 'x' }] } })), 'Permissions[0].HTTP.Header[0].Name: expected a string, got nothing')
  shape(t, () => parseIntention(perm({ Action: 'allow', HTTP: { Header: [{ Name: 'x', Present: 'yes' }] } })), 'Permissions[0].HTTP.Header[0].Present: expected a boolean, got "yes"')
  shape(t, () => parseIntention(perm({ Action: 'allow', HTTP: { Header: [{ Name: 'x', Regex: ['a'] }] } })), 'Permissions[0].HTTP.Header[0].Regex: expected a string, got an array')
  shape(t, () => parseIntention(perm({ Action: 'allow', HTTP: { PathExact: 1 } })), 'Permissions[0].HTTP.PathExact: expected a string, got number 1')
  shape(t, () => parseIntention(perm({ Action: 'allow', HTTP: 'GET /' })), 'Permissions[0].HTTP: expected an object, got "GET /"')
  shape(t, () => parseIntention({ ...l4, JWT: { Providers: [{ Name: 'okta', VerifyClaims: [{ Path: 'role' }] }] } }),
    'JWT.Providers[0].VerifyClaims[0].Path: expected an array, got "role"')
  shape(t, () => parseIntention({ ...l4, JWT: { Providers: [{}] } }), 'JWT.Providers[0].Name: expected a string, got nothing')
  shape(t, () => parseIntention({ ...l4, JWT: { Providers: [{ Name: 'a', VerifyClaims: [{ Value: 2 }] }] } }, 'api[0]'),
    'api[0].JWT.Providers[0].VerifyClaims[0].Value: expected a string, got number 2')
  shape(t, () => parseIntention({ ...l4, JWT: 'required' }), 'JWT: expected an object, got "required"')
  shape(t, () => parseIntention({ ...l4, DestinationName: undefined }), 'DestinationName: expected a string, got nothing')
})

t.test('parse: config entries', async (t) => {
  t.same(parseConfigEntry('service-defaults', { Name: 'api', Protocol: '' }), { kind: 'service-defaults', name: 'api', protocol: null })
  t.same(parseConfigEntry('service-defaults', { Kind: 'service-defaults', Name: 'api' }), { kind: 'service-defaults', name: 'api', protocol: null })
  t.same(parseConfigEntry('proxy-defaults', { Kind: 'proxy-defaults', Name: 'global', Config: null }), { kind: 'proxy-defaults', name: 'global', protocol: null })
  t.same(parseConfigEntry('proxy-defaults', { Kind: 'proxy-defaults', Name: 'global', Config: { local_connect_timeout_ms: 1000 } }).protocol, null)
  shape(t, () => parseConfigEntry('proxy-defaults', { Name: 'global', Config: { protocol: 1 } }), 'Config.protocol: expected a string, got number 1')
  shape(t, () => parseConfigEntry('proxy-defaults', { Name: 'global', Config: [] }), 'Config: expected an object, got an array')
  shape(t, () => parseConfigEntry('service-defaults', { Name: 'api', Protocol: false }), 'Protocol: expected a string, got boolean false')

  t.same(parseConfigEntry('mesh', { Kind: 'mesh', TransparentProxy: { MeshDestinationsOnly: false } }), { kind: 'mesh', requestNormalization: null },
    'Consul 1.10 mesh entries have neither Name nor HTTP')
  t.same(parseConfigEntry('mesh', { Kind: 'mesh', HTTP: { SanitizeXForwardedClientCert: true } }).requestNormalization, null)
  t.same(parseConfigEntry('mesh', { Kind: 'mesh', HTTP: { Incoming: {} } }).requestNormalization, null)
  t.same(parseConfigEntry('mesh', { Kind: 'mesh', HTTP: { Incoming: { RequestNormalization: {} } } }).requestNormalization, {})
  t.same(parseConfigEntry('mesh', {
    HTTP: { Incoming: { RequestNormalization: { InsecureDisablePathNormalization: false, MergeSlashes: true, PathWithEscapedSlashesAction: '', HeadersWithUnderscoresAction: 'DROP_HEADER' } } }
  }).requestNormalization, { InsecureDisablePathNormalization: false, MergeSlashes: true, PathWithEscapedSlashesAction: '', HeadersWithUnderscoresAction: 'DROP_HEADER' })
  shape(t, () => parseConfigEntry('mesh', { HTTP: { Incoming: { RequestNormalization: { PathWithEscapedSlashesAction: 'DECODE' } } } }),
    'HTTP.Incoming.RequestNormalization.PathWithEscapedSlashesAction: expected one of IMPLEMENTATION_SPECIFIC_DEFAULT, KEEP_UNCHANGED, REJECT_REQUEST, UNESCAPE_AND_REDIRECT, UNESCAPE_AND_FORWARD, got "DECODE"')
  shape(t, () => parseConfigEntry('mesh', { HTTP: { Incoming: { RequestNormalization: { MergeSlashes: 'true' } } } }),
    'HTTP.Incoming.RequestNormalization.MergeSlashes: expected a boolean, got "true"')
  shape(t, () => parseConfigEntry('mesh', { HTTP: { Incoming: 'x' } }), 'HTTP.Incoming: expected an object, got "x"')
  shape(t, () => parseConfigEntry('mesh', { HTTP: 1 }), 'HTTP: expected an object, got number 1')
  shape(t, () => parseConfigEntry('mesh', { HTTP: { Incoming: { RequestNormalization: [] } } }), 'HTTP.Incoming.RequestNormalization: expected an object, got an array')
})

t.test('parse: agent/self across versions', async (t) => {
  t.same(parseAgentSelf({ Config: { Datacenter: 'dc1' } }),
    { datacenter: 'dc1', version: null, defaultIntentionPolicy: null, aclDefaultPolicy: null, aclsEnabled: null }, 'an agent that hides DebugConfig')
  t.same(parseAgentSelf({ Config: { Datacenter: 'dc1', Version: '1.10.12' }, DebugConfig: { ACLDefaultPolicy: 'deny', ACLsEnabled: false } }),
    { datacenter: 'dc1', version: '1.10.12', defaultIntentionPolicy: null, aclDefaultPolicy: 'deny', aclsEnabled: false }, 'pre-1.11 layout')
  t.same(parseAgentSelf({ Config: { Datacenter: 'dc1' }, DebugConfig: { DefaultIntentionPolicy: '', ACLResolverSettings: null } }).defaultIntentionPolicy, null,
    'an empty DefaultIntentionPolicy means unset')
  t.same(parseAgentSelf({ Config: { Datacenter: 'dc1' }, DebugConfig: { ACLResolverSettings: {}, ACLDefaultPolicy: 'allow' } }).aclDefaultPolicy, 'allow')
  shape(t, () => parseAgentSelf({ Config: { Datacenter: 'dc1' }, DebugConfig: { DefaultIntentionPolicy: 'Deny' } }),
    'DebugConfig.DefaultIntentionPolicy: expected one of allow, deny, got "Deny"')
  shape(t, () => parseAgentSelf({ Config: { Datacenter: 'dc1' }, DebugConfig: { ACLResolverSettings: 'x' } }), 'DebugConfig.ACLResolverSettings: expected an object, got "x"')
  shape(t, () => parseAgentSelf({ Config: { Datacenter: 'dc1' }, DebugConfig: 3 }), 'DebugConfig: expected an object, got number 3')
  shape(t, () => parseAgentSelf({}), 'Config: expected an object, got nothing')
  shape(t, () => parseAgentSelf({ Config: { Datacenter: 'dc1' }, DebugConfig: { ACLsEnabled: 'true' } }), 'DebugConfig.ACLsEnabled: expected a boolean, got "true"')
})

t.test('parse: authorize', async (t) => {
  t.same(parseAuthorize({ Authorized: true }), { Authorized: true, Reason: '' })
  shape(t, () => parseAuthorize({ Authorized: true, Reason: 1 }), 'Reason: expected a string, got number 1')
  t.equal(new ShapeError('', 'x').at, '')
})
