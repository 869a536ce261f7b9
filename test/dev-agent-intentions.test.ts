// The dev agent's intention endpoints (docs/semantics.md#rollout-dev-agent-intentions): list, legacy
// create, exact get/put/delete and check, each written through the service-intentions entry.
import t from 'tap'
import type { Test } from 'tap'
import { request } from 'undici'
import { startDevAgent } from '../lib/dev-agent/index'
import type { DevAgent, DevAgentOptions } from '../lib/dev-agent/index'
import { parseIntentionName } from '../lib/dev-agent/intentions'

interface Res { status: number, text: string, json: any, headers: Record<string, string | string[] | undefined> }

async function call (agent: DevAgent, method: string, path: string, body?: unknown, token?: string): Promise<Res> {
  const res = await request(`${agent.address}${path}`, {
    method: method as 'GET',
    body: typeof body === 'string' ? body : body === undefined ? undefined : JSON.stringify(body),
    headers: token === undefined ? {} : { 'x-consul-token': token }
  })
  const text = await res.body.text()
  let json: unknown
  try { json = JSON.parse(text) } catch {}
  return { status: res.statusCode, text, json, headers: res.headers }
}

async function agentFor (t: Test, options: DevAgentOptions = {}): Promise<DevAgent> {
  const agent = await startDevAgent(options)
  t.teardown(async () => await agent.close())
  return agent
}

const exact = (source: string, destination: string): string =>
  `/v1/connect/intentions/exact?source=${encodeURIComponent(source)}&destination=${encodeURIComponent(destination)}`

