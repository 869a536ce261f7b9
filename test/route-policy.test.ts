// Route-level config compiles once, in any of the key spellings users write, or fails naming the route.
import t from 'tap'
import { compileRoutePolicy, EXEMPT_POLICY, SERVICE_POLICY } from '../lib/route-policy'
import { decideOverride } from '../lib/intentions/policy'
import type { CompiledOverride } from '../lib/intentions/policy'

const caller = (service: string): { partition: string, namespace: string, service: string } => ({ partition: 'default', namespace: 'default', service })
const request = (method: string, path: string, rawHeaders: string[] = []): { method: string, path: string, url: string, rawHeaders: string[] } => ({ method, path, url: path, rawHeaders })

t.test('undefined means the service intentions, false exempts', async (t) => {
  t.equal(compileRoutePolicy(undefined, 'GET /'), SERVICE_POLICY)
  t.equal(compileRoutePolicy(false, 'GET /'), EXEMPT_POLICY)
})

t.test('permissions may be written in JavaScript, Consul JSON or HCL spelling', async (t) => {
  const spellings = [
    { action: 'allow', http: { pathPrefix: '/a', methods: ['GET'], header: [{ name: 'x-env', exact: 'prod', ignoreCase: true }] } },
    { Action: 'allow', HTTP: { PathPrefix: '/a', Methods: ['GET'], Header: [{ Name: 'x-env', Exact: 'prod', IgnoreCase: true }] } },
    { action: 'allow', http: { path_prefix: '/a', methods: ['GET'], header: [{ name: 'x-env', exact: 'prod', ignore_case: true }] } }
  ]
  for (const permission of spellings) {
    const policy = compileRoutePolicy({ sources: [{ name: 'web', permissions: [permission] }, { name: 'billing', action: 'deny' }] }, 'GET /a')
    const override = policy.override as CompiledOverride
    t.equal(decideOverride(override, caller('web'), request('GET', '/a/b', ['X-Env', 'PROD']))?.allow, true, JSON.stringify(permission))
    t.equal(decideOverride(override, caller('web'), request('POST', '/a/b', ['X-Env', 'PROD']))?.allow, false)
    t.equal(decideOverride(override, caller('billing'), request('GET', '/a/b'))?.allow, false, 'L4 source')
    t.equal(decideOverride(override, caller('ops'), request('GET', '/a/b')), null, 'no source matches ops')
  }
})

t.test('jwt blocks, on a source and on a permission, in any spelling (docs/semantics.md#jwt-match)', async (t) => {
  const spellings = [
    { providers: [{ name: 'okta', verifyClaims: [{ path: ['role'], value: 'admin' }] }] },
    { Providers: [{ Name: 'okta', VerifyClaims: [{ Path: ['role'], Value: 'admin' }] }] },
    { providers: [{ name: 'okta', verify_claims: [{ path: ['role'], value: 'admin' }] }] }
  ]
  const admin = { payload: (name: string) => (name === 'okta' ? { role: 'admin' } : null) }
  for (const jwt of spellings) {
    const policy = compileRoutePolicy({ sources: [{ name: 'web', action: 'allow', jwt }, { name: 'ops', permissions: [{ action: 'allow', http: { pathPrefix: '/' }, jwt }] }] }, 'GET /a')
    const override = policy.override as CompiledOverride
    t.same(override.jwtProviders, ['okta'], JSON.stringify(jwt))
    for (const who of ['web', 'ops']) {
      t.equal(decideOverride(override, caller(who), { ...request('GET', '/a'), jwt: admin })?.allow, true, `${who} with the token`)
      t.equal(decideOverride(override, caller(who), request('GET', '/a'))?.reason.endsWith('JWT requirement not met (deny)'), true, `${who} without`)
    }
  }
})

t.test('invalid values fail with FST_CONSUL_NATIVE_INVALID_ROUTE_CONFIG naming the route', async (t) => {
  const cases: Array<[unknown, RegExp]> = [
    [true, /expected false or \{ sources/],
    [null, /got null/],
    [['web'], /got an array/],
    ['web', /got string "web"/],
    [{}, /with at least one of them/],
    [{ enforcement: 'dry-run' }, /enforcement must be 'enforce' or 'shadow', got string "dry-run"/],
    [{ sources: 'web', enforcement: 'shadow' }, /sources must be a non-empty array/],
    [{ sources: [] }, /non-empty/],
    [{ sources: [{ name: 'web', action: 'allow' }], extra: true }, /unknown key "extra" \(known: sources, enforcement\)/],
    [{ sources: [{ name: 'web', action: 'maybe' }] }, /action/],
    [{ sources: [{ name: 'web', permissions: [{ action: 'allow', Action: 'deny', http: { pathPrefix: '/' } }] }] }, /repeats Action/],
    [{ sources: [{ name: 'web', permissions: [{ action: 'allow', http: { pathRegex: '(' } }] }] }, /Regex|regex/],
    [{ sources: [null] }, /sources\[0\]/],
    [{ sources: [{ name: 'web', permissions: [{ action: 'allow', http: { pathFoo: '/' } }] }] }, /pathFoo/]
  ]
  for (const [value, message] of cases) {
    t.throws(() => compileRoutePolicy(value, 'GET /x'), { code: 'FST_CONSUL_NATIVE_INVALID_ROUTE_CONFIG', message: /GET \/x/ }, JSON.stringify(value))
    t.throws(() => compileRoutePolicy(value, 'GET /x'), { message }, JSON.stringify(value))
  }
})

t.test('a route\'s enforcement, alone or with sources (docs/semantics.md#rollout-shadow)', async (t) => {
  t.same(compileRoutePolicy({ enforcement: 'shadow' }, 'GET /a'), { exempt: false, override: null, enforcement: 'shadow' })
  t.same(compileRoutePolicy({ enforcement: 'enforce' }, 'GET /a').enforcement, 'enforce')
  const both = compileRoutePolicy({ enforcement: 'shadow', sources: [{ name: 'web', action: 'allow' }] }, 'GET /a')
  t.equal(both.enforcement, 'shadow')
  t.equal(decideOverride(both.override as CompiledOverride, caller('web'), request('GET', '/a'))?.allow, true)
  t.equal(compileRoutePolicy({ sources: [{ name: 'web', action: 'allow' }] }, 'GET /a').enforcement, null, 'sources alone: the plugin option applies')
})
