// Explain (docs/semantics.md#rollout-explain): the decision comes from the request pipeline itself
// (decideRequest with a trace sink), so it equals the real decision on random sets, and the trace
// names what decided.
import t from 'tap'
import fc from 'fast-check'
import type { Intention, IntentionPermission } from '../lib/agent/wire'
import { explainRequest, parseSource, rawHeadersOf } from '../lib/explain'
import { compilePolicy } from '../lib/intentions/policy'
import type { RouteSource } from '../lib/intentions/policy'
import { decideRequest, newVerdict } from '../lib/intentions/request'
import type { RouteRules, ServiceRules } from '../lib/intentions/request'
import { compileRoutePolicy, EXEMPT_POLICY, SERVICE_POLICY } from '../lib/route-policy'
import { ixn } from './helpers/intentions'

const ROUTER = { caseSensitive: true, ignoreTrailingSlash: false, ignoreDuplicateSlashes: false, useSemicolonDelimiter: false }
const allow = (HTTP: IntentionPermission['HTTP']): IntentionPermission => ({ Action: 'allow', HTTP })
const deny = (HTTP: IntentionPermission['HTTP']): IntentionPermission => ({ Action: 'deny', HTTP })

function service (intentions: Intention[], defaultAllow = false, protocol = 'http'): ServiceRules {
  return { policy: compilePolicy({ destination: 'api', intentions, defaultAllow, protocol }), normalization: null, router: ROUTER, agentDecides: false }
}

const WEB = 'intention default/web => default/api (precedence 9)'

t.test('the trace walks the rules in precedence order and names the deciding permission', async (t) => {
  const rules = service([
    ixn('web', 'api', 9, [deny({ PathPrefix: '/admin' }), allow({ PathPrefix: '/', Methods: ['GET'], Header: [{ Name: 'x-env', Exact: 'prod' }] }), allow({ PathExact: '/ok' })]),
    ixn('*', 'api', 8, 'deny')
  ])
  const ok = explainRequest(rules, SERVICE_POLICY, null, { source: 'web', method: 'POST', path: '/ok?x=1', headers: { 'x-env': 'prod' } })
  t.same(ok, {
    allow: true,
    reason: `${WEB}, permission 3 (allow)`,
    outcome: 'allow',
    decidedBy: { intention: WEB, permission: 3, defaultPolicy: false },
    trace: [
      { step: 'normalization', path: '/ok', rejected: null },
      { step: 'source', scope: 'service', intention: WEB, matched: true },
      { step: 'permission', intention: WEB, permission: 1, action: 'deny', path: '/ok', matched: false, failed: 'path' },
      { step: 'permission', intention: WEB, permission: 2, action: 'allow', path: '/ok', matched: false, failed: 'method' },
      { step: 'permission', intention: WEB, permission: 3, action: 'allow', path: '/ok', matched: true }
    ]
  })
  const header = explainRequest(rules, SERVICE_POLICY, null, { source: 'web', method: 'GET', path: '/x', headers: { 'x-env': 'dev' } })
  t.match(header.trace[3], { permission: 2, failed: 'header', header: 'x-env' })
  t.same(header.decidedBy, { intention: WEB, permission: null, defaultPolicy: true })
  t.same(header.trace.at(-1), { step: 'default', reason: `${WEB}: no permission matched, default policy (deny)` })

  const other = explainRequest(rules, SERVICE_POLICY, null, { source: 'spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/cron', method: 'GET', path: '/' })
  t.same(other.trace.slice(1), [
    { step: 'source', scope: 'service', intention: WEB, matched: false },
    { step: 'source', scope: 'service', intention: 'intention default/* => default/api (precedence 8)', matched: true }
  ], 'a SPIFFE ID source; rules above the match are reported unmatched')
  t.same(other.decidedBy, { intention: 'intention default/* => default/api (precedence 8)', permission: null, defaultPolicy: false })

  const nobody = explainRequest(service([ixn('web', 'api', 9, 'allow')], true), SERVICE_POLICY, null, { source: 'team/db', method: 'GET', path: '/' })
  t.same(nobody, {
    allow: true,
    reason: 'default policy (allow)',
    outcome: 'allow',
    decidedBy: { intention: null, permission: null, defaultPolicy: true },
    trace: [
      { step: 'normalization', path: '/', rejected: null },
      { step: 'source', scope: 'service', intention: WEB, matched: false },
      { step: 'default', reason: 'default policy (allow)' }
    ]
  })

  const jwt = explainRequest(service([ixn('web', 'api', 9, [{ Action: 'allow', HTTP: { PathPrefix: '/' }, JWT: { Providers: [{ Name: 'okta' }] } }])]), SERVICE_POLICY, null,
    { source: 'web', method: 'GET', path: '/' })
  t.match(jwt.trace[2], { step: 'permission', permission: 1, matched: false, failed: 'jwt' })
})