t.test('list and legacy create', async (t) => {
  const agent = await agentFor(t)
  const empty = await call(agent, 'GET', '/v1/connect/intentions')
  t.equal(empty.status, 200)
  t.same(empty.json, [], 'an empty list, not null')
  t.ok(empty.headers['x-consul-index'], 'query meta headers')

  const created = await call(agent, 'POST', '/v1/connect/intentions', { SourceName: 'web', DestinationName: 'api', Action: 'allow' })
  t.equal(created.status, 200)
  t.match(created.json, { ID: /^[0-9a-f-]{36}$/ })
  const second = await call(agent, 'POST', '/v1/connect/intentions', { SourceName: '*', DestinationName: 'api', Action: 'deny', Description: 'rest' })
  t.equal(second.status, 200)

  const list = await call(agent, 'GET', '/v1/connect/intentions')
  t.same(list.json.map((i: any) => [i.ID, i.SourceName, i.Action, i.Precedence]),
    [[created.json.ID, 'web', 'allow', 9], [second.json.ID, '*', 'deny', 8]], 'precedence order, legacy IDs kept')
  t.equal(Object.keys(list.json[0])[0], 'ID', 'ID first, as Go marshals it')
  t.equal(list.json[1].Description, 'rest')
  // The intention is a source of the config entry.
  const entry = await call(agent, 'GET', '/v1/config/service-intentions/api')
  t.same(entry.json.Sources.map((s: any) => s.Name), ['web', '*'])

  const rows: Array<[string, unknown, number, string]> = [
    ['duplicate', { SourceName: 'web', DestinationName: 'api', Action: 'deny' }, 500, 'Sources[1] defines "web" more than once'],
    ['ID given', { ID: 'x', SourceName: 'db', DestinationName: 'api', Action: 'deny' }, 500, 'ID must be empty when creating a new intention'],
    ['no source', { DestinationName: 'api', Action: 'deny' }, 500, 'SourceName must be set'],
    ['no destination', { SourceName: 'db', Action: 'deny' }, 500, 'DestinationName must be set'],
    ['bad action', { SourceName: 'db', DestinationName: 'api', Action: 'maybe' }, 500, 'Sources[1].Action must be set to \'allow\' or \'deny\''],
    ['meta', { SourceName: 'db', DestinationName: 'api', Action: 'deny', Meta: { a: 'b' } }, 500, 'Meta on a legacy intention is not supported'],
    ['namespace', { SourceName: 'db', SourceNS: 'team', DestinationName: 'api', Action: 'deny' }, 400, 'Namespaces and partitions are a Consul Enterprise feature'],
    ['array body', [], 500, 'Failed to decode request body: json: cannot unmarshal array into Go value of type structs.Intention'],
    ['null body', null, 500, 'cannot unmarshal null'],
    ['number body', 5, 500, 'cannot unmarshal number into Go value'],
    ['source type', { SourceName: 'db', DestinationName: 'api', Action: 'deny', SourceType: 'ip' }, 500, 'Sources[1].Type must be set to \'consul\''],
    ['number field', { SourceName: 1 }, 500, 'cannot unmarshal number into Go struct field Intention.SourceName of type string'],
    ['bad meta', { SourceName: 'db', DestinationName: 'api', Meta: { a: 1 } }, 500, 'Intention.Meta'],
    ['not JSON', '{', 500, 'Failed to decode request body: unexpected EOF']
  ]
  for (const [name, body, status, text] of rows) {
    const res = await call(agent, 'POST', '/v1/connect/intentions', body)
    t.equal(res.status, status, name)
    t.match(res.text, text, name)
  }
  t.equal((await call(agent, 'DELETE', '/v1/connect/intentions')).status, 405)
  const peered = await call(agent, 'POST', '/v1/connect/intentions', { SourceName: 'web', SourcePeer: 'p1', SourceType: 'consul', DestinationName: 'api', Action: 'deny' })
  const peerIxn = (await call(agent, 'GET', exact('peer:p1/web', 'api'))).json
  t.match(peerIxn, { ID: peered.json.ID, SourcePeer: 'p1', SourceName: 'web' }, 'a peer source keeps its own ID')
  t.equal((await call(agent, 'GET', exact('web', 'api'))).json.ID, created.json.ID)

  // A config-entry write replaces the sources: they lose their legacy IDs, as in Consul.
  t.equal((await call(agent, 'PUT', '/v1/config', { Kind: 'service-intentions', Name: 'api', Sources: [{ Name: 'web', Action: 'allow' }] })).text, 'true')
  t.notOk('ID' in (await call(agent, 'GET', exact('web', 'api'))).json)
  await call(agent, 'POST', '/v1/connect/intentions', { SourceName: 'cron', DestinationName: 'api', Action: 'deny' })
  t.ok((await call(agent, 'GET', exact('cron', 'api'))).json.ID)
  t.equal((await call(agent, 'PUT', '/v1/config', { kind: 'service-intentions', name: 'api', sources: [{ name: 'cron', action: 'deny' }] })).text, 'true')
  t.notOk('ID' in (await call(agent, 'GET', exact('cron', 'api'))).json, 'also when the keys are spelled in lower case')
  await call(agent, 'POST', '/v1/connect/intentions', { SourceName: 'db', DestinationName: 'api', Action: 'deny' })
  t.ok((await call(agent, 'GET', exact('db', 'api'))).json.ID)
  t.equal((await call(agent, 'DELETE', '/v1/config/service-intentions/api')).status, 200)
  await call(agent, 'POST', '/v1/connect/intentions', { SourceName: 'db', DestinationName: 'api', Action: 'deny' })
  const recreated = (await call(agent, 'GET', exact('db', 'api'))).json
  t.ok(recreated.ID)
  await call(agent, 'DELETE', '/v1/config/service-intentions/api?cas=1')
  t.equal((await call(agent, 'GET', exact('db', 'api'))).json.ID, recreated.ID, 'a failed CAS delete keeps the entry and its IDs')
})

t.test('exact: get, put, delete', async (t) => {
  const agent = await agentFor(t)
  t.equal((await call(agent, 'PUT', '/v1/config', { Kind: 'service-defaults', Name: 'api', Protocol: 'http' })).text, 'true')
  const missing = await call(agent, 'GET', exact('web', 'api'))
  t.equal(missing.status, 404)
  t.equal(missing.text, 'Intention not found')

  const l7 = { Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/v1', Methods: ['get'] } }] }
  const put = await call(agent, 'PUT', exact('web', 'api'), l7)
  t.equal(put.status, 200)
  t.equal(put.text, 'true')
  const got = await call(agent, 'GET', exact('web', 'api'))
  t.equal(got.status, 200)
  t.match(got.json, { SourceName: 'web', DestinationName: 'api', SourceType: 'consul', Precedence: 9 })
  t.same(got.json.Permissions, [{ Action: 'allow', HTTP: { PathPrefix: '/v1', Methods: ['GET'] } }], 'normalized as a config write')
  t.notOk('ID' in got.json, 'no legacy ID for a config-entry intention')
  t.notOk('Action' in got.json)

  // Replace in place: the names come from the query, never from the body.
  t.equal((await call(agent, 'PUT', exact('web', 'api'), { SourceName: 'evil', DestinationName: 'other', Action: 'deny', Description: 'd' })).text, 'true')
  const replaced = (await call(agent, 'GET', exact('web', 'api'))).json
  t.match(replaced, { SourceName: 'web', Action: 'deny', Description: 'd' })
  t.equal((await call(agent, 'GET', exact('evil', 'other'))).status, 404)
  t.equal((await call(agent, 'PUT', exact('ns/db', 'default/default/api'), { Action: 'allow' })).text, 'true', 'CE: namespace and partition accepted')
  t.same((await call(agent, 'GET', '/v1/connect/intentions')).json.map((i: any) => i.SourceName).sort(), ['db', 'web'])

  const rows: Array<[string, string, unknown, number, string]> = [
    ['bad JSON', exact('web', 'api'), '{', 400, 'Request decode failed: unexpected EOF'],
    ['array body', exact('web', 'api'), [], 400, 'Request decode failed: json: cannot unmarshal array into Go value of type structs.Intention'],
    ['meta without entry', exact('web', 'billing'), { Action: 'allow', Meta: { a: 'b' } }, 500, 'Meta must not be specified'],
    ['meta changed', exact('web', 'api'), { Action: 'allow', Meta: { a: 'b' } }, 500, 'Meta must not be specified, or should be unchanged during an update.'],
    ['no source', '/v1/connect/intentions/exact?destination=api', { Action: 'allow' }, 500, 'required query parameter \'source\' not set'],
    ['empty destination', '/v1/connect/intentions/exact?source=web&destination=', { Action: 'allow' }, 500, 'required query parameter \'destination\' not set'],
    ['peer source', exact('peer:p1/web', 'api'), { Action: 'allow' }, 500, 'source "peer:p1/web" is invalid: cannot specify a peer here'],
    ['too many slashes', exact('a/b/c/d', 'api'), { Action: 'allow' }, 500, 'source "a/b/c/d" is invalid: input can contain at most two \'/\''],
    ['bad action', exact('web', 'api'), { Action: 'sometimes' }, 500, 'Sources[0].Action must be set to \'allow\' or \'deny\'']
  ]
  for (const [name, path, body, status, text] of rows) {
    const res = await call(agent, 'PUT', path, body)
    t.equal(res.status, status, name)
    t.match(res.text, text, name)
  }
  t.equal((await call(agent, 'GET', exact('peer:p1', 'api'))).text, 'source "peer:p1" is invalid: need to specify the service name as well')
  t.equal((await call(agent, 'GET', exact('peer:p1/web', 'api'))).status, 404, 'a peer source may be read')

  // Meta on the entry: an unchanged copy may be sent back.
  t.equal((await call(agent, 'PUT', '/v1/config', { Kind: 'service-intentions', Name: 'meta', Meta: { team: 'a' }, Sources: [{ Name: 'web', Action: 'allow' }] })).text, 'true')
  t.equal((await call(agent, 'PUT', exact('db', 'meta'), { Action: 'deny', Meta: { team: 'a' } })).text, 'true')
  t.same((await call(agent, 'GET', '/v1/config/service-intentions/meta')).json.Meta, { team: 'a' }, 'entry meta kept')
  // Consul refuses an entry naming a provider it lacks, so the provider comes first.
  const jwks = Buffer.from('{"keys":[]}').toString('base64')
  t.equal((await call(agent, 'PUT', '/v1/config', { Kind: 'jwt-provider', Name: 'okta', Issuer: 'https://okta', JSONWebKeySet: { Local: { JWKS: jwks } } })).text, 'true')
  t.equal((await call(agent, 'PUT', '/v1/config', { Kind: 'service-intentions', Name: 'jwt', JWT: { Providers: [{ Name: 'okta' }] }, Sources: [{ Name: 'web', Action: 'allow' }] })).text, 'true')
  t.equal((await call(agent, 'PUT', exact('db', 'jwt'), { Action: 'deny' })).text, 'true')
  t.same((await call(agent, 'GET', '/v1/config/service-intentions/jwt')).json.JWT, { Providers: [{ Name: 'okta' }] }, 'entry JWT kept')

  t.equal((await call(agent, 'DELETE', exact('web', 'api'))).text, 'true')
  t.equal((await call(agent, 'GET', exact('web', 'api'))).status, 404)
  t.equal((await call(agent, 'DELETE', exact('web', 'api'))).text, 'true', 'idempotent')
  t.equal((await call(agent, 'DELETE', exact('web', 'nothing'))).text, 'true', 'no entry at all')
  t.equal((await call(agent, 'DELETE', exact('db', 'api'))).text, 'true')
  t.equal((await call(agent, 'GET', '/v1/config/service-intentions/api')).status, 404, 'the last source deleted deletes the entry')
})

t.test('check', async (t) => {
  const agent = await agentFor(t)
  await call(agent, 'PUT', '/v1/config', { Kind: 'service-defaults', Name: 'api', Protocol: 'http' })
  await call(agent, 'PUT', '/v1/config', {
    Kind: 'service-intentions',
    Name: 'api',
    Sources: [{ Name: 'web', Action: 'allow' }, { Name: 'admin', Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/' } }] }, { Name: '*', Action: 'deny' }]
  })
  const check = async (query: string): Promise<Res> => await call(agent, 'GET', `/v1/connect/intentions/check?${query}`)
  t.same((await check('source=web&destination=api')).json, { Allowed: true })
  t.same((await check('source=db&destination=api')).json, { Allowed: false }, 'the wildcard deny')
  t.same((await check('source=admin&destination=api')).json, { Allowed: false }, 'L7 counts as deny')
  t.same((await check('source=web&destination=billing')).json, { Allowed: true }, 'no match: ACLs disabled allow')
  t.same((await check('source=default/web&destination=default/api')).json, { Allowed: true })
  const errors: Array<[string, string]> = [
    ['destination=api', 'required query parameter \'source\' not set'],
    ['source=web', 'required query parameter \'destination\' not set'],
    ['source=web&source=db&destination=api', 'required query parameter \'source\' not set'],
    ['source=a/b/c/d&destination=api', 'source "a/b/c/d" is invalid: input can contain at most two \'/\''],
    ['source=web&destination=peer:x/api', 'destination "peer:x/api" is invalid: cannot specify a peer here'],
    ['source=web&destination=api&source-type=ip', 'unsupported SourceType: "ip"']
  ]
  for (const [query, text] of errors) {
    const res = await check(query)
    t.equal(res.status, 500, query)
    t.equal(res.text, text, query)
  }

  const strict = await agentFor(t, { defaultPolicy: 'deny' })
  t.same((await call(strict, 'GET', '/v1/connect/intentions/check?source=web&destination=api')).json, { Allowed: false }, 'default intention policy')
})

t.test('ACLs', async (t) => {
  const agent = await agentFor(t, { acl: { enabled: true, defaultPolicy: 'deny', tokens: { r: 'read', w: 'write' } } })
  t.equal((await call(agent, 'PUT', exact('web', 'api'), { Action: 'allow' }, 'r')).status, 403)
  t.equal((await call(agent, 'PUT', exact('web', 'api'), { Action: 'allow' }, 'w')).text, 'true')
  t.equal((await call(agent, 'POST', '/v1/connect/intentions', { SourceName: 'db', DestinationName: 'api', Action: 'deny' }, 'r')).status, 403)
  t.equal((await call(agent, 'DELETE', exact('web', 'api'), undefined, 'r')).status, 403)
  t.equal((await call(agent, 'GET', '/v1/connect/intentions')).status, 403, 'anonymous under default deny')
  t.equal((await call(agent, 'GET', '/v1/connect/intentions', undefined, 'r')).json.length, 1)
  t.equal((await call(agent, 'GET', exact('web', 'api'), undefined, 'r')).status, 200)
  t.same((await call(agent, 'GET', '/v1/connect/intentions/check?source=db&destination=api', undefined, 'r')).json, { Allowed: false },
    'no match, ACLs on: the token\'s default (deny)')
})

t.test('blocking list', async (t) => {
  const agent = await agentFor(t)
  const first = await call(agent, 'GET', '/v1/connect/intentions')
  const index = Number(first.headers['x-consul-index'])
  const waiting = call(agent, 'GET', `/v1/connect/intentions?index=${index}&wait=10s`)
  await call(agent, 'PUT', exact('web', 'api'), { Action: 'allow' })
  const after = await waiting
  t.ok(Number(after.headers['x-consul-index']) > index)
  t.equal(after.json.length, 1)
})

t.test('parseIntentionName', async (t) => {
  t.same(parseIntentionName('web', false), { peer: '', name: 'web' })
  t.same(parseIntentionName('ap/ns/web', false), { peer: '', name: 'web' })
  t.same(parseIntentionName('peer:p/ns/web', true), { peer: 'p', name: 'web' })
  t.throws(() => parseIntentionName('peer:p/web', false), /cannot specify a peer here/)
})