t.test('route overrides, exemption, normalization and spellings', async (t) => {
  const rules = service([ixn('web', 'api', 9, [deny({ PathExact: '/admin' }), allow({ PathPrefix: '/' })])])
  const route = compileRoutePolicy({ sources: [{ name: 'ops', action: 'allow' }, { name: '*', permissions: [{ action: 'deny', http: { methods: ['DELETE'] } }] }] }, 'GET /admin')
  const viaRoute = explainRequest(rules, route, 'DELETE /admin', { source: 'web', method: 'DELETE', path: '/admin' })
  t.same(viaRoute.trace.slice(0, 4), [
    { step: 'route', route: 'DELETE /admin', exempt: false, overrides: 2 },
    { step: 'normalization', path: '/admin', rejected: null },
    { step: 'source', scope: 'route', intention: 'route override sources[0] ops', matched: false },
    { step: 'source', scope: 'route', intention: 'route override sources[1] *', matched: true }
  ])
  t.same(viaRoute.decidedBy, { intention: 'route override sources[1] *', permission: 1, defaultPolicy: false })
  const fallsThrough = explainRequest(rules, compileRoutePolicy({ sources: [{ name: 'ops', action: 'allow' }] }, 'GET /admin'), 'GET /admin', { source: 'web', method: 'GET', path: '/admin' })
  t.same(fallsThrough.trace.filter((s) => s.step === 'source').map((s) => s.step === 'source' && [s.scope, s.matched]), [['route', false], ['service', true]])
  t.same(fallsThrough.decidedBy, { intention: WEB, permission: 1, defaultPolicy: false })

  t.same(explainRequest(rules, EXEMPT_POLICY, 'GET /health', { source: 'web', method: 'GET', path: '/health' }), {
    allow: true, reason: 'route exempt (config.consulNative: false)', outcome: 'exempt', decidedBy: null, trace: [{ step: 'route', route: 'GET /health', exempt: true, overrides: 0 }]
  })
  t.same(explainRequest(rules, SERVICE_POLICY, null, { source: 'web', method: 'GET', path: '/a%00' }), {
    allow: false, reason: 'path rejected by the mesh request normalization', outcome: 'bad-path', decidedBy: null, trace: [{ step: 'normalization', path: null, rejected: 'path' }]
  })
  const underscores: ServiceRules = { ...rules, normalization: { HeadersWithUnderscoresAction: 'REJECT_REQUEST' } }
  t.match(explainRequest(underscores, SERVICE_POLICY, null, { source: 'web', method: 'GET', path: '/', headers: { x_env: 'a' } }), { outcome: 'bad-header', trace: [{ step: 'normalization', path: '/', rejected: 'header' }] })

  // Another spelling of the path the router treats alike is checked too; its denial decides.
  const slash = explainRequest({ ...rules, router: { ...ROUTER, ignoreTrailingSlash: true } }, SERVICE_POLICY, null, { source: 'web', method: 'GET', path: '/admin/' })
  t.equal(slash.allow, false)
  t.match(slash.decidedBy, { intention: WEB, permission: 1 })
  t.ok(slash.trace.some((s) => s.step === 'permission' && s.path === '/admin' && s.matched), 'the trace shows the spelling that matched')
})

t.test('inputs are checked', async (t) => {
  t.same(parseSource('web'), { partition: 'default', namespace: 'default', service: 'web' })
  t.same(parseSource('eu/team/web'), { partition: 'eu', namespace: 'team', service: 'web' })
  t.same(parseSource('spiffe://td.consul/ap/eu/ns/team/dc/dc1/svc/web'), { partition: 'eu', namespace: 'team', service: 'web' })
  for (const bad of ['', 'a/b/c/d', 'a//b', '*', 'spiffe://td.consul/agent/client/dc/dc1/id/x', 'spiffe://bad id', 5]) {
    t.throws(() => parseSource(bad), { code: 'FST_CONSUL_NATIVE_INVALID_OPTION' }, String(bad))
  }
  t.same(rawHeadersOf({ a: '1', b: ['2', '3'] }), ['a', '1', 'b', '2', 'b', '3'])
  t.same(rawHeadersOf(undefined), [])
  t.throws(() => rawHeadersOf('x' as never), { message: /must be an object/ })
  t.throws(() => rawHeadersOf({ a: [1] } as never), { message: /a must be a string/ })
  const rules = service([])
  for (const input of [null, { source: 'web', method: '', path: '/' }, { source: 'web', method: 'GET', path: '' }]) {
    t.throws(() => explainRequest(rules, SERVICE_POLICY, null, input as never), { code: 'FST_CONSUL_NATIVE_INVALID_OPTION' }, JSON.stringify(input))
  }
})

// ---------------------------------------------------------------------------------------------
// Property: explain's decision is the real decision.

const PATHS = ['/', '/a', '/a/b', '/admin', '/admin/', '/a/../admin', '/A', '/a%2Fb', '/a?x=1', '//admin']
const http = fc.record({
  path: fc.option(fc.oneof(
    fc.constantFrom('/a', '/admin', '/').map((PathPrefix) => ({ PathPrefix })),
    fc.constantFrom('/a', '/admin', '/a/b').map((PathExact) => ({ PathExact })),
    fc.constantFrom('/a.*', '/(admin|a)/?').map((PathRegex) => ({ PathRegex }))
  ), { nil: undefined }),
  methods: fc.option(fc.subarray(['GET', 'POST', 'DELETE'], { minLength: 1 }), { nil: undefined }),
  header: fc.option(fc.constantFrom(
    [{ Name: 'x-env', Exact: 'prod' }], [{ Name: 'x-env', Present: true, Invert: true }], [{ Name: ':method', Exact: 'GET' }]), { nil: undefined })
}).map(({ path, methods, header }) => ({ ...path, ...(methods === undefined ? {} : { Methods: methods }), ...(header === undefined ? {} : { Header: header }) }))
  .filter((h) => Object.keys(h).length > 0)
const permission = fc.record({ Action: fc.constantFrom<'allow' | 'deny'>('allow', 'deny'), HTTP: http, jwt: fc.constantFrom(false, false, false, true) })
  .map(({ jwt, ...p }) => (jwt ? { ...p, JWT: { Providers: [{ Name: 'okta' }] } } : p) as unknown as IntentionPermission)
const intention = fc.record({
  source: fc.constantFrom('web', 'db', '*', 'team/*', '*/*'),
  precedence: fc.integer({ min: 4, max: 9 }),
  what: fc.oneof(fc.constantFrom<'allow' | 'deny'>('allow', 'deny'), fc.array(permission, { minLength: 1, maxLength: 4 }))
}).map(({ source, precedence, what }) => ixn(source, 'api', precedence, what))
const override: fc.Arbitrary<RouteSource[] | null> = fc.option(fc.uniqueArray(fc.record({
  name: fc.constantFrom('web', 'db', '*'),
  what: fc.oneof(fc.constantFrom<'allow' | 'deny'>('allow', 'deny'), fc.array(permission.filter((p) => p.JWT === undefined), { minLength: 1, maxLength: 2 }))
}).map(({ name, what }): RouteSource => typeof what === 'string' ? { name, action: what } : { name, permissions: what }),
{ minLength: 1, maxLength: 3, selector: (s) => s.name }), { nil: null })
const requestArb = fc.record({
  source: fc.constantFrom('web', 'db', 'team/web', 'cron'),
  method: fc.constantFrom('GET', 'POST', 'DELETE'),
  path: fc.constantFrom(...PATHS),
  env: fc.constantFrom(undefined, 'prod', 'dev')
})

t.test('property: explain decides exactly as the request pipeline, and names a decider consistent with the reason', async (t) => {
  fc.assert(fc.property(fc.array(intention, { maxLength: 6 }), fc.boolean(), fc.constantFrom('http', 'tcp'), override, fc.boolean(), fc.array(requestArb, { minLength: 1, maxLength: 5 }),
    (intentions, defaultAllow, protocol, sources, trailing, requests) => {
      const rules: ServiceRules = { ...service(intentions, defaultAllow, protocol), router: { ...ROUTER, ignoreTrailingSlash: trailing } }
      const route: RouteRules = sources === null ? SERVICE_POLICY : compileRoutePolicy({ sources }, 'GET /x')
      for (const r of requests) {
        const headers: Record<string, string> = r.env === undefined ? {} : { 'x-env': r.env }
        const explained = explainRequest(rules, route, null, { source: r.source, method: r.method, path: r.path, headers })
        const real = decideRequest(rules, route, { caller: parseSource(r.source), method: r.method, url: r.path, rawHeaders: rawHeadersOf(headers) }, newVerdict())
        if (explained.allow !== real.decision.allow || explained.reason !== real.decision.reason || explained.outcome !== real.outcome) return false
        const by = explained.decidedBy
        if (by === null) { if (real.outcome === 'allow' || real.outcome === 'deny') return false; continue }
        if (by.intention !== null && !explained.reason.startsWith(by.intention)) return false
        if (by.permission !== null && !explained.reason.includes(`, permission ${by.permission} (`)) return false
        if (by.intention === null && !explained.reason.startsWith('default policy')) return false
        const matchedSources = explained.trace.filter((s) => s.step === 'source' && s.matched)
        if (by.intention !== null && matchedSources.length === 0) return false
      }
      return true
    }), { numRuns: 1500 })
  t.pass('1500 random sets')
})
